"""What an export starts from: a built-in model name or a diffusers folder -> a `Source` holding its modules.

A pipeline folder (model_index.json) gives its transformer, and its VAE, text encoders and scheduler where this
project supports them; a transformer folder gives the denoiser alone. Whatever the folder leaves out takes the
defaults of the diffusers pipeline for its family (models/<family>.py: `defaults`). Nothing is substituted
silently: what was not exported, or loaded otherwise than asked, is a note in the manifest.
"""

import json
from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from ditrt.runtime.errors import ConfigError, InputError, LoaderError

from .family import Family, Sampler, TextEngine
from .loaders.diffusers import load_component, pick_variant, read_config
from .precision import PRECISIONS, policy_dtype, text_kind
from .presets import PRESETS, Preset, build_preset, get_preset, training_info
from .registry import CHECKPOINTS, DECODERS, FAMILIES


@dataclass
class Source:
    """A model ready to build engines from: its denoiser (fp32), VAE decoder and text engine where it has them,
    and the pipeline behaviour the manifest records."""

    name: str  # the manifest's model name
    family: Family
    model: nn.Module  # the denoiser
    sampler: Sampler  # default scheduler config, steps and guidance
    text_len: int | str  # text tokens the step graph is built for (0: class-conditional; "T": per request)
    call: dict  # how the pipeline calls the scheduler (runtime/schedules.timestep_args)
    latent_hw: tuple[int, int] | None = None  # latent size to export at when none is asked for
    vae: nn.Module | None = None
    text: TextEngine | None = None
    weights: Path | None = None  # shipped demo weights, whose training record the manifest keeps
    notes: list[str] = field(default_factory=list)

    @property
    def class_names(self) -> tuple[str, ...]:
        names = self.family.class_names
        return names(self.model.cfg) if names is not None else ()

    @property
    def training(self) -> dict:
        return training_info(self.weights)


def resolve_source(
    source: str,
    random_weights: bool = False,
    seed: int = 0,
    variant: str | None = None,
    precision: str = "fp32",
) -> Source:
    """A built-in model name or a diffusers folder -> Source.

    variant: diffusers' weights variant (e.g. "fp16") for every component, as `loaders.diffusers.pick_variant`
    says.
    precision: the requested --precision; each component's weights are loaded (or drawn) directly in the dtype
    it runs in (precision.POLICY), so that bf16/fp16 weights never pass through fp32."""
    if precision not in PRECISIONS:
        raise InputError(f"unknown precision {precision!r}; choose from {', '.join(PRECISIONS)}")
    path = Path(source)
    if source in PRESETS and PRESETS[source].folder is not None:  # a demo shipped as a diffusers folder
        return shipped_folder(PRESETS[source], random_weights, variant, precision)
    if source in PRESETS or not path.exists():
        preset = get_preset(source)
        if variant is not None:
            raise InputError(
                f"--variant {variant} applies to diffusers folders, not to the built-in model {source!r}"
            )
        return from_preset(preset, random_weights, seed, precision)
    if random_weights:
        raise InputError("--random-weights applies to built-in architectures, not to a checkpoint folder")
    return from_folder(path, variant, precision)


def from_preset(preset: Preset, random_weights: bool, seed: int, precision: str = "fp32") -> Source:
    model = build_preset(preset, random_weights, seed, policy_dtype("denoiser", precision))
    call = preset.family.defaults(preset.config, None).call
    return Source(
        preset.name,
        preset.family,
        model,
        preset.sampler,
        preset.text_len,
        call,
        preset.latent_hw,
        weights=preset.weights,
    )


def shipped_folder(
    preset: Preset, random_weights: bool, variant: str | None, precision: str = "fp32"
) -> Source:
    """A trained demo shipped as a diffusers pipeline folder: exported like any folder, under the demo's name."""
    if random_weights:
        raise InputError(
            f"{preset.name!r} is a trained demo; --random-weights applies to architecture-only models"
        )
    if not (preset.folder / "model_index.json").is_file():
        raise LoaderError(
            f"files for {preset.name!r} are missing at {str(preset.folder)!r}; reinstall the package"
        )
    source = from_folder(preset.folder, variant, precision)
    source.name, source.weights = preset.name, preset.folder
    return source


def from_folder(path: Path, variant: str | None, precision: str = "fp32") -> Source:
    """A diffusers pipeline folder (model_index.json) or a transformer folder."""
    pipeline = (path / "model_index.json").is_file()
    folder = path / "transformer" if pipeline else path
    notes: list[str] = []
    # the folder's own scheduler replaces the family's default; refused before the slow loading if unsupported
    scheduler = folder_scheduler(path, notes) if pipeline and (path / "scheduler").is_dir() else None
    family = denoiser_family(folder)
    model = load_component(folder, variant, notes, policy_dtype("denoiser", precision))
    pipeline_class = read_json(path / "model_index.json").get("_class_name") if pipeline else None
    defaults = family.defaults(model.cfg, pipeline_class)
    sampler = (
        defaults.sampler
        if scheduler is None
        else Sampler(scheduler, defaults.sampler.steps, defaults.sampler.guidance)
    )
    text = (
        text_engine(path, family, model.cfg, defaults.text_len, notes, variant, precision)
        if pipeline
        else None
    )
    vae = folder_vae(path, variant, notes, precision) if pipeline else None
    return Source(
        path.resolve().name,
        family,
        model,
        sampler,
        defaults.text_len,
        defaults.call,
        vae=vae,
        text=text,
        notes=notes,
    )


def denoiser_family(folder: Path) -> Family:
    """The family of the denoiser a component folder holds, from its config.json, before its weights load."""
    name = read_config(folder).get("_class_name")
    family = next((f for f in FAMILIES.values() if name in f.checkpoint.classes), None)
    if family is None and name in CHECKPOINTS:
        raise InputError(
            f"{str(folder)!r} holds a {name}, not a denoiser; pass a pipeline folder "
            "(model_index.json) or a transformer folder"
        )
    if family is None:
        raise LoaderError(f"{str(folder)!r} holds a {name!r}; supported: {', '.join(sorted(CHECKPOINTS))}")
    return family


def folder_vae(
    path: Path, variant: str | None, notes: list[str], precision: str = "fp32"
) -> nn.Module | None:
    if not (path / "vae" / "config.json").is_file():
        return None
    vae_class = read_config(path / "vae").get("_class_name")
    if not any(vae_class in decoder.classes for decoder in DECODERS):
        notes.append(f"vae ({vae_class}) not exported: not supported yet")
        return None
    return load_component(path / "vae", variant, notes, policy_dtype("vae", precision))


def text_engine(
    path: Path,
    family: Family,
    cfg,
    text_len: int | str,
    notes: list[str],
    variant: str | None = None,
    precision: str = "fp32",
) -> TextEngine | None:
    """The pipeline folder's text encoders as the family's text engine, or None (with a note where the folder has
    encoders this project does not export yet)."""
    if not (path / "text_encoder" / "config.json").is_file():
        return None

    def load(cls, sub):  # in its POLICY dtype, whatever config.json's (transformers' dtype="auto" follows it)
        v, note = pick_variant(path / sub, variant)
        notes.extend([note] if note else [])
        dtype = policy_dtype(text_kind(cls), precision)  # the islands are set up by precision.apply_policy
        return cls.from_pretrained(path / sub, use_safetensors=True, variant=v, dtype=dtype).eval()

    engine = family.text_engine(path, cfg, text_len, load) if family.text_engine is not None else None
    if engine is None:
        notes.append(f"text encoders of this {family.name!r} pipeline not exported: not supported yet")
    return engine


def read_json(path: Path) -> dict:
    """A JSON object from a diffusers folder (model_index.json, scheduler_config.json), or a one-line error."""
    try:
        value = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LoaderError(f"{str(path)!r} is not valid JSON ({e})") from None
    if not isinstance(value, dict):
        raise LoaderError(f"{str(path)!r} must hold a JSON object")
    return value


def folder_scheduler(pipeline: Path, notes: list[str]) -> dict:
    """The scheduler a pipeline folder's diffusers pipeline builds: the class model_index.json names (diffusers
    loads that one, with the scheduler_config.json options it accepts), checked to be a class and options the
    runtime reproduces (whether this pipeline can call it so is checked with the family, in build.py)."""
    from ditrt.runtime.schedules import check_config

    path = pipeline / "scheduler" / "scheduler_config.json"
    if not path.is_file():
        raise LoaderError(
            f"{str(path.parent)!r} has no scheduler_config.json; a pipeline folder's scheduler/ needs one"
        )
    config = read_json(path)
    entry = read_json(pipeline / "model_index.json").get("scheduler")
    named = entry[1] if isinstance(entry, list) and len(entry) == 2 and isinstance(entry[1], str) else None
    if named and named != config.get("_class_name"):
        notes.append(
            f"scheduler: model_index.json names {named}, scheduler_config.json {config.get('_class_name')}; "
            f"{named} is used, as diffusers does"
        )
        config = {**config, "_class_name": named}
    if not isinstance(config.get("_class_name"), str):
        raise LoaderError(f"{str(path)!r} names no scheduler class (_class_name)")
    try:
        check_config(config)
    except ConfigError as e:
        raise ConfigError(f"the folder's scheduler ({str(path)!r}) cannot be reproduced: {e}") from None
    return config
