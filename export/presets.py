"""The one table of models `dit-export` builds by name: architecture, weights (if shipped), sampler defaults.

Rows with shipped weights are trained demos. The other rows are the released architectures at full size, for
benchmarking without downloads: exporting them needs --random-weights, and their manifests say so.
"""

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ditrt.runtime import schedules
from ditrt.runtime.errors import ConfigError, LoaderError

from .catalog import MODELS
from .demos import DIGITS_CONFIG, DIGITS_WEIGHTS, TEXT_DIGITS_FOLDER
from .family import Family, Sampler, scheduler
from .models import dit, flux, mmdit, pixart, sana
from .models.dit import DiTConfig
from .models.flux import FLUX_DEV, FLUX_SCHNELL
from .models.mmdit import SD3_MEDIUM, SD35_LARGE, SD35_MEDIUM
from .models.pixart import PIXART_SIGMA_1024
from .models.sana import SANA_600M_1024, SANA_1600M_1024

FLOW_EULER = Sampler(scheduler(schedules.FLOW), 20, 3.0)


@dataclass(frozen=True)
class Preset:
    name: str
    description: str
    family: Family
    config: object
    sampler: Sampler
    text_len: int | str = (
        0  # text tokens the step graph is built for (0: class-conditional; "T": chosen per request)
    )
    latent_hw: tuple[int, int] | None = None  # latent size to export at (default: the family's)
    weights: Path | None = None  # shipped trained weights; None: architecture only
    folder: Path | None = None  # a shipped diffusers pipeline folder, exported like any other folder


def _row(name: str, family: Family, config, text_len: int | str = 0, latent_hw=None, **kw) -> Preset:
    """A released architecture at full size with its pipeline's sampler defaults."""
    return Preset(
        name, MODELS[name], family, config, family.defaults(config, None).sampler, text_len, latent_hw, **kw
    )


PRESETS = {
    p.name: p
    for p in [
        Preset("digits", MODELS["digits"], dit.FAMILY, DIGITS_CONFIG, FLOW_EULER, weights=DIGITS_WEIGHTS),
        Preset(
            "text-digits",
            MODELS["text-digits"],
            sana.FAMILY,
            None,
            sana.SANA_DPM,
            300,
            folder=TEXT_DIGITS_FOLDER,
        ),
        _row("dit-xl-2-256", dit.FAMILY, DiTConfig(sample_size=32)),
        _row("pixart-sigma-1024", pixart.FAMILY, PIXART_SIGMA_1024, 300),
        _row("sana-600m-1024", sana.FAMILY, SANA_600M_1024, 300),
        _row("sana-1600m-1024", sana.FAMILY, SANA_1600M_1024, 300),
        _row("sd3-medium", mmdit.FAMILY, SD3_MEDIUM, 77 + mmdit.T5_LENGTH),
        _row("sd35-medium", mmdit.FAMILY, SD35_MEDIUM, 77 + mmdit.T5_LENGTH),
        _row("sd35-large", mmdit.FAMILY, SD35_LARGE, 77 + mmdit.T5_LENGTH),
        _row("flux-dev", flux.FAMILY, FLUX_DEV, flux.T5_LENGTH),
        _row("flux-schnell", flux.FAMILY, FLUX_SCHNELL, 256),  # the T5 length schnell was distilled with
    ]
}


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise ConfigError(
            f"unknown model {name!r}; built-in models: {', '.join(PRESETS)} (see dit-export --list)"
        )
    return PRESETS[name]


def build_preset(
    p: Preset, random_weights: bool = False, seed: int = 0, dtype: torch.dtype = torch.float32
) -> nn.Module:
    """The preset's model, its weights in dtype (the one it runs in: precision.POLICY): shipped weights
    (loaded strictly), or seeded random ones when asked for. Built lean: parameters start on the meta device
    and are materialised once, in dtype."""
    from .loaders.diffusers import empty_parameters

    if p.folder is not None:
        raise ConfigError(
            f"{p.name!r} is a shipped pipeline folder ({str(p.folder)!r}); export it with "
            "dit-export / export_model, which load every component"
        )
    if p.weights is None and not random_weights:
        raise ConfigError(
            f"{p.name!r} ships no weights; pass --random-weights to export its architecture with "
            "random weights (for benchmarks), or export a diffusers folder holding real weights"
        )
    with empty_parameters():
        model = p.family.module(p.config)
    if random_weights:
        return random_init(model, seed, dtype).eval()
    from safetensors.torch import load_file

    if not p.weights.is_file():
        raise LoaderError(f"weights for {p.name!r} are missing at {str(p.weights)!r}; reinstall the package")
    state = {k: v.to(dtype) for k, v in load_file(p.weights).items()}
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as e:
        raise LoaderError(
            f"weights {str(p.weights)!r} do not fit model {p.name!r}: {str(e).splitlines()[0]}"
        ) from None
    return model.to(dtype).eval()  # the buffers computed in __init__; the parameters are in dtype already


@torch.no_grad()
def random_init(model: nn.Module, seed: int = 0, dtype: torch.dtype | None = None) -> nn.Module:
    """Seeded weights with sane activations: matrices N(0, 0.02), norm weights 1, biases 0.

    Each tensor is drawn in fp32 from one seeded stream, in the same order whatever the dtype, then stored in
    dtype (None: the tensor's own), one tensor at a time: meta parameters are materialised here, never as a
    whole fp32 model. So the weights equal the fp32 ones cast to dtype, as when an fp32 model is cast after
    its init."""
    g = torch.Generator().manual_seed(seed)
    tensors = list(model.named_parameters()) + [(n, b) for n, b in model.named_buffers() if n == "pos_embed"]
    scratch = (
        None  # the fp32 draws of reduced-precision tensors reuse one buffer (no fp32 garbage per tensor)
    )
    for name, t in tensors:
        target = dtype or t.dtype
        if t.ndim >= 2 and target == torch.float32:
            value = torch.randn(t.shape, generator=g).mul_(0.02)
        elif t.ndim >= 2:
            if scratch is None:
                scratch = torch.empty(max(x.numel() for _, x in tensors if x.ndim >= 2))
            value = (
                torch.randn(t.shape, generator=g, out=scratch[: t.numel()].view(t.shape))
                .mul_(0.02)
                .to(target)
            )
        else:
            value = torch.full(t.shape, 1.0 if name.endswith("weight") else 0.0, dtype=target)
        if t.device.type == "meta" or value.dtype != t.dtype:
            owner, _, leaf = name.rpartition(".")
            module = model.get_submodule(owner)
            if leaf in module._parameters:
                module._parameters[leaf] = nn.Parameter(value, requires_grad=t.requires_grad)
            else:
                module._buffers[leaf] = value
        else:
            t.copy_(value)
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise LoaderError(f"random_init cannot fill {', '.join(left[:4])} (meta tensors of no known kind)")
    return model if dtype is None else model.to(dtype)


def training_info(weights: Path | None) -> dict:
    """The training record shipped with a demo's weights (a safetensors file or a pipeline folder), else {}."""
    if weights is None:
        return {}
    if weights.is_dir():  # a shipped folder: its training record sits next to model_index.json
        record = weights / "training.json"
        return json.loads(record.read_text()) if record.is_file() else {}
    from safetensors import safe_open

    with safe_open(str(weights), "pt") as f:
        return json.loads((f.metadata() or {}).get("training", "{}"))
