"""diffusers component folders -> (config, state dict) -> our modules. safetensors only, strict.

A component folder holds `config.json` and either one `*.safetensors` file or shards listed in a
`*.safetensors.index.json`. Weights are upcast to fp32 (our reference path); pickled `.bin` files are refused.
"""

import json
import re
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from ditrt.runtime.errors import LoaderError

from . import keymaps
from .keymaps import KeyRule

WEIGHT_NAMES = ("diffusion_pytorch_model", "model")
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def read_config(folder: Path) -> dict:
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise LoaderError(f"{str(folder)!r} has no config.json; expected a diffusers component folder")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise LoaderError(f"{str(path)!r} is not valid JSON ({e})") from None


def weight_files(folder: Path, variant: str | None = None) -> list[Path]:
    """The safetensors files of a component: one file, or the shards named by an index file."""
    folder, suffix = Path(folder), f".{variant}.safetensors" if variant else ".safetensors"
    for stem in WEIGHT_NAMES:
        single = folder / f"{stem}{suffix}"
        if single.is_file():
            return [single]
        index = folder / f"{stem}{suffix}.index.json"
        if index.is_file():
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            missing = [s for s in shards if not (folder / s).is_file()]
            if missing:
                raise LoaderError(f"{str(index)!r} lists shard {missing[0]!r}, which is missing")
            return [folder / s for s in shards]
    if any(folder.glob("*.bin")) or any(folder.glob("*.pt")) or any(folder.glob("*.ckpt")):
        raise LoaderError(f"{str(folder)!r} has only pickled weights (.bin/.pt/.ckpt), which are never loaded "
                          "(they can run code); convert them to safetensors first")
    raise LoaderError(f"{str(folder)!r} has no {suffix.lstrip('.')} weights "
                      f"(looked for {' / '.join(WEIGHT_NAMES)}{suffix} and their .index.json)")


def read_state_dict(folder: Path, variant: str | None = None) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    state = {}
    for path in weight_files(folder, variant):
        try:
            tensors = load_file(path)
        except (SafetensorError, OSError) as e:
            raise LoaderError(f"cannot read {str(path)!r}: {e}") from None
        for k, v in tensors.items():
            if v.dtype not in FLOAT_DTYPES:
                raise LoaderError(f"{k!r} in {path.name!r} has dtype {v.dtype}; expected fp32, fp16 or bf16")
            state[k] = v.float()
    return state


def remap(state: dict[str, torch.Tensor], rules: list[KeyRule]) -> dict[str, torch.Tensor]:
    """Apply the first matching rule to every key; DROP rules discard, unmatched keys are errors."""
    out, unexpected = {}, []
    for key, value in state.items():
        for rule in rules:
            m = re.fullmatch(rule.src, key)
            if m:
                out.update(rule.apply(m, value, state))
                break
        else:
            unexpected.append(key)
    if unexpected:
        raise LoaderError(f"{len(unexpected)} unexpected checkpoint key(s), e.g. {', '.join(unexpected[:4])}")
    return out


def fill(model: nn.Module, state: dict[str, torch.Tensor]) -> nn.Module:
    """Load strictly: every model tensor filled with the right shape, no checkpoint tensor left over."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    extra = [k for k in state if k not in own]
    shapes = [f"{k} {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own if k in state and state[k].shape != own[k].shape]
    if missing or extra or shapes:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {', '.join(missing[:4])})")
        if extra:
            parts.append(f"{len(extra)} unexpected (e.g. {', '.join(extra[:4])})")
        if shapes:
            parts.append(f"{len(shapes)} shape mismatch(es) (e.g. {'; '.join(shapes[:3])})")
        raise LoaderError(f"weights do not fit {type(model).__name__}: " + "; ".join(parts))
    model.load_state_dict(state, strict=True)
    return model.eval()


def load_component(folder: str | Path, variant: str | None = None) -> nn.Module:
    """A diffusers component folder (config.json + safetensors: a transformer or a VAE) as our module, in fp32."""
    folder = Path(folder)
    config = read_config(folder)
    name = config.get("_class_name")
    if name not in FAMILIES:
        raise LoaderError(f"{str(folder)!r} holds a {name!r}; supported: {', '.join(sorted(FAMILIES))}")
    to_config, model_cls, rules = FAMILIES[name]
    model = model_cls(to_config(config))
    return fill(model, remap(read_state_dict(folder, variant), rules))


def _families() -> dict[str, tuple[Callable, type, list[KeyRule]]]:
    """diffusers `_class_name` -> (config converter, our module, key table)."""
    from ..models import dc_ae, dit, flux, mmdit, pixart, sana, vae_kl

    return {
        "DiTTransformer2DModel": (dit.config_from_diffusers, dit.DiT, keymaps.DIT),
        "Transformer2DModel": (dit.config_from_diffusers, dit.DiT, keymaps.DIT),  # legacy name of the same class
        "PixArtTransformer2DModel": (pixart.config_from_diffusers, pixart.PixArt, keymaps.PIXART),
        "SanaTransformer2DModel": (sana.config_from_diffusers, sana.Sana, keymaps.SANA),
        "AutoencoderKL": (vae_kl.config_from_diffusers, vae_kl.VAEDecoder, keymaps.VAE_KL),
        "AutoencoderDC": (dc_ae.config_from_diffusers, dc_ae.DCAEDecoder, keymaps.DC_AE),
        "SD3Transformer2DModel": (mmdit.config_from_diffusers, mmdit.MMDiT, keymaps.MMDIT),
        "FluxTransformer2DModel": (flux.config_from_diffusers, flux.Flux, keymaps.FLUX),
    }


FAMILIES = _families()
