"""dit::linear_attention: Sana's ReLU linear attention, O(N·d²) per head, never an N×N matrix.

    q, k = relu(q), relu(k)                    # (B, H, N, d)
    out_n = (Σ_m v_m k_mᵀ) q_n / max(q_n·Σ_m k_m, eps)

The K/V state (d×d) and the normaliser are summed in fp32 whatever the I/O dtype (diffusers and the original
LiteLA both upcast); eps = 1e-15 as in diffusers (the original Sana code uses the same value).
DC-AE's attention (diffusers' SanaMultiscaleLinearAttention.apply_linear_attention) is the same op: it pads V
with a ones row and computes [V; 1]·Kᵀ·Q over a (B, H, d, N) layout, which the decoder transposes to ours.
"""

import torch
import torch.nn.functional as F
from torch import Tensor

from . import dispatch

PLUGIN_NAME = "LinearAttention"
PLUGIN_VERSION = "1"
EPS = 1e-15


def reference(q: Tensor, k: Tensor, v: Tensor, eps: float) -> Tensor:
    qf, kf, vf = F.relu(q).float(), F.relu(k).float(), v.float()
    kv = kf.transpose(-1, -2) @ vf  # (B, H, d, d): Σ_n k_n v_nᵀ
    num = qf @ kv  # (B, H, N, d)
    den = qf @ kf.sum(dim=2).unsqueeze(-1)  # (B, H, N, 1): q_n · Σ_n k_n ≥ 0
    # max(den, eps), not den + eps: the ONNX optimizer drops an Add of a constant below ~1e-8, which turns 0/eps
    # into 0/0. For den ≥ 2e-8 both are the same float32; below that both leave a numerator that is ~0.
    return (num / den.clamp_min(eps)).to(q.dtype)


@torch.library.custom_op("dit::linear_attention", mutates_args=())
def _linear_attention_op(q: Tensor, k: Tensor, v: Tensor, eps: float) -> Tensor:
    return reference(q, k, v, eps).contiguous()


@_linear_attention_op.register_fake
def _(q: Tensor, k: Tensor, v: Tensor, eps: float) -> Tensor:
    torch._check(q.shape == k.shape == v.shape, lambda: "q, k, v must have the same (B, H, N, d) shape")
    return q.new_empty(q.shape)  # contiguous, as every implementation returns it


def linear_attention(q: Tensor, k: Tensor, v: Tensor, eps: float = EPS) -> Tensor:
    """ReLU linear attention on (B, heads, N, d) tensors, lowered as `ops.lowering` says."""
    return dispatch(
        PLUGIN_NAME, PLUGIN_VERSION, _linear_attention_op, reference, (q, k, v), eps, name="linear_attention"
    )
