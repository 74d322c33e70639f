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


def dispatch(plugin_name: str, plugin_version: str, op, reference, inputs: tuple, eps: float):
    """Call an op the way `lowering` says: the custom op, its plain-torch reference, or a typed plugin node
    (op type = plugin name, with plugin_namespace/plugin_version attributes, output shaped like inputs[0])."""
    mode = _mode.get()
    if mode == "reference":
        return reference(*inputs, eps)
    if mode == "plugin":
        import torch

        attrs = {"eps": float(eps), "plugin_namespace": PLUGIN_NAMESPACE, "plugin_version": plugin_version}
        return torch.onnx.ops.symbolic(f"{PLUGIN_NAMESPACE}::{plugin_name}", inputs, attrs, dtype=inputs[0].dtype,
                                       shape=inputs[0].shape, version=1)
    return op(*inputs, eps)


from .adaln import adaln_modulate  # noqa: E402  (registers dit::adaln_modulate)
from .linear_attention import linear_attention  # noqa: E402  (registers dit::linear_attention)

__all__ = ["MODES", "PLUGIN_NAMESPACE", "adaln_modulate", "current_lowering", "linear_attention", "lowering"]
