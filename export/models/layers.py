"""Leaves shared by every family: timestep embedding, patchify, AdaLN modulation, attention, MLP.

Semantics follow diffusers (see reference/architectures.md §0); each numeric quirk is an argument.
"""

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops import adaln_modulate


def timestep_embedding(t: Tensor, dim: int, freq_shift: float = 0.0, max_period: float = 10000.0) -> Tensor:
    """Sinusoid [cos, sin] of t (B,) -> (B, dim). freq_shift=1 is diffusers' DiT, 0 the original DiT/SD3/Flux."""
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / (half - freq_shift)
    args = t.float()[:, None] * torch.exp(exponent)[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class TimestepEmbedder(nn.Module):
    """Sinusoid (256) -> Linear -> SiLU -> Linear, as diffusers' Timesteps + TimestepEmbedding."""

    def __init__(self, hidden_size: int, freq_dim: int = 256, freq_shift: float = 0.0):
        super().__init__()
        self.freq_dim, self.freq_shift = freq_dim, freq_shift
        self.linear_1 = nn.Linear(freq_dim, hidden_size)
        self.linear_2 = nn.Linear(hidden_size, hidden_size)

    def forward(self, t: Tensor) -> Tensor:
        emb = timestep_embedding(t, self.freq_dim, self.freq_shift).to(self.linear_1.weight.dtype)
        return self.linear_2(F.silu(self.linear_1(emb)))


def sincos_pos_embed_2d(dim: int, h: int, w: int, base_size: int, interpolation_scale: float = 1.0) -> Tensor:
    """Fixed 2-D sin-cos table (h·w, dim), row-major tokens; first half encodes the column (w), second the row."""
    grid_h = torch.arange(h, dtype=torch.float64) / (h / base_size) / interpolation_scale
    grid_w = torch.arange(w, dtype=torch.float64) / (w / base_size) / interpolation_scale
    gh, gw = torch.meshgrid(grid_h, grid_w, indexing="ij")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))

    def half(pos: Tensor) -> Tensor:
        out = pos.reshape(-1)[:, None] * omega[None]
        return torch.cat([torch.sin(out), torch.cos(out)], dim=1)

    return torch.cat([half(gw), half(gh)], dim=1).float()


class PatchEmbed(nn.Module):
    """Conv2d(k=p, s=p) then row-major tokens: (B, C, H, W) -> (B, H/p·W/p, D)."""

    def __init__(self, in_channels: int, hidden_size: int, patch_size: int):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


def unpatchify(x: Tensor, h: int, w: int, p: int, c: int) -> Tensor:
    """(B, h·w, p·p·c) -> (B, c, h·p, w·p)."""
    x = x.reshape(x.shape[0], h, w, p, p, c)
    return torch.einsum("nhwpqc->nchpwq", x).reshape(x.shape[0], c, h * p, w * p)


class Modulation(NamedTuple):
    shift: Tensor  # (B, D)
    scale: Tensor  # (B, D)
    gate: Tensor | None = None  # (B, D)


def modulate(x: Tensor, mod: Modulation, eps: float = 1e-6) -> Tensor:
    """LN(x)·(1 + scale) + shift: the single call site of the adaln_modulate op."""
    return adaln_modulate(x, mod.shift, mod.scale, eps)


def adaln_zero(linear: nn.Linear, c: Tensor) -> tuple[Modulation, Modulation]:
    """AdaLN-Zero: Linear(SiLU(c)) chunked shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp."""
    s1, c1, g1, s2, c2, g2 = linear(F.silu(c)).chunk(6, dim=-1)
    return Modulation(s1, c1, g1), Modulation(s2, c2, g2)


class Attention(nn.Module):
    """Multi-head self-attention with SDPA (softmax in the math kernel, fp32 on CPU)."""

    def __init__(self, dim: int, num_heads: int, bias: bool = True):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"hidden size {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.to_q = nn.Linear(dim, dim, bias=bias)
        self.to_k = nn.Linear(dim, dim, bias=bias)
        self.to_v = nn.Linear(dim, dim, bias=bias)
        self.to_out = nn.Linear(dim, dim, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        B, N, C = x.shape
        q, k, v = (proj(x).view(B, N, self.num_heads, -1).transpose(1, 2) for proj in (self.to_q, self.to_k, self.to_v))
        out = F.scaled_dot_product_attention(q, k, v)  # (B, heads, N, head_dim)
        return self.to_out(out.transpose(1, 2).reshape(B, N, C))


class FeedForward(nn.Module):
    """Linear -> GELU(tanh) -> Linear."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class FinalLayer(nn.Module):
    """AdaLN (shift, scale) then Linear to p·p·C_out per token."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.adaLN = nn.Linear(hidden_size, 2 * hidden_size)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        shift, scale = self.adaLN(F.silu(c)).chunk(2, dim=-1)
        return self.linear(modulate(x, Modulation(shift, scale)))
