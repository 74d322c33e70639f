"""AutoencoderKL decoder (SD/SDXL 4-channel, SD3/Flux 16-channel): latents -> image in [-1, 1].

Module names follow diffusers' `Decoder`, so the checkpoint's `decoder.*` keys load as they are.
"""

from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor, nn

from ditrt.runtime.errors import ConfigError

from ..family import Checkpoint
from ..loaders.keymaps import DROP, KeyRule
from .layers import FP32GroupNorm, sdpa


@dataclass(frozen=True)
class VAEConfig:
    latent_channels: int = 4
    out_channels: int = 3
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    norm_num_groups: int = 32
    post_quant_conv: bool = True  # SD/SDXL VAEs; SD3/Flux VAEs have none
    mid_attention: bool = True
    scaling_factor: float = 0.18215  # decoder input = latent / scaling_factor + shift_factor
    shift_factor: float = 0.0

    @property
    def spatial_factor(self) -> int:  # image pixels per latent pixel
        return 2 ** (len(self.block_out_channels) - 1)

    @property
    def image_channels(self) -> int:
        return self.out_channels

    def __post_init__(self):
        bad = [c for c in self.block_out_channels if c % self.norm_num_groups]
        if bad:
            raise ConfigError(
                f"VAEConfig.block_out_channels {bad} are not multiples of norm_num_groups="
                f"{self.norm_num_groups}"
            )


class ResnetBlock(nn.Module):
    def __init__(self, cin: int, cout: int, groups: int):
        super().__init__()
        self.norm1 = FP32GroupNorm(groups, cin, eps=1e-6)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2 = FP32GroupNorm(groups, cout, eps=1e-6)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else None

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv2(F.silu(self.norm2(self.conv1(F.silu(self.norm1(x))))))
        return (x if self.conv_shortcut is None else self.conv_shortcut(x)) + h


class SpatialAttention(nn.Module):
    """One-head self-attention over the H·W positions, GroupNorm first, residual added."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.group_norm = FP32GroupNorm(groups, channels, eps=1e-6)
        self.to_q, self.to_k, self.to_v = (nn.Linear(channels, channels) for _ in range(3))
        self.to_out = nn.Linear(channels, channels)

    def forward(self, x: Tensor) -> Tensor:
        B, C, H, W = x.shape
        h = self.group_norm(x).flatten(2).transpose(1, 2)  # (B, H·W, C)
        q, k, v = (p(h)[:, None] for p in (self.to_q, self.to_k, self.to_v))  # (B, 1, H·W, C)
        out = self.to_out(sdpa(q, k, v)[:, 0])
        return x + out.transpose(1, 2).reshape(B, C, H, W)


class MidBlock(nn.Module):
    def __init__(self, channels: int, groups: int, attention: bool):
        super().__init__()
        self.resnets = nn.ModuleList(
            [ResnetBlock(channels, channels, groups), ResnetBlock(channels, channels, groups)]
        )
        self.attentions = nn.ModuleList([SpatialAttention(channels, groups)] if attention else [])

    def forward(self, x: Tensor) -> Tensor:
        x = self.resnets[0](x)
        for attn in self.attentions:
            x = attn(x)
        return self.resnets[1](x)


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class UpBlock(nn.Module):
    def __init__(self, cin: int, cout: int, layers: int, groups: int, upsample: bool):
        super().__init__()
        self.resnets = nn.ModuleList(
            ResnetBlock(cin if i == 0 else cout, cout, groups) for i in range(layers)
        )
        self.upsamplers = nn.ModuleList([Upsample(cout)] if upsample else [])

    def forward(self, x: Tensor) -> Tensor:
        for block in [*self.resnets, *self.upsamplers]:
            x = block(x)
        return x


class Decoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        chans, g = list(reversed(cfg.block_out_channels)), cfg.norm_num_groups
        self.conv_in = nn.Conv2d(cfg.latent_channels, chans[0], 3, padding=1)
        self.mid_block = MidBlock(chans[0], g, cfg.mid_attention)
        self.up_blocks = nn.ModuleList(
            UpBlock(chans[max(i - 1, 0)], c, cfg.layers_per_block + 1, g, upsample=i < len(chans) - 1)
            for i, c in enumerate(chans)
        )
        self.conv_norm_out = FP32GroupNorm(g, chans[-1], eps=1e-6)
        self.conv_out = nn.Conv2d(chans[-1], cfg.out_channels, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


class VAEDecoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.cfg = cfg
        if cfg.post_quant_conv:
            self.post_quant_conv = nn.Conv2d(cfg.latent_channels, cfg.latent_channels, 1)
        self.decoder = Decoder(cfg)

    def forward(self, latents: Tensor) -> Tensor:
        """Sampler latents (B, C, h, w) -> image (B, 3, 8h, 8w) in [-1, 1] (scaling and shift applied here)."""
        z = latents / self.cfg.scaling_factor + self.cfg.shift_factor
        if self.cfg.post_quant_conv:
            z = self.post_quant_conv(z)
        return self.decoder(z)


def config_from_diffusers(d: dict) -> VAEConfig:
    """diffusers AutoencoderKL config.json -> VAEConfig (decoder only)."""
    from ditrt.runtime.errors import ConfigError

    ups = d.get("up_block_types", ["UpDecoderBlock2D"] * len(d.get("block_out_channels", (64,))))
    if any(u != "UpDecoderBlock2D" for u in ups) or d.get("act_fn", "silu") != "silu":
        raise ConfigError(
            f"AutoencoderKL up_block_types={ups} / act_fn={d.get('act_fn')!r} are not supported"
        )
    return VAEConfig(
        latent_channels=d.get("latent_channels", 4),
        out_channels=d.get("out_channels", 3),
        block_out_channels=tuple(d.get("block_out_channels", (64,))),
        layers_per_block=d.get("layers_per_block", 1),
        norm_num_groups=d.get("norm_num_groups", 32),
        post_quant_conv=d.get("use_post_quant_conv", True),
        mid_attention=d.get("mid_block_add_attention", True),
        scaling_factor=d.get("scaling_factor", 0.18215),
        shift_factor=d.get("shift_factor") or 0.0,
    )


# --- what the exporter loads as this decoder (export/family.py) ---
# AutoencoderKL: only the decoder is exported; the encoder half of the checkpoint is dropped.
KEYS = [
    KeyRule(r"(?:encoder|quant_conv)\..*", DROP),
    KeyRule(r"(decoder\.mid_block\.attentions\.0)\.to_out\.0\.(weight|bias)", r"\1.to_out.\2"),
    KeyRule(r"((?:decoder|post_quant_conv)\..*)", r"\1"),
]


CHECKPOINT = Checkpoint(("AutoencoderKL",), VAEDecoder, config_from_diffusers, KEYS)
