"""Custom ops shared by the model families, each with a reference, a fake impl and two ONNX lowerings.

How an op call is lowered is chosen in one place, `lowering(mode)`:
  "op"        dispatch through torch.ops.dit.* (eager torch; on CUDA tensors the csrc/ kernels, see kernels/torch_ops)
  "reference" inline the plain-torch reference (training, and the portable ONNX lowering)
  "plugin"    one typed custom node per call, which TensorRT's ONNX parser maps to our plugin
  "kernels"   dispatch through torch.ops.ditrt.*, the C++ torch ops of kernels/cpp_ops (the csrc/ kernels on CUDA,
              the reference maths on CPU, Meta shapes), which AOTInductor packages also run from C++; the
              plain-torch reference, after one warning, where that library cannot be built or loaded here
"""

import contextlib
import contextvars

MODES = ("op", "reference", "plugin", "kernels")
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


def dispatch(
    plugin_name: str,
    plugin_version: str,
    op,
    reference,
    inputs: tuple,
    eps: float,
    outputs: int = 1,
    *,
    name: str,
):
    """Call op `name` the way `lowering` says: the custom op, its plain-torch reference, a typed plugin node
    (op type = plugin name, with plugin_namespace/plugin_version attributes, `outputs` outputs shaped like
    inputs[0]; a tuple of them when outputs > 1), or the C++ op torch.ops.ditrt.<name>."""
    mode = _mode.get()
    if mode == "kernels":
        from ..kernels import cpp_ops

        if cpp_ops.available() is None:  # warned once
            return reference(*inputs, eps)
        import torch

        return getattr(torch.ops.ditrt, name)(*inputs, eps)
    if mode == "reference":
        return reference(*inputs, eps)
    if mode == "plugin":
        import torch

        attrs = {"eps": float(eps), "plugin_namespace": PLUGIN_NAMESPACE, "plugin_version": plugin_version}
        if outputs > 1:
            return tuple(
                torch.onnx.ops.symbolic_multi_out(
                    f"{PLUGIN_NAMESPACE}::{plugin_name}",
                    inputs,
                    attrs,
                    dtypes=[inputs[0].dtype] * outputs,
                    shapes=[inputs[0].shape] * outputs,
                    version=1,
                )
            )
        return torch.onnx.ops.symbolic(
            f"{PLUGIN_NAMESPACE}::{plugin_name}",
            inputs,
            attrs,
            dtype=inputs[0].dtype,
            shape=inputs[0].shape,
            version=1,
        )
    return op(*inputs, eps)


from ..kernels.torch_ops import install as _install_cuda_kernels  # noqa: E402
from .adaln import adaln_modulate  # noqa: E402  (registers dit::adaln_modulate)
from .adaln_residual import adaln_modulate_residual  # noqa: E402  (registers dit::adaln_modulate_residual)
from .linear_attention import linear_attention  # noqa: E402  (registers dit::linear_attention)

_install_cuda_kernels()  # CUDA-dispatch entries that load the kernels on first CUDA call: nothing compiles here

__all__ = [
    "MODES",
    "PLUGIN_NAMESPACE",
    "adaln_modulate",
    "adaln_modulate_residual",
    "current_lowering",
    "linear_attention",
    "lowering",
]
