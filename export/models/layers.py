"""Leaves shared by every family: timestep embedding, patchify, AdaLN modulation, attention, MLP.

Semantics follow diffusers (see reference/architectures.md §0); each numeric quirk is an argument.
"""

import math
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ditrt.runtime.errors import ConfigError

from ..ops import adaln_modulate, adaln_modulate_residual, linear_attention

# --- fp32 islands: below fp32, norm statistics and softmax run in fp32 between two Casts (kept by a strongly typed
# TensorRT build); in fp32 every .float() here is a no-op, so fp32 graphs and results are unchanged. --------------


def _f32(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.float()


class FP32LayerNorm(nn.LayerNorm):
    """nn.LayerNorm with its statistics in fp32 whatever the activation dtype (diffusers' FP32LayerNorm)."""

    def forward(self, x: Tensor) -> Tensor:
        return F.layer_norm(
            x.float(), self.normalized_shape, _f32(self.weight), _f32(self.bias), self.eps
        ).to(x.dtype)


class FP32GroupNorm(nn.GroupNorm):
    """nn.GroupNorm with its statistics in fp32 whatever the activation dtype."""

    def forward(self, x: Tensor) -> Tensor:
        return F.group_norm(x.float(), self.num_groups, _f32(self.weight), _f32(self.bias), self.eps).to(
            x.dtype
        )


def sdpa(q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None = None) -> Tensor:
    """softmax(q·kᵀ/√d + bias)·v over (B, heads, S, d). fp32: torch's SDPA as is. fp16/bf16: explicit, q scaled
    first (so q·kᵀ stays in range) and the softmax in fp32, as flash attention keeps its scores."""
    if q.dtype == torch.float32:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-1, -2)
    if (
        bias is not None
    ):  # a keep-mask bias (0 or -10000): the same softmax whether added before or after the Cast
        scores = scores + bias
    return scores.float().softmax(dim=-1).to(q.dtype) @ v


def timestep_freqs(dim: int, freq_shift: float = 0.0, max_period: float = 10000.0) -> Tensor:
    """The sinusoid's (dim/2,) frequencies exp(−ln(max_period)·i/(dim/2 − freq_shift)), fp32, as torch computes them
    (diffusers' get_timestep_embedding). Computed here, eagerly, so that an exported graph holds them as a constant:
    an in-graph Exp (and the exporter's folding of it) is 1–2 ulp off in 54 of 128 entries, which moves the sin/cos
    arguments by up to 1e-4 at t = 1000."""
    half = dim // 2
    exponent = (
        -math.log(max_period) * torch.arange(half, dtype=torch.float32, device="cpu") / (half - freq_shift)
    )
    return torch.exp(exponent)


def timestep_embedding(t: Tensor, freqs: Tensor) -> Tensor:
    """Sinusoid [cos, sin] of t (B,) at freqs (dim/2,) from `timestep_freqs` -> (B, dim), fp32."""
    args = t.float()[:, None] * freqs.to(t.device)[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class TimestepEmbedder(nn.Module):
    """Sinusoid (256) -> Linear -> SiLU -> Linear, as diffusers' Timesteps + TimestepEmbedding.

    freq_shift=1 is diffusers' DiT, 0 the original DiT/SD3/Flux. The frequency table is a plain attribute, not a
    buffer: no state-dict key, and `.to(fp16)` leaves it fp32.
    """

    def __init__(self, hidden_size: int, freq_dim: int = 256, freq_shift: float = 0.0):
        super().__init__()
        self.freqs = timestep_freqs(freq_dim, freq_shift)
        self.linear_1 = nn.Linear(freq_dim, hidden_size)
        self.linear_2 = nn.Linear(hidden_size, hidden_size)

    def forward(self, t: Tensor) -> Tensor:
        emb = timestep_embedding(t, self.freqs).to(self.linear_1.weight.dtype)
        return self.linear_2(F.silu(self.linear_1(emb)))


def sincos_pos_embed_2d(dim: int, h: int, w: int, base_size: int, interpolation_scale: float = 1.0) -> Tensor:
    """Fixed 2-D sin-cos table (h·w, dim), row-major tokens; first half encodes the column (w), second the row.

    Computed in fp64 on the host with numpy (diffusers computes it in fp64 with torch: the same fp32 table, bit for
    bit, measured on 21M entries) and returned as a constant: traced torch ops would leave fp64 Sin/Cos in the
    exported graph wherever the exporter does not fold them (TensorRT has no fp64).
    """
    grid_h = np.arange(h, dtype=np.float64) / (h / base_size) / interpolation_scale
    grid_w = np.arange(w, dtype=np.float64) / (w / base_size) / interpolation_scale
    gh, gw = np.meshgrid(grid_h, grid_w, indexing="ij")
    omega = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float64) / (dim / 4))

    def half(pos: np.ndarray) -> np.ndarray:
        out = pos.reshape(-1)[:, None] * omega[None]
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    return torch.from_numpy(np.concatenate([half(gw), half(gh)], axis=1).astype(np.float32))


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
    return x.permute(0, 5, 1, 3, 2, 4).reshape(
        x.shape[0], c, h * p, w * p
    )  # a Transpose (ONNX Einsum has no bf16)


# --- modulation: one value type from two sources (BFL's `Modulation`, PixArt's adaLN-single table) ---------

GATED = ("shift", "scale", "gate")  # AdaLN-Zero order: diffusers' AdaLayerNormZero(Single), BFL, DiT
SHIFT_SCALE = ("shift", "scale")  # final layers: no gate


class ModulationOut(NamedTuple):
    shift: Tensor  # (B, D)
    scale: Tensor  # (B, D)
    gate: Tensor | None = None  # (B, D)


def modulation_outs(chunks: Sequence[Tensor], fields: tuple[str, ...]) -> list[ModulationOut]:
    """Consecutive (B, D) chunks, len(fields) per ModulationOut, named by fields in their stored order."""
    k = len(fields)
    return [ModulationOut(**dict(zip(fields, chunks[i : i + k]))) for i in range(0, len(chunks), k)]


class Modulation(nn.Linear):
    """BFL's Modulation: Linear(SiLU(vec)) (B, D) -> n ModulationOuts, chunks stored in `fields` order.

    n=1: Flux single blocks (AdaLayerNormZeroSingle) and final layers; n=2: DiT, MMDiT and Flux blocks
    (AdaLayerNormZero: msa, mlp); n=3: SD3.5's MMDiT-X blocks (msa, mlp, msa2).
    It is the Linear itself, so its state-dict keys stay `<name>.weight` and `<name>.bias`.
    """

    def __init__(self, dim: int, n: int = 1, fields: tuple[str, ...] = GATED):
        super().__init__(dim, n * len(fields) * dim)
        self.fields = fields
        self.chunks = n * len(fields)

    def forward(self, vec: Tensor) -> list[ModulationOut]:
        return modulation_outs(super().forward(F.silu(vec)).chunk(self.chunks, dim=-1), self.fields)


def table_modulation(table: Tensor, emb: Tensor, fields: tuple[str, ...] = GATED) -> list[ModulationOut]:
    """adaLN-single (PixArt-α §2.3): a learned table (k, D) plus a shared embedding, either k rows of it
    (B, k·D) or one row (B, D) added to every table row -> the k rows grouped as `modulation_outs` does."""
    rows = table[None] + emb.view(emb.shape[0], -1, table.shape[-1])  # (B, k, D)
    return modulation_outs(rows.unbind(1), fields)


def modulate(x: Tensor, mod: ModulationOut, eps: float = 1e-6) -> Tensor:
    """LN(x)·(1 + scale) + shift: the single call site of the adaln_modulate op."""
    return adaln_modulate(x, mod.shift, mod.scale, eps)


def gated_modulate(
    x: Tensor, y: Tensor, gate: Tensor, mod: ModulationOut, eps: float = 1e-6
) -> tuple[Tensor, Tensor]:
    """(x + gate·y, modulate(x + gate·y, mod)) as one fused op: a sub-block's gated residual and the next
    sub-block's modulation."""
    return adaln_modulate_residual(x, y, gate, mod.shift, mod.scale, eps)


class Attention(nn.Module):
    """Multi-head self-attention through `sdpa` (softmax in fp32 at every precision).

    qk_norm: per-head RMSNorm on q and k (SD3.5, Flux); out_proj=False leaves the heads unprojected (Flux single
    blocks project attention and MLP together; the last SD3 block discards its text output).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        bias: bool = True,
        qk_norm: bool = False,
        eps: float = 1e-6,
        out_proj: bool = True,
    ):
        super().__init__()
        if dim % num_heads:
            raise ConfigError(f"hidden size {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.to_q = nn.Linear(dim, dim, bias=bias)
        self.to_k = nn.Linear(dim, dim, bias=bias)
        self.to_v = nn.Linear(dim, dim, bias=bias)
        self.norm_q = RMSNorm(dim // num_heads, eps) if qk_norm else nn.Identity()
        self.norm_k = RMSNorm(dim // num_heads, eps) if qk_norm else nn.Identity()
        self.to_out = nn.Linear(dim, dim, bias=bias) if out_proj else nn.Identity()

    def qkv(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(B, N, D) -> q, k, v as (B, heads, N, head_dim), q and k normalised per head."""
        q, k, v = (split_heads(proj(x), self.num_heads) for proj in (self.to_q, self.to_k, self.to_v))
        return self.norm_q(q), self.norm_k(k), v

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor] | None = None) -> Tensor:
        return self.to_out(attention(*self.qkv(x), rope))


class FeedForward(nn.Module):
    """Linear -> GELU(tanh) -> Linear, token by token (the grid argument is GLUMBConv's, and unused here)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor, grid: tuple[int, int] | None = None) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class FinalLayer(nn.Module):
    """AdaLN (shift, scale) then Linear to p·p·C_out per token."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.adaLN = Modulation(hidden_size, 1, SHIFT_SCALE)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        (mod,) = self.adaLN(c)
        return self.linear(modulate(x, mod))


# --- cross-attention, linear attention, Mix-FFN (PixArt, Sana) ----------------------------------------------


class RMSNorm(nn.Module):
    """x·rsqrt(mean(x²) + eps)·weight, statistics in fp32 (diffusers RMSNorm)."""

    def __init__(self, dim: int, eps: float = 1e-6, affine: bool = True):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim)) if affine else None

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        y = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)
        return y * self.weight if self.weight is not None else y


class CaptionProjection(nn.Module):
    """Text features -> model width: Linear -> GELU(tanh) -> Linear (PixArtAlphaTextProjection)."""

    def __init__(self, in_features: int, hidden_size: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_features, hidden_size)
        self.linear_2 = nn.Linear(hidden_size, hidden_size)

    def forward(self, y: Tensor) -> Tensor:
        return self.linear_2(F.gelu(self.linear_1(y), approximate="tanh"))


def mask_to_bias(mask: Tensor, dtype: torch.dtype) -> Tensor:
    """(B, T) keep-mask (1 = token, 0 = padding) -> additive (B, 1, 1, T) bias, −10000 on padding (diffusers)."""
    return ((1 - mask.to(dtype)) * -10000.0)[:, None, None, :]


class CrossAttention(Attention):
    """Queries from the image tokens, keys/values from the text; padded text masked by an additive bias."""

    def __init__(self, dim: int, context_dim: int, num_heads: int, bias: bool = True):
        super().__init__(dim, num_heads, bias)
        self.to_k = nn.Linear(context_dim, dim, bias=bias)
        self.to_v = nn.Linear(context_dim, dim, bias=bias)

    def forward(self, x: Tensor, context: Tensor, bias: Tensor | None = None) -> Tensor:
        B, N, C = x.shape
        q = self.to_q(x).view(B, N, self.num_heads, -1).transpose(1, 2)  # (B, heads, N, d)
        k, v = (
            p(context).view(B, context.shape[1], self.num_heads, -1).transpose(1, 2)
            for p in (self.to_k, self.to_v)
        )
        out = sdpa(q, k, v, bias)
        return self.to_out(out.transpose(1, 2).reshape(B, N, C))


class LinearAttention(Attention):
    """Sana's ReLU linear attention through the dit::linear_attention op; q/k/v without bias, output with."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__(dim, num_heads, bias=False)
        self.to_out = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        B, N, C = x.shape
        q, k, v = (
            p(x).view(B, N, self.num_heads, -1).transpose(1, 2) for p in (self.to_q, self.to_k, self.to_v)
        )
        out = linear_attention(q, k, v)  # (B, heads, N, d)
        return self.to_out(out.transpose(1, 2).reshape(B, N, C))


class GLUMBConv(nn.Module):
    """Sana's Mix-FFN on the token grid: 1×1 expand -> SiLU -> depthwise 3×3 -> GLU (x·SiLU(gate)) -> 1×1."""

    def __init__(self, dim: int, ratio: float):
        super().__init__()
        hidden = int(dim * ratio)
        self.conv_inverted = nn.Conv2d(dim, 2 * hidden, 1)
        self.conv_depth = nn.Conv2d(2 * hidden, 2 * hidden, 3, padding=1, groups=2 * hidden)
        self.conv_point = nn.Conv2d(hidden, dim, 1, bias=False)

    def forward(self, x: Tensor, grid: tuple[int, int]) -> Tensor:
        """x (B, h·w, C) row-major tokens of the (h, w) grid -> (B, h·w, C)."""
        B, N, C = x.shape
        image = x.transpose(1, 2).reshape(B, C, *grid)  # (B, C, h, w)
        y, gate = self.conv_depth(F.silu(self.conv_inverted(image))).chunk(2, dim=1)
        return self.conv_point(y * F.silu(gate)).flatten(2).transpose(1, 2)


# --- joint attention, RoPE, pooled-text embedding (SD3/SD3.5 MMDiT, Flux) ------------------------------------------


class MLPEmbedder(nn.Module):
    """Linear -> SiLU -> Linear: the pooled-text projection of SD3/Flux (PixArtAlphaTextProjection, act "silu")."""

    def __init__(self, in_features: int, hidden_size: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_features, hidden_size)
        self.linear_2 = nn.Linear(hidden_size, hidden_size)

    def forward(self, y: Tensor) -> Tensor:
        return self.linear_2(F.silu(self.linear_1(y)))


def split_heads(x: Tensor, num_heads: int) -> Tensor:
    """(B, N, heads·d) -> (B, heads, N, d)."""
    return x.view(x.shape[0], x.shape[1], num_heads, -1).transpose(1, 2)


def attention(q: Tensor, k: Tensor, v: Tensor, rope: tuple[Tensor, Tensor] | None = None) -> Tensor:
    """SDPA over q, k, v (B, heads, S, d), RoPE on q and k first if given -> (B, S, heads·d)."""
    if rope is not None:
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
    return sdpa(q, k, v).transpose(1, 2).flatten(2)


class JointAttention(nn.Module):
    """MMDiT attention: image and text keep their own projections and qk-norms; one SDPA over [text; image].

    No mask: padded text tokens are attended (SD3, Flux). Token order matters only for RoPE ids; [text; image] is
    Flux's, and SD3 (no RoPE) gives the same result as diffusers' [image; text] up to float summation order.
    """

    def __init__(self, dim: int, num_heads: int, qk_norm: bool = False, context_out: bool = True):
        super().__init__()
        self.img = Attention(dim, num_heads, qk_norm=qk_norm)
        self.txt = Attention(dim, num_heads, qk_norm=qk_norm, out_proj=context_out)

    def forward(
        self, x: Tensor, c: Tensor, rope: tuple[Tensor, Tensor] | None = None
    ) -> tuple[Tensor, Tensor]:
        """x (B, N, D) image and c (B, T, D) text tokens -> their attention outputs, same shapes."""
        T = c.shape[1]
        q, k, v = (
            torch.cat(pair, dim=2) for pair in zip(self.txt.qkv(c), self.img.qkv(x))
        )  # (B, heads, T+N, d)
        out = attention(q, k, v, rope)  # (B, T+N, D)
        return self.img.to_out(out[:, T:]), self.txt.to_out(out[:, :T])


def rope_omega(axes_dims: tuple[int, ...], theta: float = 10000.0) -> Tensor:
    """Flux RoPE frequencies (sum(axes_dims)/2,), fp32: for each id axis a in turn, theta^(−2j/d_a), j < d_a/2.

    diffusers' FluxPosEmbed formula in fp64, rounded once. Computed eagerly, so that an exported graph holds them as
    a constant (an in-graph Pow is not torch's, and TensorRT has no fp64)."""
    return torch.cat(
        [1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float64, device="cpu") / d) for d in axes_dims]
    ).float()


def rope_freqs(ids: Tensor, axes_dims: tuple[int, ...], omega: Tensor) -> tuple[Tensor, Tensor]:
    """Flux RoPE tables: ids (S, n_axes) -> cos, sin (S, sum(axes_dims)) in fp32, each angle repeated for its pair.

    Axis a turns pair j by pos_a·omega (`rope_omega`). diffusers multiplies in fp64; in fp32 the angle error stays
    ~1e-5 rad at position 128.
    """
    pos = torch.cat(
        [ids[:, i : i + 1].float().expand(-1, d // 2) for i, d in enumerate(axes_dims)], dim=-1
    )  # (S, hd/2)
    angles = pos * omega.to(ids.device)[None]
    angles = torch.stack([angles, angles], dim=-1).flatten(-2)  # (S, head_dim): a0 a0 a1 a1 ...
    return angles.cos(), angles.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate adjacent pairs (x[2i], x[2i+1]) of x (B, heads, S, d) by the angles in cos/sin (S, d), in fp32."""
    xf = x.float()
    x0, x1 = xf.unflatten(-1, (-1, 2)).unbind(-1)  # (B, heads, S, d/2) each
    rotated = torch.stack([-x1, x0], dim=-1).flatten(-2)
    return (xf * cos + rotated * sin).to(x.dtype)
