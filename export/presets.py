"""The one table of models `dit-export` builds by name: architecture, weights (if shipped), sampler defaults.

Rows with shipped weights are trained demos. The other rows are the released architectures at full size, for
benchmarking without downloads: exporting them needs --random-weights, and their manifests say so.
"""

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ditrt.runtime.errors import ConfigError, LoaderError

from .demos import DIGITS_CONFIG, DIGITS_WEIGHTS, TEXT_DIGITS_FOLDER
from .models.dit import DiT, DiTConfig
from .models.flux import FLUX_DEV, FLUX_SCHNELL, Flux
from .models.mmdit import SD3_MEDIUM, SD35_LARGE, SD35_MEDIUM, MMDiT
from .models.pixart import PIXART_SIGMA_1024, PixArt
from .models.sana import SANA_600M_1024, SANA_1600M_1024, Sana

FAMILIES: dict[str, type[nn.Module]] = {"dit": DiT, "pixart": PixArt, "sana": Sana, "mmdit": MMDiT, "flux": Flux}


@dataclass(frozen=True)
class Sampler:
    """Pipeline defaults (reference/architectures.md §7.4); the runtime reads them from the manifest."""
    name: str
    prediction: str  # "flow" (v = noise − x0) | "epsilon"
    steps: int
    guidance: float
    shift: float = 1.0


FLOW_EULER = Sampler("flow_euler", "flow", 20, 4.0)
DDIM = Sampler("ddim", "epsilon", 50, 4.0)
PIXART_DPM = Sampler("dpmsolver++", "epsilon", 20, 4.5)
SANA_DPM = Sampler("flow_dpmsolver++", "flow", 20, 4.5, shift=3.0)
SD3_EULER = Sampler("flow_euler", "flow", 28, 7.0, shift=3.0)
FLUX_DEV_EULER = Sampler("flow_euler_dynamic", "flow", 28, 3.5)
FLUX_SCHNELL_EULER = Sampler("flow_euler_linspace", "flow", 4, 0.0)
FAMILY_SAMPLERS = {"dit": DDIM, "pixart": PIXART_DPM, "sana": SANA_DPM, "mmdit": SD3_EULER, "flux": FLUX_DEV_EULER}
FAMILY_TEXT_LEN = {"dit": 0, "pixart": 300, "sana": 300, "mmdit": 333, "flux": 512}  # diffusers pipeline defaults


def family_defaults(family: str, cfg) -> tuple[Sampler, int]:
    """Sampler and text length that diffusers' pipeline uses for a checkpoint of this family."""
    if family == "flux" and not cfg.guidance_embeds:  # schnell: 4 steps, no guidance, 256 T5 tokens
        return FLUX_SCHNELL_EULER, 256
    if family == "pixart" and cfg.micro_conditions:  # PixArt-α: 120 T5 tokens (Σ: 300)
        return PIXART_DPM, 120
    return FAMILY_SAMPLERS[family], FAMILY_TEXT_LEN[family]


@dataclass(frozen=True)
class Preset:
    name: str
    description: str
    family: str
    config: object
    sampler: Sampler
    text_len: int = 0  # text tokens the step graph is built for (0: class-conditional)
    latent_hw: tuple[int, int] | None = None  # latent size to export at (default: the config's sample_size)
    weights: Path | None = None  # shipped trained weights; None: architecture only
    class_names: tuple[str, ...] = ()
    folder: Path | None = None  # a shipped diffusers pipeline folder, exported like any other folder


PRESETS = {p.name: p for p in [
    Preset("digits", "class-conditional DiT trained on scikit-learn's 8x8 digits (16x16 grayscale, classes 0-9)",
           "dit", DIGITS_CONFIG, Sampler("flow_euler", "flow", 20, 3.0), weights=DIGITS_WEIGHTS,
           class_names=tuple(str(i) for i in range(10))),
    Preset("text-digits", "text-to-image Sana-style model trained on the digits with captions such as "
           "'a handwritten seven' or 'the digit 3' (16x16 grayscale; own Gemma-2-style encoder and DC-AE)", "sana",
           None, SANA_DPM, 300, folder=TEXT_DIGITS_FOLDER),
    Preset("dit-xl-2-256", "DiT-XL/2 at 256 px (architecture only)", "dit", DiTConfig(sample_size=32), DDIM,
           class_names=tuple(str(i) for i in range(1000))),
    Preset("pixart-sigma-1024", "PixArt-Σ XL/2 at 1024 px (architecture only)", "pixart", PIXART_SIGMA_1024,
           PIXART_DPM, text_len=300),
    Preset("sana-600m-1024", "Sana 0.6B at 1024 px (architecture only)", "sana", SANA_600M_1024, SANA_DPM, 300),
    Preset("sana-1600m-1024", "Sana 1.6B at 1024 px (architecture only)", "sana", SANA_1600M_1024, SANA_DPM, 300),
    Preset("sd3-medium", "SD3-medium MMDiT at 1024 px (architecture only)", "mmdit", SD3_MEDIUM, SD3_EULER, 333),
    Preset("sd35-medium", "SD3.5-medium MMDiT-X at 1024 px (architecture only)", "mmdit", SD35_MEDIUM, SD3_EULER, 333),
    Preset("sd35-large", "SD3.5-large MMDiT at 1024 px (architecture only)", "mmdit", SD35_LARGE, SD3_EULER, 333),
    Preset("flux-dev", "FLUX.1-dev at 1024 px (architecture only)", "flux", FLUX_DEV, FLUX_DEV_EULER, 512, (128, 128)),
    Preset("flux-schnell", "FLUX.1-schnell at 1024 px (architecture only)", "flux", FLUX_SCHNELL, FLUX_SCHNELL_EULER,
           256, (128, 128)),
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
