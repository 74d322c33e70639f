"""Sana: linear DiT with ReLU linear attention, Mix-FFN (GLUMBConv), adaLN-single and Gemma-2 text (Xie et al. 2024)."""

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ditrt.runtime.errors import ConfigError

from .layers import (CaptionProjection, CrossAttention, GLUMBConv, LinearAttention, PatchEmbed, RMSNorm,
                     TimestepEmbedder, adaln_single, final_adaln_single, mask_to_bias, modulate, sincos_pos_embed_2d,
                     unpatchify)


@dataclass(frozen=True)
class SanaConfig:
    sample_size: int = 32  # latent height = width (DC-AE f32: pixels / 32)
    in_channels: int = 32
    out_channels: int = 32
    patch_size: int = 1
    hidden_size: int = 2240
    depth: int = 20
    num_heads: int = 70  # linear self-attention heads (head dim 32)
    cross_num_heads: int = 20  # softmax cross-attention heads
    caption_channels: int = 2304  # Gemma-2-2B width
    mlp_ratio: float = 2.5
    interpolation_scale: float | None = None  # None: no position embedding (512/1024 models); 2K/4K use sin-cos
    norm_eps: float = 1e-6

    def __post_init__(self):
        for heads in (self.num_heads, self.cross_num_heads):
            if self.hidden_size % heads:
                raise ConfigError(f"SanaConfig.hidden_size={self.hidden_size} is not divisible by {heads} heads")


class SanaBlock(nn.Module):
    def __init__(self, cfg: SanaConfig):
        super().__init__()
        D = cfg.hidden_size
        self.eps = cfg.norm_eps
        self.scale_shift_table = nn.Parameter(torch.zeros(6, D))
        self.attn = LinearAttention(D, cfg.num_heads)
        self.cross_attn = CrossAttention(D, D, cfg.cross_num_heads)
        self.ff = GLUMBConv(D, cfg.mlp_ratio)

    def forward(self, x: Tensor, t6: Tensor, y: Tensor, y_bias: Tensor | None, h: int, w: int) -> Tensor:
        msa, mlp = adaln_single(self.scale_shift_table, t6)
        x = x + msa.gate[:, None] * self.attn(modulate(x, msa, self.eps))
        x = x + self.cross_attn(x, y, y_bias)  # no norm and no gate on the cross-attention branch
        return x + mlp.gate[:, None] * self.ff(modulate(x, mlp, self.eps), h, w)


class Sana(nn.Module):
    def __init__(self, cfg: SanaConfig):
        super().__init__()
        self.cfg = cfg
        D = cfg.hidden_size
        self.x_embedder = PatchEmbed(cfg.in_channels, D, cfg.patch_size)
        self.t_embedder = TimestepEmbedder(D)
        self.t_block = nn.Linear(D, 6 * D)
        self.caption_projection = CaptionProjection(cfg.caption_channels, D)
        self.caption_norm = RMSNorm(D, eps=1e-5)
        self.blocks = nn.ModuleList(SanaBlock(cfg) for _ in range(cfg.depth))
        self.scale_shift_table = nn.Parameter(torch.zeros(2, D))
        self.proj_out = nn.Linear(D, cfg.patch_size**2 * cfg.out_channels)

    def forward(self, x: Tensor, t: Tensor, encoder_hidden_states: Tensor,
                encoder_attention_mask: Tensor | None = None) -> Tensor:
        """x (B, C, H, W), t (B,) timesteps (int(σ·1000) for flow), Gemma states (B, T, 2304), keep-mask (B, T)."""
        p = self.cfg.patch_size
        h, w = x.shape[-2] // p, x.shape[-1] // p
        tokens = self.x_embedder(x)  # (B, h·w, D)
        if self.cfg.interpolation_scale is not None:
            base = self.cfg.sample_size // p
            tokens = tokens + sincos_pos_embed_2d(self.cfg.hidden_size, h, w, base, self.cfg.interpolation_scale).to(x)
        emb = self.t_embedder(t)
        t6 = self.t_block(F.silu(emb))  # (B, 6D), shared by all blocks
        y = self.caption_norm(self.caption_projection(encoder_hidden_states))
        bias = None if encoder_attention_mask is None else mask_to_bias(encoder_attention_mask, x.dtype)
        for block in self.blocks:
            tokens = block(tokens, t6, y, bias, h, w)
        tokens = modulate(tokens, final_adaln_single(self.scale_shift_table, emb), 1e-6)
        return unpatchify(self.proj_out(tokens), h, w, p, self.cfg.out_channels)


SANA_1600M_1024 = SanaConfig()
SANA_600M_1024 = replace(SANA_1600M_1024, hidden_size=1152, depth=28, num_heads=36, cross_num_heads=16)


def config_from_diffusers(d: dict) -> SanaConfig:
    """diffusers SanaTransformer2DModel config.json -> SanaConfig."""
    from ditrt.runtime.errors import ConfigError

    fixed = {"guidance_embeds": False, "qk_norm": None, "timestep_scale": 1.0, "attention_bias": False,
             "norm_elementwise_affine": False}
    for key, want in fixed.items():
        if d.get(key, want) != want:
            raise ConfigError(f"Sana config {key}={d[key]!r} is not supported yet (only {want!r})")
    heads, head_dim = d.get("num_attention_heads", 70), d.get("attention_head_dim", 32)
    D = heads * head_dim
    cross_heads, cross_dim = d.get("num_cross_attention_heads", 20), d.get("cross_attention_head_dim", 112)
    if cross_heads * cross_dim != D or d.get("cross_attention_dim", D) != D:
        raise ConfigError(f"Sana config: cross-attention width {cross_heads}×{cross_dim} and cross_attention_dim "
                          f"{d.get('cross_attention_dim')} must equal the model width {D}")
    return SanaConfig(
        sample_size=d.get("sample_size", 32), in_channels=d.get("in_channels", 32),
        out_channels=d.get("out_channels") or d.get("in_channels", 32), patch_size=d.get("patch_size", 1),
        hidden_size=D, depth=d.get("num_layers", 20), num_heads=heads, cross_num_heads=cross_heads,
        caption_channels=d.get("caption_channels", 2304), mlp_ratio=d.get("mlp_ratio", 2.5),
        interpolation_scale=d.get("interpolation_scale"), norm_eps=d.get("norm_eps", 1e-6))
