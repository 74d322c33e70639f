"""The two transformer blocks that families share, built from the leaves in `layers`.

CrossDiTBlock: adaLN-single, self-attention, cross-attention to the text, FFN (PixArt, Sana).
JointBlock: the MMDiT block, image and text streams with their own weights joined in one attention (SD3/SD3.5,
Flux's double-stream blocks).
What differs between families is a constructor argument, visible where a family builds its blocks.
"""

import torch
from torch import Tensor, nn

from .layers import (
    SHIFT_SCALE,
    Attention,
    CrossAttention,
    FeedForward,
    JointAttention,
    Modulation,
    modulate,
    table_modulation,
)

# PixArt's and Sana's output LayerNorm: diffusers hard-codes eps 1e-6 there whatever the blocks' norm_eps
# (PixArtTransformer2DModel.norm_out, SanaTransformer2DModel.norm_out = SanaModulatedNorm(..., eps=1e-6)).
OUTPUT_NORM_EPS = 1e-6


def clip_fp16(x: Tensor) -> Tensor:
    """diffusers clips Flux's residual streams to ±65504 in fp16 so that they cannot overflow to inf."""
    return x.clip(-65504, 65504) if x.dtype == torch.float16 else x


class CrossDiTBlock(nn.Module):
    """PixArt's block (PixArt-α §2.3), kept by Sana: adaLN-single modulation (a learned (6, D) table plus the
    shared t6), self-attention, cross-attention to the text with no norm and no gate, FFN.

    What differs is passed in. attn: PixArt's softmax `Attention`, Sana's ReLU `LinearAttention`.
    ff, called as ff(x, grid): PixArt's `FeedForward` (token by token), Sana's `GLUMBConv` (over the grid).
    eps: the LayerNorms before attn and ff (diffusers' norm_eps).
    """

    def __init__(self, dim: int, attn: nn.Module, cross_attn: CrossAttention, ff: nn.Module, eps: float):
        super().__init__()
        self.eps = eps
        self.scale_shift_table = nn.Parameter(torch.zeros(6, dim))
        self.attn = attn
        self.cross_attn = cross_attn
        self.ff = ff

    def forward(
        self, x: Tensor, t6: Tensor, y: Tensor, y_bias: Tensor | None, grid: tuple[int, int]
    ) -> Tensor:
        """x (B, h·w, D) tokens of the (h, w) grid, t6 (B, 6D), text y (B, T, D_y), y_bias (B, 1, 1, T) or
        None -> new x, same shape."""
        msa, mlp = table_modulation(self.scale_shift_table, t6)
        x = x + msa.gate[:, None] * self.attn(modulate(x, msa, self.eps))
        x = x + self.cross_attn(x, y, y_bias)  # no norm and no gate on the cross-attention branch
        return x + mlp.gate[:, None] * self.ff(modulate(x, mlp, self.eps), grid)


def output_norm(x: Tensor, table: Tensor, emb: Tensor) -> Tensor:
    """PixArt/Sana output norm: LN(x) (B, N, D) modulated by table (2, D) plus the *un-projected* timestep
    embedding emb (B, D), which is added to both rows (shift, scale)."""
    (mod,) = table_modulation(table, emb, SHIFT_SCALE)
    return modulate(x, mod, OUTPUT_NORM_EPS)


class JointBlock(nn.Module):
    """The MMDiT block (Esser et al. 2024): diffusers' JointTransformerBlock (SD3) and FluxTransformerBlock
    (BFL's DoubleStreamBlock): each stream has its own modulation, projections and FFN; one shared attention.

    qk_norm: per-head RMSNorm on q and k (SD3.5, Flux). context_pre_only: the last SD3 block, whose text only
    lends keys and values (diffusers' AdaLayerNormContinuous: shift and scale stored scale first, no gates, no
    text FFN). dual_attention: SD3.5-medium's MMDiT-X, an image-only attention from a third modulation.
    clip_context: Flux, whose text stream diffusers clips to the fp16 range.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qk_norm: bool = False,
        context_pre_only: bool = False,
        dual_attention: bool = False,
        clip_context: bool = False,
    ):
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.context_pre_only = context_pre_only
        self.dual_attention = dual_attention
        self.clip_context = clip_context
        self.adaLN = Modulation(dim, 3 if dual_attention else 2)
        if context_pre_only:
            self.adaLN_context = Modulation(dim, 1, ("scale", "shift"))
        else:
            self.adaLN_context = Modulation(dim, 2)
        self.attn = JointAttention(dim, num_heads, qk_norm, context_out=not context_pre_only)
        if dual_attention:
            self.attn2 = Attention(dim, num_heads, qk_norm=qk_norm)
        self.ff = FeedForward(dim, hidden)
        if not context_pre_only:
            self.ff_context = FeedForward(dim, hidden)

    def forward(
        self, x: Tensor, c: Tensor, temb: Tensor, rope: tuple[Tensor, Tensor] | None = None
    ) -> tuple[Tensor, Tensor]:
        """x (B, N, D) image and c (B, T, D) text tokens, temb (B, D), RoPE tables of [text; image] or None
        -> new (x, c); a context_pre_only block returns c as it came."""
        msa, mlp, *x_extra = self.adaLN(temb)  # x_extra: [msa2] in an MMDiT-X block
        c_msa, *c_extra = self.adaLN_context(temb)  # c_extra: [c_mlp], none in a context_pre_only block
        a_x, a_c = self.attn(modulate(x, msa), modulate(c, c_msa), rope)
        h = x + msa.gate[:, None] * a_x
        if self.dual_attention:  # MMDiT-X: a third modulation of the same LN(x) feeds an image-only attention
            msa2 = x_extra[0]
            h = h + msa2.gate[:, None] * self.attn2(modulate(x, msa2))
        h = h + mlp.gate[:, None] * self.ff(modulate(h, mlp))
        if self.context_pre_only:
            return h, c
        c_mlp = c_extra[0]
        c = c + c_msa.gate[:, None] * a_c
        c = c + c_mlp.gate[:, None] * self.ff_context(modulate(c, c_mlp))
        return h, clip_fp16(c) if self.clip_context else c  # diffusers clips only the text stream here
