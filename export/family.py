"""What a model family is to the exporter: the descriptor each family file (models/<family>.py) fills in once.

A family file holds everything the project knows about one architecture: its config and module, how a diffusers
checkpoint maps onto them, the diffusers pipeline's defaults (sampler, text length), the step graph's conditioning
inputs, the constants of an engine's size that the step graph holds (Flux position ids, PixArt-α micro-conditions),
its text engine, and its latent packing. export/registry.py lists the families; nothing else names one.
"""

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from torch import nn

from ditrt.runtime.errors import ConfigError
from ditrt.runtime.manifest import TensorSpec
from ditrt.runtime.schedules import SchedulerKind

BRANCH_AXIS = "n"  # CFG branches: 1 (positive only) or 2 (negative, positive)


@dataclass(frozen=True)
class Checkpoint:
    """A diffusers component class this project loads: its config.json -> our config, our module, key rules."""

    classes: tuple[str, ...]  # diffusers `_class_name`s (the first is the current one)
    module: type[nn.Module]
    from_diffusers: Callable[[dict], object]  # config.json dict -> our config (raises ConfigError)
    keys: list  # loaders.keymaps.KeyRule rows: checkpoint names -> ours


@dataclass(frozen=True)
class Sampler:
    """Pipeline defaults (reference/architectures.md §7.4): a diffusers scheduler config (the class's defaults
    fill the rest), steps and guidance. A pipeline folder's own scheduler_config.json replaces `config`."""

    config: dict
    steps: int
    guidance: float


@dataclass(frozen=True)
class Conditioning:
    """What a family's step graph feeds its model beyond (x, t): engine inputs, declared once."""

    paired: tuple[
        TensorSpec, ...
    ]  # per-sample inputs, given per CFG branch: shape ("n", "B", ...) in the engine
    shared: tuple[TensorSpec, ...] = ()  # inputs used as they are by every branch
    cfg_batch: bool = True  # False: one forward per step, guidance embedded in the model (Flux)
    guidance_input: bool = False  # the model takes the guidance scale itself (FLUX.1-dev)
    cond_first: bool = False  # model batch order: DiT/SiT [cond; uncond], PixArt/Sana/SD3 [uncond; cond]
    null_class: int | None = (
        None  # class-conditional: the label of the negative branch (the runtime fills it)
    )
    timestep_scale: float = 1.0  # model timestep = t · scale (Flux takes σ, the scheduler gives σ·1000)


@dataclass(frozen=True)
class TextEngine:
    """A pipeline folder's text encoders as one graph whose outputs are the denoiser's prompt inputs."""

    graph: nn.Module  # has .inputs and .outputs (TensorSpecs)
    tokenizers: list  # [(subfolder, transformers tokenizer, manifest TextInput)]


@dataclass(frozen=True)
class Defaults:
    """What diffusers' pipeline for a checkpoint of the family uses when the folder does not say."""

    sampler: Sampler
    text_len: (
        int | str
    )  # text tokens the step graph is built for: 0 class-conditional, "T" chosen per request
    # How the pipeline calls scheduler.set_timesteps and steps, beyond the step count, whatever the scheduler
    # (runtime/schedules.timestep_args): custom sigmas, μ, initial-noise scaling, one-step x0.
    call: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Family:
    name: str  # the manifest's `family`
    checkpoint: Checkpoint
    config: type  # the config dataclass
    conditioning: Callable[..., Conditioning]  # (cfg, text_len, latent_hw) -> the step's model inputs
    # (cfg, pipeline class name or None) -> the diffusers pipeline's sampler and text length for this checkpoint
    defaults: Callable[[object, str | None], Defaults]
    # (model, latent_hw, image_hw) -> the module the step graph calls: model(x, t, *conditioning[, guidance=g]);
    # it holds the constants of the engine's size. None: the model itself.
    step_model: Callable[..., nn.Module] | None = None
    # (pipeline folder, cfg, text_len, load) -> TextEngine, or None where the folder's encoders are not supported;
    # load(transformers class, subfolder) loads one encoder as the export needs it.
    text_engine: Callable[..., TextEngine | None] | None = None
    packing: int = 1  # latent tokens are packed k×k (Flux: 2)
    latent_hw: Callable[[object], tuple[int, int]] | None = (
        None  # default latent size (None: cfg.sample_size)
    )
    class_names: Callable[[object], tuple[str, ...]] | None = None  # class-conditional models: their labels
    # (cfg, vae) -> resolution bins a pipeline folder's engines honour (aspect ratio -> (height, width) px)
    resolution_bins: Callable[..., dict[str, tuple[int, int]]] | None = None

    @property
    def module(self) -> type[nn.Module]:
        return self.checkpoint.module

    @property
    def class_conditional(self) -> bool:
        return self.class_names is not None

    def default_latent_hw(self, cfg) -> tuple[int, int]:
        if self.latent_hw is not None:
            return self.latent_hw(cfg)
        return cfg.sample_size, cfg.sample_size

    def latent_multiple(self, cfg) -> int:
        """Latent sides must be a multiple of this: patch size times packing."""
        return self.packing * getattr(cfg, "patch_size", 1)


def scheduler(kind: SchedulerKind, **options) -> dict:
    """A diffusers scheduler config: the class and the options that differ from its defaults."""
    unknown = set(options) - set(kind.defaults)
    if unknown:  # the runtime's full_config would drop them silently
        raise ConfigError(f"{kind.cls} has no option {', '.join(sorted(unknown))}")
    return {"_class_name": kind.cls, **options}


def has_component(path: Path, sub: str) -> bool:
    """Whether a pipeline folder has a component (config.json) in subfolder `sub`."""
    return (Path(path) / sub / "config.json").is_file()


def masked_text(width: int, text_len: int | str) -> tuple[TensorSpec, ...]:
    """Prompt states (B, T, width) with their keep-mask (B, T): PixArt's T5 and Sana's Gemma-2 conditioning."""
    return (
        TensorSpec("prompt_embeds", "float32", ["B", text_len, width]),
        TensorSpec("prompt_attention_mask", "int64", ["B", text_len]),
    )
