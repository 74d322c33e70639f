"""The table of models `dit-export` can build by name. A row is data: config, weights, sampler defaults."""

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from ditrt.runtime.errors import ConfigError, LoaderError

from .demos import DIGITS_CONFIG, DIGITS_WEIGHTS
from .models.dit import DiT, DiTConfig


@dataclass(frozen=True)
class Builtin:
    name: str
    description: str
    config: DiTConfig
    weights: Path  # safetensors shipped in the package
    class_names: tuple[str, ...]
    scheduler: str = "flow_euler"
    shift: float = 1.0
    default_steps: int = 20
    default_guidance: float = 4.0


BUILTINS = {b.name: b for b in [
    Builtin("digits", "class-conditional DiT trained on scikit-learn's 8x8 digits (16x16 grayscale, classes 0-9)",
            DIGITS_CONFIG, DIGITS_WEIGHTS, tuple(str(i) for i in range(10)), default_steps=20, default_guidance=3.0),
]}


def get_builtin(name: str) -> Builtin:
    if name not in BUILTINS:
        raise ConfigError(f"unknown model {name!r}; built-in models: {', '.join(BUILTINS)} (see dit-export --list)")
    return BUILTINS[name]


def load_builtin(b: Builtin) -> DiT:
    """Build the model and load its shipped weights strictly (every key used, every parameter filled), in fp32."""
    from safetensors.torch import load_file

    if not b.weights.is_file():
        raise LoaderError(f"weights for {b.name!r} are missing at {str(b.weights)!r}; reinstall the package")
    model = DiT(b.config)
    state = {k: v.float() for k, v in load_file(b.weights).items()}
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise LoaderError(f"weights {str(b.weights)!r} do not fit model {b.name!r}: {str(e).splitlines()[0]}") from None
    return model.eval()


def training_info(b: Builtin) -> dict:
    from safetensors import safe_open

    with safe_open(str(b.weights), "pt") as f:
        return json.loads((f.metadata() or {}).get("training", "{}"))
