"""AutoencoderDC (DC-AE, Sana's f32c32 VAE) decoder: latents -> image in [-1, 1]. Module names follow diffusers'
`Decoder` (autoencoder_dc.py), so `decoder.*` keys load as they are; config fields carry diffusers' key names."""

from collections import OrderedDict
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ditrt.runtime.errors import ConfigError

from ..family import Checkpoint
from ..loaders.keymaps import DROP, KeyRule
from ..ops import linear_attention
from .layers import GLUMBConv

ACTS = {
    "silu": F.silu,
    "swish": F.silu,
    "relu": F.relu,
    "gelu": F.gelu,
    "mish": F.mish,
}  # diffusers get_activation
BLOCKS = ("ResBlock", "EfficientViTBlock")
UPSAMPLES = ("interpolate", "pixel_shuffle")


@dataclass(frozen=True)
class DCAEConfig:
    """Defaults: the released dc-ae-f32c32-sana-1.0 decoder. Per-stage tuples: stage 0 is the full-resolution end."""

    in_channels: int = 3  # image channels
    latent_channels: int = 32
    attention_head_dim: int = 32
    decoder_block_types: tuple[str, ...] = ("ResBlock",) * 3 + ("EfficientViTBlock",) * 3
    decoder_block_out_channels: tuple[int, ...] = (128, 256, 512, 512, 1024, 1024)
    decoder_layers_per_block: tuple[int, ...] = (3, 3, 3, 3, 3, 3)
    decoder_qkv_multiscales: tuple[tuple[int, ...], ...] = ((), (), (), (5,), (5,), (5,))
    upsample_block_type: str = "interpolate"
    decoder_norm_types: tuple[str, ...] = ("rms_norm",) * 6
    decoder_act_fns: tuple[str, ...] = ("silu",) * 6
    decoder_in_shortcut: bool = True
    decoder_conv_act_fn: str = "relu"
    scaling_factor: float = 0.41407  # decoder input = latent / scaling_factor (no shift)
    shift_factor = 0.0
    spatial_factor = property(lambda self: 2 ** (len(self.decoder_block_out_channels) - 1))
    image_channels = property(lambda self: self.in_channels)

    def __post_init__(self):
        ch = self.decoder_block_out_channels
        per_stage = [
            ("decoder_block_types", self.decoder_block_types, lambda v: v in BLOCKS, BLOCKS),
            ("decoder_layers_per_block", self.decoder_layers_per_block, lambda v: v > 0, "counts > 0"),
            ("decoder_norm_types", self.decoder_norm_types, lambda v: v == "rms_norm", ("rms_norm",)),
            ("decoder_act_fns", self.decoder_act_fns, lambda v: v in ACTS, tuple(ACTS)),
            ("decoder_qkv_multiscales", self.decoder_qkv_multiscales, lambda v: all(k % 2 for k in v), "odd"),
        ]
        for key, values, ok, supported in per_stage:
            if len(values) != len(ch) or not all(map(ok, values)):
                raise ConfigError(
                    f"AutoencoderDC {key}={values!r} is not supported (needs one entry for each of the "
                    f"{len(ch)} stages, each of {supported})"
                )
        rules = [
            ("upsample_block_type", self.upsample_block_type in UPSAMPLES, f"one of {UPSAMPLES}"),
            ("decoder_conv_act_fn", self.decoder_conv_act_fn in ACTS, f"one of {tuple(ACTS)}"),
            (
                "decoder_block_out_channels",
                all(4 * a % b == 0 for a, b in zip(ch, ch[1:])),
                "4·channels[i] divisible by channels[i+1], for the up-block shortcut",
            ),
            (
                "latent_channels",
                not self.decoder_in_shortcut or ch[-1] % self.latent_channels == 0,
                f"a divisor of {ch[-1]}, for decoder_in_shortcut",
            ),
            (
                "attention_head_dim",
                0
                < self.attention_head_dim
                <= min(
                    (c for c, t in zip(ch, self.decoder_block_types) if t == "EfficientViTBlock"),
                    default=1 << 30,
                ),
                "at most the channels of every EfficientViTBlock stage",
            ),
        ]
        for key, ok, needs in rules:
            if not ok:
                raise ConfigError(
                    f"AutoencoderDC {key}={getattr(self, key)!r} is not supported (needs {needs})"
                )


class RMSNorm2d(nn.Module):
    """diffusers RMSNorm(eps 1e-5, weight and bias) over the channel axis of (B, C, H, W); statistics in fp32."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps, self.weight, self.bias = eps, nn.Parameter(torch.ones(dim)), nn.Parameter(torch.zeros(dim))

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        y = (xf * torch.rsqrt(xf.pow(2).mean(1, keepdim=True) + self.eps)).to(x.dtype)
        return y * self.weight[:, None, None] + self.bias[:, None, None]


class ResBlock(nn.Module):
    def __init__(self, channels: int, act: str):
        super().__init__()
        self.act, self.conv1 = act, nn.Conv2d(channels, channels, 3, padding=1)
        self.conv2, self.norm = nn.Conv2d(channels, channels, 3, padding=1, bias=False), RMSNorm2d(channels)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.norm(self.conv2(ACTS[self.act](self.conv1(x))))


def multiscale_projection(channels: int, heads: int, kernel: int) -> nn.Sequential:
    """Depthwise k×k over q|k|v, then a 1×1 grouped per (q, k, v) × head (diffusers' proj_in, proj_out)."""
    return nn.Sequential(
        OrderedDict(
            proj_in=nn.Conv2d(channels, channels, kernel, padding=kernel // 2, groups=channels, bias=False),
            proj_out=nn.Conv2d(channels, channels, 1, groups=3 * heads, bias=False),
        )
    )


class MultiscaleLinearAttention(nn.Module):
    """diffusers SanaMultiscaleLinearAttention (+ SanaMultiscaleAttnProcessor2_0) with residual, rms_norm output."""

    def __init__(self, channels: int, head_dim: int, kernels: tuple[int, ...]):
        super().__init__()
        self.head_dim, heads = head_dim, channels // head_dim
        inner = heads * head_dim
        self.to_q, self.to_k, self.to_v = (nn.Linear(channels, inner, bias=False) for _ in range(3))
        self.to_qkv_multiscale = nn.ModuleList(multiscale_projection(3 * inner, heads, k) for k in kernels)
        self.to_out = nn.Linear(inner * (1 + len(kernels)), channels, bias=False)
        self.norm_out = RMSNorm2d(channels)

    def forward(self, x: Tensor) -> Tensor:
        B, _, H, W = x.shape
        t = x.movedim(1, -1)
        qkv = torch.cat([self.to_q(t), self.to_k(t), self.to_v(t)], dim=3).movedim(-1, 1)
        qkv = torch.cat([qkv, *(m(qkv) for m in self.to_qkv_multiscale)], dim=1)
        # heads take consecutive 3·d channel slices (diffusers' layout), then split into q, k, v
        qkv = qkv.reshape(B, -1, 3 * self.head_dim, H * W).transpose(-1, -2)  # (B, heads, H·W, 3d)
        q, k, v = qkv.chunk(3, dim=-1)  # (B, heads, H·W, d) each
        # diffusers' apply_linear_attention: ReLU(q), ReLU(k), fp32 sums (its tiny-grid quadratic form: equal)
        out = linear_attention(q, k, v)  # (B, heads, H·W, d)
        out = out.transpose(-1, -2).reshape(B, -1, H, W)  # (B, heads·d, H, W)
        return x + self.norm_out(self.to_out(out.movedim(1, -1)).movedim(-1, 1))


class GLUMBConv2d(GLUMBConv):
    """Sana's GLUMBConv (expand 4) on (B, C, H, W), with diffusers' rms_norm output and residual."""

    def __init__(self, channels: int):
        super().__init__(channels, 4.0)
        self.norm = RMSNorm2d(channels)

    def forward(self, x: Tensor) -> Tensor:
        y, gate = self.conv_depth(F.silu(self.conv_inverted(x))).chunk(2, dim=1)
        return x + self.norm(self.conv_point(y * F.silu(gate)))


def efficientvit_block(channels: int, head_dim: int, kernels: tuple[int, ...]) -> nn.Sequential:
    """diffusers EfficientViTBlock: attention then GLUMBConv, each with its own residual."""
    return nn.Sequential(
        OrderedDict(
            attn=MultiscaleLinearAttention(channels, head_dim, kernels), conv_out=GLUMBConv2d(channels)
        )
    )


class DCUpBlock2d(nn.Module):
    """×2 upsampling (nearest + conv, or conv + pixel shuffle) plus the channel-repeat pixel-shuffle shortcut."""

    def __init__(self, cin: int, cout: int, interpolate: bool):
        super().__init__()
        self.interpolate, self.repeats = interpolate, 4 * cout // cin
        self.conv = nn.Conv2d(cin, cout if interpolate else 4 * cout, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        y = (
            self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))
            if self.interpolate
            else F.pixel_shuffle(self.conv(x), 2)
        )
        return y + F.pixel_shuffle(x.repeat_interleave(self.repeats, dim=1), 2)


def _stage(cfg: DCAEConfig, i: int) -> nn.Sequential:
    """Stage i as diffusers builds it: [DCUpBlock2d from stage i+1 (not for the last)] + its blocks."""
    ch = cfg.decoder_block_out_channels
    up = [DCUpBlock2d(ch[i + 1], ch[i], cfg.upsample_block_type == "interpolate")] if i < len(ch) - 1 else []
    vit = cfg.decoder_block_types[i] == "EfficientViTBlock"
    return nn.Sequential(
        *up,
        *(
            efficientvit_block(ch[i], cfg.attention_head_dim, cfg.decoder_qkv_multiscales[i])
            if vit
            else ResBlock(ch[i], cfg.decoder_act_fns[i])
            for _ in range(cfg.decoder_layers_per_block[i])
        ),
    )


class Decoder(nn.Module):
    def __init__(self, cfg: DCAEConfig):
        super().__init__()
        ch = cfg.decoder_block_out_channels
        self.conv_act, self.in_repeats = cfg.decoder_conv_act_fn, ch[-1] // cfg.latent_channels
        self.in_repeats *= cfg.decoder_in_shortcut  # 0: no shortcut
        self.conv_in = nn.Conv2d(cfg.latent_channels, ch[-1], 3, padding=1)
        self.up_blocks = nn.ModuleList(_stage(cfg, i) for i in range(len(ch)))
        self.norm_out, self.conv_out = RMSNorm2d(ch[0]), nn.Conv2d(ch[0], cfg.in_channels, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        x = self.conv_in(z)
        if self.in_repeats:
            x = x + z.repeat_interleave(self.in_repeats, dim=1)
        for stage in self.up_blocks[::-1]:  # deepest (lowest resolution) stage first
            x = stage(x)
        return self.conv_out(ACTS[self.conv_act](self.norm_out(x)))


class DCAEDecoder(nn.Module):
    def __init__(self, cfg: DCAEConfig):
        super().__init__()
        self.cfg, self.decoder = cfg, Decoder(cfg)

    def forward(self, latents: Tensor) -> Tensor:
        """Sampler latents (B, C, h, w) -> image (B, 3, 2^(n-1)·h, 2^(n-1)·w) in [-1, 1] (scaling applied here)."""
        return self.decoder(latents / self.cfg.scaling_factor)


def config_from_diffusers(d: dict) -> DCAEConfig:
    """diffusers AutoencoderDC config.json -> DCAEConfig (decoder only; encoder keys are ignored)."""
    # diffusers AutoencoderDC.__init__ defaults where they differ from the Sana release (DCAEConfig's defaults)
    defaults = dict(
        decoder_block_types="ResBlock",
        decoder_norm_types="rms_norm",
        decoder_act_fns="silu",
        upsample_block_type="pixel_shuffle",
        scaling_factor=1.0,
    )

    def tuples(x):  # config.json lists -> (nested) tuples
        return tuple(map(tuples, x)) if isinstance(x, (list, tuple)) else x

    v = {
        f.name: tuples(d[f.name] if d.get(f.name) is not None else defaults.get(f.name, f.default))
        for f in fields(DCAEConfig)
    }
    n = len(v["decoder_block_out_channels"])  # diffusers broadcasts a string to every stage
    v.update(
        {
            k: (v[k],) * n
            for k in ("decoder_block_types", "decoder_norm_types", "decoder_act_fns")
            if isinstance(v[k], str)
        }
    )
    return DCAEConfig(**v)


# --- what the exporter loads as this decoder (export/family.py) ---
# AutoencoderDC (DC-AE): only the decoder is exported; its names are diffusers' own.
KEYS = [
    KeyRule(r"encoder\..*", DROP),
    KeyRule(r"(decoder\..*)", r"\1"),
]


CHECKPOINT = Checkpoint(("AutoencoderDC",), DCAEDecoder, config_from_diffusers, KEYS)
