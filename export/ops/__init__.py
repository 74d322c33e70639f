"""Custom ops shared by the model families, each with a reference, a fake impl and two ONNX lowerings.

How an op call is lowered is chosen in one place, `lowering(mode)`:
  "op"        dispatch through torch.ops.dit.* (eager torch; CUDA kernels register here later)
  "reference" inline the plain-torch reference (training, and the portable ONNX lowering)
  "plugin"    one typed custom node per call, which TensorRT's ONNX parser maps to our plugin
"""

import contextlib
import contextvars

MODES = ("op", "reference", "plugin")
PLUGIN_NAMESPACE = "dit"
_mode = contextvars.ContextVar("ditrt_lowering", default="op")


@contextlib.contextmanager
def lowering(mode: str):
    if mode not in MODES:
        raise ValueError(f"unknown op lowering {mode!r}; choose from {', '.join(MODES)}")
    token = _mode.set(mode)
    try:
        yield
    finally:
        _mode.reset(token)


def current_lowering() -> str:
    return _mode.get()


from .adaln import adaln_modulate  # noqa: E402  (registers dit::adaln_modulate)
from .linear_attention import linear_attention  # noqa: E402  (registers dit::linear_attention)

__all__ = ["MODES", "PLUGIN_NAMESPACE", "adaln_modulate", "current_lowering", "linear_attention", "lowering"]
