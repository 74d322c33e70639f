"""dit::adaln_modulate: LayerNorm without affine, then x·(1 + scale) + shift with per-sample scale/shift.

Bandwidth-bound (one read of x, one write), which is why it gets its own kernel/plugin.
Shapes: x (B, N, D); shift, scale (B, D). Statistics in fp32 whatever the I/O dtype.
"""

import torch
import torch.nn.functional as F
from torch import Tensor

from . import dispatch

PLUGIN_NAME = "AdaLNModulate"
PLUGIN_VERSION = "1"


def reference(x: Tensor, shift: Tensor, scale: Tensor, eps: float) -> Tensor:
    y = F.layer_norm(x.float(), (x.shape[-1],), eps=eps)
    return (y * (1 + scale.float()[:, None]) + shift.float()[:, None]).to(x.dtype)


@torch.library.custom_op("dit::adaln_modulate", mutates_args=())
def _adaln_modulate_op(x: Tensor, shift: Tensor, scale: Tensor, eps: float) -> Tensor:
    return reference(x, shift, scale, eps).contiguous()


@_adaln_modulate_op.register_fake
def _(x: Tensor, shift: Tensor, scale: Tensor, eps: float) -> Tensor:
    torch._check(shift.shape == (x.shape[0], x.shape[-1]), lambda: "shift must be (B, D)")
    torch._check(scale.shape == (x.shape[0], x.shape[-1]), lambda: "scale must be (B, D)")
    return x.new_empty(x.shape)  # contiguous, as every implementation returns it


def adaln_modulate(x: Tensor, shift: Tensor, scale: Tensor, eps: float = 1e-6) -> Tensor:
    """LN(x)·(1 + scale) + shift for x (B, N, D) and shift/scale (B, D), lowered as `ops.lowering` says."""
    return dispatch(
        PLUGIN_NAME,
        PLUGIN_VERSION,
        _adaln_modulate_op,
        reference,
        (x, shift, scale),
        eps,
        name="adaln_modulate",
    )
