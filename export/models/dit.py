"""DiT / SiT: class-conditional transformer with AdaLN-Zero blocks (Peebles & Xie 2023; SiT, Ma et al. 2024)."""

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ditrt.runtime import schedules
from ditrt.runtime.errors import ConfigError, InputError
from ditrt.runtime.manifest import TensorSpec

from ..family import Checkpoint, Conditioning, Defaults, Family, Sampler, scheduler
from ..loaders import keymaps
from ..loaders.keymaps import DROP, KeyRule, same_as
from .layers import (
    Attention,
    FeedForward,
    FinalLayer,
    Modulation,
    PatchEmbed,
    TimestepEmbedder,
    gated_modulate,
    modulate,
    sincos_pos_embed_2d,
    unpatchify,
)

PREDICTIONS = ("epsilon", "flow")


@dataclass(frozen=True)
class DiTConfig:
    sample_size: int = 32  # latent height = width
    in_channels: int = 4
    patch_size: int = 2
    hidden_size: int = 1152
    depth: int = 28
    num_heads: int = 16
    mlp_ratio: float = 4.0
    num_classes: int = 1000  # label num_classes is the null (unconditional) class
    learn_sigma: bool = True  # output 2·C channels; the step graph keeps the first C
    freq_shift: int = 0  # timestep sinusoid: 0 = original DiT, 1 = diffusers DiTTransformer2DModel
    mlp_norm_eps: float = 1e-6  # diffusers uses 1e-5 for the MLP LayerNorm
    prediction: str = "epsilon"  # "epsilon" (DDPM DiT) or "flow" (velocity = noise − x0, SiT/rectified flow)

    def __post_init__(self):
        if self.prediction not in PREDICTIONS:
            raise ConfigError(
                f"DiTConfig.prediction={self.prediction!r}; choose from {', '.join(PREDICTIONS)}"
            )
        if self.sample_size % self.patch_size:
            raise ConfigError(
                f"DiTConfig.sample_size={self.sample_size} is not a multiple of patch_size={self.patch_size}"
            )
        if self.hidden_size % self.num_heads or self.hidden_size % 4:
            raise ConfigError(
                f"DiTConfig.hidden_size={self.hidden_size} must divide by num_heads={self.num_heads} and 4"
            )

    @property
    def out_channels(self) -> int:
        return 2 * self.in_channels if self.learn_sigma else self.in_channels


class DiTBlock(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        D = cfg.hidden_size
        self.mlp_norm_eps = cfg.mlp_norm_eps
        self.adaLN = Modulation(D, 2)
        self.attn = Attention(D, cfg.num_heads)
        self.ff = FeedForward(D, int(D * cfg.mlp_ratio))

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        msa, mlp = self.adaLN(c)
        x, h = gated_modulate(x, self.attn(modulate(x, msa)), msa.gate, mlp, self.mlp_norm_eps)
        return x + mlp.gate[:, None] * self.ff(h)


class DiT(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.cfg = cfg
        D, grid = cfg.hidden_size, cfg.sample_size // cfg.patch_size
        self.x_embedder = PatchEmbed(cfg.in_channels, D, cfg.patch_size)
        self.t_embedder = TimestepEmbedder(D, freq_shift=cfg.freq_shift)
        self.y_embedder = nn.Embedding(cfg.num_classes + 1, D)
        self.register_buffer(
            "pos_embed", sincos_pos_embed_2d(D, grid, grid, base_size=grid)[None], persistent=False
        )
        self.blocks = nn.ModuleList(DiTBlock(cfg) for _ in range(cfg.depth))
        self.final = FinalLayer(D, cfg.patch_size, cfg.out_channels)

    def check_latent_size(self, height: int, width: int, vae_factor: int | None = None) -> None:
        """Refuse any latent but sample_size² (the position table is fixed); with vae_factor, in image pixels."""
        S, f = self.cfg.sample_size, vae_factor or 1
        if (height, width) != (S, S):
            what, unit = ("image", " px") if vae_factor else ("latent", "")
            why = f"sample_size={S}" + (f" × VAE factor {f}" if vae_factor else "")
            raise InputError(
                f"{what} {height * f}x{width * f}{unit} is not allowed: this DiT's position table is "
                f"fixed at {S * f}x{S * f}{unit} ({why})"
            )

    def forward(self, x: Tensor, t: Tensor, y: Tensor) -> Tensor:
        """x (B, C, H, W) latents, t (B,) model timesteps, y (B,) int class labels -> (B, C_out, H, W)."""
        self.check_latent_size(*x.shape[-2:])
        p = self.cfg.patch_size
        h, w = x.shape[-2] // p, x.shape[-1] // p
        tokens = self.x_embedder(x) + self.pos_embed.to(x.dtype)  # (B, h·w, D)
        c = self.t_embedder(t) + self.y_embedder(y)  # (B, D)
        for block in self.blocks:
            tokens = block(tokens, c)
        return unpatchify(self.final(tokens, c), h, w, p, self.cfg.out_channels)

    @torch.no_grad()
    def init_weights(self, seed: int = 0) -> "DiT":
        """Random init (seeded) for training and tests; AdaLN-Zero layers start at zero, as in DiT."""
        g = torch.Generator().manual_seed(seed)
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                bound = (6.0 / (m.weight[0].numel() + m.weight.shape[0])) ** 0.5
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) * 2 * bound - bound)
                m.bias.zero_()
            elif isinstance(m, nn.Embedding):
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * 0.02)
        for block in self.blocks:
            block.adaLN.weight.zero_()
        self.final.adaLN.weight.zero_()
        self.final.linear.weight.zero_()
        return self


def config_from_diffusers(d: dict) -> DiTConfig:
    """diffusers DiTTransformer2DModel config.json -> DiTConfig (diffusers' freq shift 1 and MLP LayerNorm eps)."""
    from ditrt.runtime.errors import ConfigError

    fixed = {
        "norm_type": "ada_norm_zero",
        "activation_fn": "gelu-approximate",
        "attention_bias": True,
        "norm_elementwise_affine": False,
    }
    for key, want in fixed.items():
        if d.get(key, want) != want:
            raise ConfigError(f"DiT config {key}={d[key]!r} is not supported (only {want!r})")
    in_ch, out_ch = d.get("in_channels", 4), d.get("out_channels") or d.get("in_channels", 4)
    if out_ch not in (in_ch, 2 * in_ch):
        raise ConfigError(f"DiT config out_channels={out_ch} must be in_channels ({in_ch}) or twice it")
    heads, head_dim = d.get("num_attention_heads", 16), d.get("attention_head_dim", 72)
    return DiTConfig(
        sample_size=d.get("sample_size", 32),
        in_channels=in_ch,
        patch_size=d.get("patch_size", 2),
        hidden_size=heads * head_dim,
        depth=d.get("num_layers", 28),
        num_heads=heads,
        num_classes=d.get("num_embeds_ada_norm", 1000),
        learn_sigma=out_ch == 2 * in_ch,
        freq_shift=1,
        mlp_norm_eps=d.get("norm_eps", 1e-5),
        prediction="epsilon",
    )


# --- family descriptor: what "dit" means to the exporter (export/family.py) ---
# diffusers checkpoint names -> ours (loaders/keymaps.py: the rules and the blocks' shared rows)
KEYS = [
    KeyRule(r"pos_embed\.proj\.(weight|bias)", r"x_embedder.proj.\1"),
    KeyRule(
        r"transformer_blocks\.0\.norm1\.emb\.timestep_embedder\.(linear_[12]\.(?:weight|bias))",
        r"t_embedder.\1",
    ),
    KeyRule(
        r"transformer_blocks\.0\.norm1\.emb\.class_embedder\.embedding_table\.weight", "y_embedder.weight"
    ),
    KeyRule(
        r"transformer_blocks\.(\d+)\.norm1\.emb\.(.*)", DROP, same_as(r"transformer_blocks.0.norm1.emb.\2")
    ),
    KeyRule(r"transformer_blocks\.(\d+)\.norm1\.linear\.(weight|bias)", r"blocks.\1.adaLN.\2"),
    *keymaps.SELF_ATTN,
    *keymaps.GELU_FF,
    KeyRule(r"proj_out_1\.(weight|bias)", r"final.adaLN.\1"),
    KeyRule(r"proj_out_2\.(weight|bias)", r"final.linear.\1"),
]


DDIM = Sampler(scheduler(schedules.DDIM, clip_sample=False), 50, 4.0)  # facebook/DiT-XL-2-256


def conditioning(cfg: DiTConfig, text_len: int, latent_hw: tuple[int, int]) -> Conditioning:
    """Class labels (B,); the negative branch is the null class num_classes. DiT batches [cond; uncond]."""
    labels = TensorSpec("class_labels", "int64", ["B"])
    return Conditioning((labels,), cond_first=True, null_class=cfg.num_classes)


def defaults(cfg: DiTConfig, pipeline_class: str | None) -> Defaults:
    # DiTPipeline steps the scale_model_input result, so a σ-space scheduler cannot run in it
    return Defaults(DDIM, 0, {"steps_scaled_input": True})


FAMILY = Family(
    name="dit",
    checkpoint=Checkpoint(
        ("DiTTransformer2DModel", "Transformer2DModel"),  # the second: its legacy name
        DiT,
        config_from_diffusers,
        KEYS,
    ),
    config=DiTConfig,
    conditioning=conditioning,
    defaults=defaults,
    class_names=lambda cfg: tuple(str(i) for i in range(cfg.num_classes)),
)
