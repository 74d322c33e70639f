"""dit::adaln_modulate_residual: the gated residual h = residual + gate·y, then adaln_modulate(h, shift, scale).

DiT, PixArt and Sana add a sub-block's output with `x = x + gate·f(x)` and the next sub-block starts with
`modulate(x, ...)`; fused, residual and y are read once and h and out written once.
Shapes: residual, y (B, N, D); gate, shift, scale (B, D); returns (h, out), both (B, N, D). h is rounded to the
input dtype before it is normalised, so out is what adaln_modulate of the stored h gives.
"""

import torch
from torch import Tensor

from . import adaln, dispatch

PLUGIN_NAME = "AdaLNModulateResidual"
PLUGIN_VERSION = "1"


def reference(
    residual: Tensor, y: Tensor, gate: Tensor, shift: Tensor, scale: Tensor, eps: float
) -> tuple[Tensor, Tensor]:
    h = (residual.float() + gate.float()[:, None] * y.float()).to(residual.dtype)
    return h, adaln.reference(h, shift, scale, eps)


@torch.library.custom_op("dit::adaln_modulate_residual", mutates_args=())
def _adaln_modulate_residual_op(
    residual: Tensor, y: Tensor, gate: Tensor, shift: Tensor, scale: Tensor, eps: float
) -> tuple[Tensor, Tensor]:
    h, out = reference(residual, y, gate, shift, scale, eps)
    return h.contiguous(), out.contiguous()


@_adaln_modulate_residual_op.register_fake
def _(
    residual: Tensor, y: Tensor, gate: Tensor, shift: Tensor, scale: Tensor, eps: float
) -> tuple[Tensor, Tensor]:
    torch._check(y.shape == residual.shape, lambda: "y must have the shape of residual (B, N, D)")
    for name, t in (("gate", gate), ("shift", shift), ("scale", scale)):
        torch._check(t.shape == (residual.shape[0], residual.shape[-1]), lambda: f"{name} must be (B, D)")
    return residual.new_empty(residual.shape), residual.new_empty(residual.shape)  # contiguous, as computed


def adaln_modulate_residual(
    residual: Tensor, y: Tensor, gate: Tensor, shift: Tensor, scale: Tensor, eps: float = 1e-6
) -> tuple[Tensor, Tensor]:
    """h = residual + gate·y and LN(h)·(1 + scale) + shift, for (B, N, D) tensors and (B, D) gate/shift/scale,
    lowered as `ops.lowering` says. Returns (h, out)."""
    return dispatch(
        PLUGIN_NAME,
        PLUGIN_VERSION,
        _adaln_modulate_residual_op,
        reference,
        (residual, y, gate, shift, scale),
        eps,
        outputs=2,
        name="adaln_modulate_residual",
    )
