"""The one table of models `dit-export` builds by name: architecture, weights (if shipped), sampler defaults.

Rows with shipped weights are trained demos. The other rows are the released architectures at full size, for
benchmarking without downloads: exporting them needs --random-weights, and their manifests say so.
"""

import json
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch import nn

from ditrt.runtime.errors import ConfigError, LoaderError

from .catalog import MODELS
from .demos import DIGITS_CONFIG, DIGITS_WEIGHTS, TEXT_DIGITS_FOLDER
from .models.dit import DiT, DiTConfig
from .models.flux import FLUX_DEV, FLUX_SCHNELL, Flux
from .models.mmdit import SD3_MEDIUM, SD35_LARGE, SD35_MEDIUM, MMDiT
from .models.pixart import PIXART_SIGMA_1024, PixArt
from .models.sana import SANA_600M_1024, SANA_1600M_1024, Sana

FAMILIES: dict[str, type[nn.Module]] = {"dit": DiT, "pixart": PixArt, "sana": Sana, "mmdit": MMDiT, "flux": Flux}


@dataclass(frozen=True)
class Sampler:
    """Pipeline defaults (reference/architectures.md §7.4): a diffusers scheduler config (the class's defaults
    fill the rest), steps and guidance. A pipeline folder's own scheduler_config.json replaces `config`."""
    config: dict
    steps: int
    guidance: float
    call: dict = field(default_factory=dict)  # pipeline-specific set_timesteps/step behaviour (schedules.make_plan)


def _sched(cls: str, **options) -> dict:
    return {"_class_name": cls, **options}


FLOW_EULER = Sampler(_sched("FlowMatchEulerDiscreteScheduler"), 20, 4.0)
DDIM = Sampler(_sched("DDIMScheduler", clip_sample=False), 50, 4.0)  # facebook/DiT-XL-2-256
PIXART_DPM = Sampler(_sched("DPMSolverMultistepScheduler"), 20, 4.5)
SANA_DPM = Sampler(_sched("DPMSolverMultistepScheduler", prediction_type="flow_prediction", use_flow_sigmas=True,
                          flow_shift=3.0), 20, 4.5)
SD3_EULER = Sampler(_sched("FlowMatchEulerDiscreteScheduler", shift=3.0), 28, 7.0)
FLUX_DEV_EULER = Sampler(_sched("FlowMatchEulerDiscreteScheduler", shift=3.0, use_dynamic_shifting=True,
                                base_shift=0.5, max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096), 28, 3.5)
FLUX_SCHNELL_EULER = Sampler(_sched("FlowMatchEulerDiscreteScheduler", shift=1.0), 4, 0.0)
FAMILY_SAMPLERS = {"dit": DDIM, "pixart": PIXART_DPM, "sana": SANA_DPM, "mmdit": SD3_EULER, "flux": FLUX_DEV_EULER}
# Text tokens the denoiser is built for, as the diffusers pipelines default. SD3/Flux: "T", a length chosen per
# request (their T5 max_sequence_length, T5_LENGTH by default, at most T5_MAX; SD3 adds CLIP's 77 in front).
FAMILY_TEXT_LEN = {"dit": 0, "pixart": 300, "sana": 300, "mmdit": "T", "flux": "T"}
T5_LENGTH = {"mmdit": 256, "flux": 512}
T5_MAX = 512  # the pipelines refuse a longer max_sequence_length
# How each pipeline calls scheduler.set_timesteps beyond the step count (runtime/schedules.timestep_args):
# FluxPipeline passes sigmas linspace(1, 1/n, n) and μ(image tokens) always; StableDiffusion3Pipeline passes μ
# when the scheduler shifts dynamically; the others pass nothing. mu_defaults: the pipeline's fallbacks for
# base/max image tokens and base/max shift. PixArt's pipelines multiply the initial latents by the scheduler's
# init_noise_sigma (DiTPipeline and the flow pipelines do not), which matters for EulerDiscreteScheduler;
# DiTPipeline steps the scale_model_input result, so a σ-space scheduler cannot run in it.
FAMILY_TIMESTEP_CALL = {"flux": {"custom_sigmas": "linspace", "mu": "always", "mu_defaults": [256, 4096, 0.5, 1.15]},
                        "mmdit": {"mu": "dynamic", "mu_defaults": [256, 4096, 0.5, 1.16]},
                        "pixart": {"scales_initial_noise": True}, "dit": {"steps_scaled_input": True}}


def family_defaults(family: str, cfg, pipeline_class: str | None = None) -> tuple[Sampler, int | str]:
    """Sampler and text length that diffusers' pipeline (model_index.json's class, where known) uses for a
    checkpoint of this family."""
    if pipeline_class == "PixArtAlphaPipeline":  # 120 T5 tokens; one step returns the step's x0
        return replace(PIXART_DPM, call={"one_step_x0": True}), 120
    if pipeline_class == "PixArtSigmaPipeline":
        return PIXART_DPM, 300
    if family == "flux" and not cfg.guidance_embeds:  # schnell: 4 steps, no guidance (T5 length as dev: 512)
        return FLUX_SCHNELL_EULER, FAMILY_TEXT_LEN[family]
    if family == "pixart" and cfg.micro_conditions:  # a transformer folder alone: PixArt-α 1024 has micro-conditions
        return PIXART_DPM, 120
    return FAMILY_SAMPLERS[family], FAMILY_TEXT_LEN[family]


@dataclass(frozen=True)
class Preset:
    name: str
    description: str
    family: str
    config: object
    sampler: Sampler
    text_len: int | str = 0  # text tokens the step graph is built for (0: class-conditional; "T": chosen per request)
    latent_hw: tuple[int, int] | None = None  # latent size to export at (default: the config's sample_size)
    weights: Path | None = None  # shipped trained weights; None: architecture only
    class_names: tuple[str, ...] = ()
    folder: Path | None = None  # a shipped diffusers pipeline folder, exported like any other folder


PRESETS = {p.name: p for p in [
    Preset("digits", MODELS["digits"], "dit", DIGITS_CONFIG,
           Sampler(_sched("FlowMatchEulerDiscreteScheduler"), 20, 3.0), weights=DIGITS_WEIGHTS,
           class_names=tuple(str(i) for i in range(10))),
    Preset("text-digits", MODELS["text-digits"], "sana", None, SANA_DPM, 300, folder=TEXT_DIGITS_FOLDER),
    Preset("dit-xl-2-256", MODELS["dit-xl-2-256"], "dit", DiTConfig(sample_size=32), DDIM,
           class_names=tuple(str(i) for i in range(1000))),
    Preset("pixart-sigma-1024", MODELS["pixart-sigma-1024"], "pixart", PIXART_SIGMA_1024, PIXART_DPM, text_len=300),
    Preset("sana-600m-1024", MODELS["sana-600m-1024"], "sana", SANA_600M_1024, SANA_DPM, 300),
    Preset("sana-1600m-1024", MODELS["sana-1600m-1024"], "sana", SANA_1600M_1024, SANA_DPM, 300),
    Preset("sd3-medium", MODELS["sd3-medium"], "mmdit", SD3_MEDIUM, SD3_EULER, 333),
    Preset("sd35-medium", MODELS["sd35-medium"], "mmdit", SD35_MEDIUM, SD3_EULER, 333),
    Preset("sd35-large", MODELS["sd35-large"], "mmdit", SD35_LARGE, SD3_EULER, 333),
    Preset("flux-dev", MODELS["flux-dev"], "flux", FLUX_DEV, FLUX_DEV_EULER, 512, (128, 128)),
    Preset("flux-schnell", MODELS["flux-schnell"], "flux", FLUX_SCHNELL, FLUX_SCHNELL_EULER, 256, (128, 128)),
]}


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise ConfigError(f"unknown model {name!r}; built-in models: {', '.join(PRESETS)} (see dit-export --list)")
    return PRESETS[name]


def build_preset(p: Preset, random_weights: bool = False, seed: int = 0) -> nn.Module:
    """The preset's model in fp32: shipped weights (loaded strictly), or seeded random ones when asked for."""
    if p.folder is not None:
        raise ConfigError(f"{p.name!r} is a shipped pipeline folder ({str(p.folder)!r}); export it with "
                          "dit-export / export_model, which load every component")
    if p.weights is None and not random_weights:
        raise ConfigError(f"{p.name!r} ships no weights; pass --random-weights to export its architecture with "
                          "random weights (for benchmarks), or export a diffusers folder holding real weights")
    model = FAMILIES[p.family](p.config)
    if random_weights:
        return random_init(model, seed).eval()
    from safetensors.torch import load_file

    if not p.weights.is_file():
        raise LoaderError(f"weights for {p.name!r} are missing at {str(p.weights)!r}; reinstall the package")
    state = {k: v.float() for k, v in load_file(p.weights).items()}
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise LoaderError(f"weights {str(p.weights)!r} do not fit model {p.name!r}: {str(e).splitlines()[0]}") from None
    return model.eval()


@torch.no_grad()
def random_init(model: nn.Module, seed: int = 0) -> nn.Module:
    """Seeded weights with sane activations: matrices N(0, 0.02), norm weights 1, biases 0."""
    g = torch.Generator().manual_seed(seed)
    for name, t in list(model.named_parameters()) + [(n, b) for n, b in model.named_buffers() if n == "pos_embed"]:
        if t.ndim >= 2:
            t.copy_(torch.randn(t.shape, generator=g) * 0.02)
        else:
            t.fill_(1.0 if name.endswith("weight") else 0.0)
    return model


def training_info(p: Preset) -> dict:
    if p.weights is None:
        return {}
    if p.weights.is_dir():  # a shipped folder: its training record sits next to model_index.json
        record = p.weights / "training.json"
        return json.loads(record.read_text()) if record.is_file() else {}
    from safetensors import safe_open

    with safe_open(str(p.weights), "pt") as f:
        return json.loads((f.metadata() or {}).get("training", "{}"))
