"""SD3 / SD3.5 MMDiT (Esser et al. 2024): image and text streams with their own weights, joined in each attention.

Matches diffusers' SD3Transformer2DModel (reference/architectures.md §4). SD3.5 adds per-head RMSNorm on q/k;
SD3.5-medium ("MMDiT-X") adds an image-only self-attention to its first 13 blocks.
"""

from dataclasses import dataclass, replace

import torch
from torch import Tensor, nn

from ditrt.runtime import schedules
from ditrt.runtime.errors import ConfigError, InputError
from ditrt.runtime.manifest import TensorSpec

from ..family import Checkpoint, Conditioning, Defaults, Family, Sampler, TextEngine, has_component, scheduler
from ..loaders import keymaps
from ..loaders.keymaps import KeyRule
from .blocks import JointBlock
from .layers import FinalLayer, MLPEmbedder, PatchEmbed, TimestepEmbedder, unpatchify


@dataclass(frozen=True)
class MMDiTConfig:
    sample_size: int = 128  # latent height = width at training (1024 px)
    in_channels: int = 16
    out_channels: int = 16
    patch_size: int = 2
    hidden_size: int = 1536  # 64·depth in the released models
    depth: int = 24
    num_heads: int = 24
    mlp_ratio: float = 4.0
    joint_attention_dim: int = 4096  # T5-XXL width (the CLIP features are zero-padded to it)
    pooled_projection_dim: int = 2048  # CLIP-L 768 ‖ CLIP-G 1280
    pos_embed_max_size: int = 192  # side of the stored position table, centre-cropped to the token grid
    qk_norm: bool = False  # SD3.5: RMSNorm(head_dim, eps 1e-6) on q and k of every attention
    dual_attention_layers: tuple[
        int, ...
    ] = ()  # SD3.5-medium: blocks with an extra image-only self-attention

    def __post_init__(self):
        if self.hidden_size % self.num_heads:
            raise ConfigError(
                f"MMDiTConfig.hidden_size={self.hidden_size} must divide by num_heads={self.num_heads}"
            )
        if self.depth < 1:
            raise ConfigError(f"MMDiTConfig.depth={self.depth} must be at least 1")
        if self.sample_size % self.patch_size:
            raise ConfigError(
                f"MMDiTConfig.sample_size={self.sample_size} is not a multiple of "
                f"patch_size={self.patch_size}"
            )
        if self.sample_size // self.patch_size > self.pos_embed_max_size:
            raise ConfigError(
                f"MMDiTConfig.pos_embed_max_size={self.pos_embed_max_size} is smaller than the "
                f"{self.sample_size // self.patch_size}-token grid of sample_size={self.sample_size}"
            )
        bad = [i for i in self.dual_attention_layers if not 0 <= i < self.depth]
        if bad:
            raise ConfigError(
                f"MMDiTConfig.dual_attention_layers holds {bad}, outside blocks 0..{self.depth - 1}"
            )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


# Released architectures (reference/architectures.md §4.2); the weights come from their diffusers folders.
SD3_MEDIUM = MMDiTConfig()
SD35_MEDIUM = replace(
    SD3_MEDIUM, pos_embed_max_size=384, qk_norm=True, dual_attention_layers=tuple(range(13))
)
SD35_LARGE = replace(SD3_MEDIUM, hidden_size=2432, depth=38, num_heads=38, qk_norm=True)


def mmdit_block(cfg: MMDiTConfig, index: int) -> JointBlock:
    """diffusers JointTransformerBlock. The last block (context_pre_only) only lends the text's keys and values."""
    return JointBlock(
        cfg.hidden_size,
        cfg.num_heads,
        cfg.mlp_ratio,
        qk_norm=cfg.qk_norm,
        context_pre_only=index == cfg.depth - 1,
        dual_attention=index in cfg.dual_attention_layers,
    )


class MMDiT(nn.Module):
    def __init__(self, cfg: MMDiTConfig):
        super().__init__()
        self.cfg = cfg
        D, M = cfg.hidden_size, cfg.pos_embed_max_size
        self.x_embedder = PatchEmbed(cfg.in_channels, D, cfg.patch_size)
        # (1, M·M, D) position table: a persistent buffer in diffusers, so loaded from the checkpoint, never computed
        self.register_buffer("pos_embed", torch.zeros(1, M * M, D))
        self.t_embedder = TimestepEmbedder(D)
        self.pooled_embedder = MLPEmbedder(cfg.pooled_projection_dim, D)
        self.context_embedder = nn.Linear(cfg.joint_attention_dim, D)
        self.transformer_blocks = nn.ModuleList(mmdit_block(cfg, i) for i in range(cfg.depth))
        self.final = FinalLayer(D, cfg.patch_size, cfg.out_channels)

    def check_latent_size(self, height: int, width: int, vae_factor: int | None = None) -> None:
        """Refuse a latent larger than the stored position table covers; with vae_factor, in image pixels."""
        M, p, f = self.cfg.pos_embed_max_size, self.cfg.patch_size, vae_factor or 1
        if max(height, width) > M * p:
            what, unit = ("image", " px") if vae_factor else ("latent", "")
            raise InputError(
                f"{what} {height * f}x{width * f}{unit} is larger than this model's position table "
                f"covers: at most {M * p * f}{unit} per side (pos_embed_max_size={M} × patch_size={p}"
                f"{f' × VAE factor {f}' if vae_factor else ''})"
            )

    def cropped_pos_embed(self, height: int, width: int) -> Tensor:
        """The centre h×w crop of the M×M table for a height×width latent -> (1, h·w, D), row-major tokens.

        Gathered by index: as slices, torch.onnx (2.13) rounds the symbolic slice end wrongly for odd h or w.
        """
        M, p = self.cfg.pos_embed_max_size, self.cfg.patch_size
        if height % p or width % p:
            raise InputError(f"latent {height}x{width} must be multiples of patch_size={p}")
        self.check_latent_size(height, width)
        h, w = height // p, width // p
        rows = torch.arange(h, device=self.pos_embed.device) + (M - h) // 2
        cols = torch.arange(w, device=self.pos_embed.device) + (M - w) // 2
        return self.pos_embed[:, (rows[:, None] * M + cols[None]).flatten()]

    def forward(
        self, x: Tensor, t: Tensor, encoder_hidden_states: Tensor, pooled_projections: Tensor
    ) -> Tensor:
        """x (B, C, H, W) latents, t (B,) float timesteps σ·1000, encoder_hidden_states (B, T, joint_attention_dim),
        pooled_projections (B, pooled_projection_dim) -> velocity (B, C_out, H, W)."""
        p = self.cfg.patch_size
        tokens = self.x_embedder(x) + self.cropped_pos_embed(*x.shape[-2:]).to(x.dtype)  # (B, h·w, D)
        temb = self.t_embedder(t) + self.pooled_embedder(pooled_projections)  # (B, D)
        c = self.context_embedder(encoder_hidden_states)  # (B, T, D)
        for block in self.transformer_blocks:
            tokens, c = block(tokens, c, temb)
        return unpatchify(
            self.final(tokens, temb), x.shape[-2] // p, x.shape[-1] // p, p, self.cfg.out_channels
        )


def config_from_diffusers(d: dict) -> MMDiTConfig:
    """diffusers SD3Transformer2DModel config.json -> MMDiTConfig (missing keys take diffusers' defaults)."""
    heads, head_dim = d.get("num_attention_heads", 18), d.get("attention_head_dim", 64)
    D = heads * head_dim
    if d.get("caption_projection_dim", 1152) != D:
        raise ConfigError(
            f"SD3 config caption_projection_dim={d.get('caption_projection_dim', 1152)} differs from "
            f"num_attention_heads·attention_head_dim={D}; only equal widths are supported"
        )
    if d.get("pos_embed_max_size", 96) is None:
        raise ConfigError(
            "SD3 config pos_embed_max_size=None (a computed, uncropped position table) is not "
            "supported; released SD3/SD3.5 checkpoints store a table to crop"
        )
    qk_norm = d.get("qk_norm")
    if qk_norm not in (None, "rms_norm"):
        raise ConfigError(f"SD3 config qk_norm={qk_norm!r} is not supported (only null or 'rms_norm')")
    in_ch = d.get("in_channels", 16)
    return MMDiTConfig(
        sample_size=d.get("sample_size", 128),
        in_channels=in_ch,
        out_channels=d.get("out_channels") or in_ch,
        patch_size=d.get("patch_size", 2),
        hidden_size=D,
        depth=d.get("num_layers", 18),
        num_heads=heads,
        joint_attention_dim=d.get("joint_attention_dim", 4096),
        pooled_projection_dim=d.get("pooled_projection_dim", 2048),
        pos_embed_max_size=d.get("pos_embed_max_size", 96),
        qk_norm=qk_norm == "rms_norm",
        dual_attention_layers=tuple(d.get("dual_attention_layers", ())),
    )


# --- family descriptor: what "mmdit" means to the exporter (export/family.py) ---
# diffusers checkpoint names -> ours (loaders/keymaps.py: the rules and the blocks' shared rows)
KEYS = keymaps.MMDIT_COMMON + [
    KeyRule(r"pos_embed\.proj\.(weight|bias)", r"x_embedder.proj.\1"),
    KeyRule(r"pos_embed\.pos_embed", "pos_embed"),
    KeyRule(r"(transformer_blocks\.\d+\.attn2\.(?:to_[qkv]|norm_[qk])\.(?:weight|bias))", r"\1"),
    KeyRule(r"(transformer_blocks\.\d+\.attn2)\.to_out\.0\.(weight|bias)", r"\1.to_out.\2"),
]


SD3_EULER = Sampler(scheduler(schedules.FLOW, shift=3.0), 28, 7.0)
CLIP_LENGTH = 77
T5_LENGTH = 256  # StableDiffusion3Pipeline's max_sequence_length


def conditioning(cfg: MMDiTConfig, text_len: int | str, latent_hw: tuple[int, int]) -> Conditioning:
    """[CLIP-L ‖ CLIP-G padded; T5] states (B, 77 + T, 4096) and pooled CLIP (B, 2048); batch [uncond; cond]."""
    return Conditioning(
        (
            TensorSpec("prompt_embeds", "float32", ["B", text_len, cfg.joint_attention_dim]),
            TensorSpec("pooled_prompt_embeds", "float32", ["B", cfg.pooled_projection_dim]),
        )
    )


def defaults(cfg: MMDiTConfig, pipeline_class: str | None) -> Defaults:
    """The text length is chosen per request ("T": 77 CLIP tokens, then max_sequence_length T5 tokens).
    StableDiffusion3Pipeline passes a resolution shift μ to set_timesteps when the scheduler shifts dynamically."""
    return Defaults(SD3_EULER, "T", {"mu": "dynamic", "mu_defaults": [256, 4096, 0.5, 1.16]})


def text_engine(path, cfg: MMDiTConfig, text_len: int | str, load) -> TextEngine | None:
    """CLIP-L, CLIP-G (with projection) and T5-XXL, all without masks (SD3's encode_prompt)."""
    from transformers import CLIPTextModelWithProjection, T5EncoderModel

    from ..text_encoders import SD3PromptGraph, unmasked_tokenizers

    if not has_component(path, "text_encoder_3"):  # SD3 without T5 is not supported yet
        return None
    graph = SD3PromptGraph(
        load(CLIPTextModelWithProjection, "text_encoder"),
        load(CLIPTextModelWithProjection, "text_encoder_2"),
        load(T5EncoderModel, "text_encoder_3"),
        CLIP_LENGTH,
        text_len,
    )
    rows = [
        ("tokenizer", "clip_l", CLIP_LENGTH),
        ("tokenizer_2", "clip_g", CLIP_LENGTH),
        ("tokenizer_3", "t5", T5_LENGTH),
    ]
    return TextEngine(graph, unmasked_tokenizers(path, rows))


FAMILY = Family(
    name="mmdit",
    checkpoint=Checkpoint(("SD3Transformer2DModel",), MMDiT, config_from_diffusers, KEYS),
    config=MMDiTConfig,
    conditioning=conditioning,
    defaults=defaults,
    text_engine=text_engine,
)
