"""PixArt-α / PixArt-Σ: DiT blocks with adaLN-single and cross-attention to T5 (Chen et al. 2023, 2024)."""

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ditrt.runtime import schedules
from ditrt.runtime.errors import ConfigError

from ..family import (
    Checkpoint,
    Conditioning,
    Defaults,
    Family,
    Sampler,
    TextEngine,
    has_component,
    masked_text,
    scheduler,
)
from ..loaders import keymaps
from .blocks import CrossDiTBlock, output_norm
from .layers import (
    Attention,
    CaptionProjection,
    CrossAttention,
    FeedForward,
    PatchEmbed,
    TimestepEmbedder,
    mask_to_bias,
    sincos_pos_embed_2d,
    unpatchify,
)


@dataclass(frozen=True)
class PixArtConfig:
    sample_size: int = 128  # latent height = width of the position table's base grid
    in_channels: int = 4
    out_channels: int = 8  # learned sigma: the step graph keeps the first in_channels
    patch_size: int = 2
    hidden_size: int = 1152
    depth: int = 28
    num_heads: int = 16
    caption_channels: int = 4096  # T5-XXL width: the prompt states' width
    caption_projection: bool = True  # False: the states go to cross-attention as they are (diffusers' None)
    interpolation_scale: float = 2.0  # sin-cos grid rescaling (diffusers default max(sample_size // 64, 1))
    micro_conditions: bool = False  # PixArt-α 1024: resolution and aspect-ratio embeddings
    norm_eps: float = 1e-6  # the blocks' LayerNorms; the output norm's is 1e-6 always, as in diffusers

    def __post_init__(self):
        if self.hidden_size % self.num_heads or (self.micro_conditions and self.hidden_size % 3):
            raise ConfigError(
                f"PixArtConfig.hidden_size={self.hidden_size} must divide by num_heads="
                f"{self.num_heads} (and by 3 with micro_conditions)"
            )
        if self.sample_size % self.patch_size:
            raise ConfigError(f"PixArtConfig.sample_size={self.sample_size} is not a multiple of patch_size")


def pixart_block(cfg: PixArtConfig) -> CrossDiTBlock:
    """Softmax self-attention and a GELU FFN (x4)."""
    D = cfg.hidden_size
    text_dim = D if cfg.caption_projection else cfg.caption_channels
    return CrossDiTBlock(
        D,
        Attention(D, cfg.num_heads),
        CrossAttention(D, text_dim, cfg.num_heads),
        FeedForward(D, 4 * D),
        cfg.norm_eps,
    )


class PixArt(nn.Module):
    def __init__(self, cfg: PixArtConfig):
        super().__init__()
        self.cfg = cfg
        D = cfg.hidden_size
        self.x_embedder = PatchEmbed(cfg.in_channels, D, cfg.patch_size)
        self.t_embedder = TimestepEmbedder(D)
        self.t_block = nn.Linear(D, 6 * D)
        if cfg.micro_conditions:
            self.resolution_embedder = TimestepEmbedder(D // 3)
            self.aspect_ratio_embedder = TimestepEmbedder(D // 3)
        self.caption_projection = (
            CaptionProjection(cfg.caption_channels, D) if cfg.caption_projection else nn.Identity()
        )
        self.blocks = nn.ModuleList(pixart_block(cfg) for _ in range(cfg.depth))
        self.scale_shift_table = nn.Parameter(torch.zeros(2, D))
        self.proj_out = nn.Linear(D, cfg.patch_size**2 * cfg.out_channels)

    def pos_embed(self, h: int, w: int) -> Tensor:
        base = self.cfg.sample_size // self.cfg.patch_size
        return sincos_pos_embed_2d(self.cfg.hidden_size, h, w, base, self.cfg.interpolation_scale)

    def forward(
        self,
        x: Tensor,
        t: Tensor,
        encoder_hidden_states: Tensor,
        encoder_attention_mask: Tensor | None = None,
        resolution: Tensor | None = None,
        aspect_ratio: Tensor | None = None,
    ) -> Tensor:
        """x (B, C, H, W), t (B,) DDPM timesteps, T5 states (B, T, 4096) with keep-mask (B, T);
        micro-conditions (B, 2), (B, 1)."""
        p = self.cfg.patch_size
        h, w = x.shape[-2] // p, x.shape[-1] // p
        tokens = self.x_embedder(x) + self.pos_embed(h, w).to(x)  # (B, h·w, D)
        emb = self.t_embedder(t)
        if self.cfg.micro_conditions:
            B = x.shape[
                0
            ]  # each value goes through the sinusoid alone: (B, 2) -> (B, 2·D/3), (B, 1) -> (B, D/3)
            emb = emb + torch.cat(
                [
                    self.resolution_embedder(resolution.flatten()).reshape(B, -1),
                    self.aspect_ratio_embedder(aspect_ratio.flatten()).reshape(B, -1),
                ],
                dim=1,
            )
        t6 = self.t_block(F.silu(emb))  # (B, 6D), shared by all blocks
        y = self.caption_projection(encoder_hidden_states)
        bias = None if encoder_attention_mask is None else mask_to_bias(encoder_attention_mask, x.dtype)
        for block in self.blocks:
            tokens = block(tokens, t6, y, bias, (h, w))
        tokens = output_norm(tokens, self.scale_shift_table, emb)
        return unpatchify(self.proj_out(tokens), h, w, p, self.cfg.out_channels)


PIXART_SIGMA_1024 = PixArtConfig()
PIXART_ALPHA_1024 = replace(PIXART_SIGMA_1024, micro_conditions=True)


def config_from_diffusers(d: dict) -> PixArtConfig:
    """diffusers PixArtTransformer2DModel config.json -> PixArtConfig."""
    from ditrt.runtime.errors import ConfigError

    fixed = {
        "norm_type": "ada_norm_single",
        "activation_fn": "gelu-approximate",
        "attention_bias": True,
        "norm_elementwise_affine": False,
        "attention_type": "default",
    }
    for key, want in fixed.items():
        if d.get(key, want) != want:
            raise ConfigError(f"PixArt config {key}={d[key]!r} is not supported (only {want!r})")
    heads, head_dim = d.get("num_attention_heads", 16), d.get("attention_head_dim", 72)
    projected = (
        d.get("caption_channels", 4096) is not None
    )  # None: no projection, cross-attention reads the states
    if projected and d.get("cross_attention_dim", heads * head_dim) != heads * head_dim:
        raise ConfigError(
            f"PixArt config cross_attention_dim={d['cross_attention_dim']} must equal the width "
            f"{heads * head_dim} when caption_channels projects the text"
        )
    if not projected and not isinstance(d.get("cross_attention_dim"), int):
        raise ConfigError(
            "PixArt config caption_channels=None needs cross_attention_dim (the text width), got "
            f"{d.get('cross_attention_dim')!r}"
        )
    sample = d.get("sample_size", 128)
    micro = d.get("use_additional_conditions")
    return PixArtConfig(
        sample_size=sample,
        in_channels=d.get("in_channels", 4),
        out_channels=d.get("out_channels") or 8,
        patch_size=d.get("patch_size", 2),
        hidden_size=heads * head_dim,
        depth=d.get("num_layers", 28),
        num_heads=heads,
        caption_channels=d.get("caption_channels", 4096) if projected else d["cross_attention_dim"],
        caption_projection=projected,
        interpolation_scale=d.get("interpolation_scale") or max(sample // 64, 1),
        micro_conditions=sample == 128 if micro is None else micro,
        norm_eps=d.get("norm_eps", 1e-6),
    )


# --- family descriptor: what "pixart" means to the exporter (export/family.py) ---
# diffusers checkpoint names -> ours (loaders/keymaps.py: the rules and the blocks' shared rows)
KEYS = keymaps.ADALN_SINGLE + keymaps.GELU_FF


PIXART_DPM = Sampler(scheduler(schedules.DPM), 20, 4.5)


def conditioning(cfg: PixArtConfig, text_len: int, latent_hw: tuple[int, int]) -> Conditioning:
    """T5 states (B, T, 4096) and their keep-mask (B, T); the batch is [uncond; cond]."""
    return Conditioning(masked_text(cfg.caption_channels, text_len))


def defaults(cfg: PixArtConfig, pipeline_class: str | None) -> Defaults:
    """PixArt-α pipelines encode 120 T5 tokens, PixArt-Σ 300. Both multiply the initial latents by the scheduler's
    init_noise_sigma (which matters for EulerDiscreteScheduler); PixArt-α's one-step call returns the step's x0."""
    call = {"scales_initial_noise": True}
    if pipeline_class == "PixArtAlphaPipeline":
        return Defaults(PIXART_DPM, 120, {**call, "one_step_x0": True})
    if pipeline_class != "PixArtSigmaPipeline" and cfg.micro_conditions:  # a PixArt-α 1024 transformer alone
        return Defaults(PIXART_DPM, 120, call)
    return Defaults(PIXART_DPM, 300, call)


class MicroConditioned(nn.Module):
    """PixArt-α at one image size: the micro-conditions the pipeline passes, the image's (height, width) and
    aspect ratio, are constants of an engine built for that size (fp32, as the sinusoid wants them)."""

    def __init__(self, model: PixArt, image_hw: tuple[int, int]):
        super().__init__()
        self.model = model
        self.image_hw = image_hw

    def forward(
        self, x: Tensor, t: Tensor, encoder_hidden_states: Tensor, encoder_attention_mask: Tensor
    ) -> Tensor:
        h, w = self.image_hw
        B = x.shape[0]
        resolution = torch.tensor([[float(h), float(w)]]).expand(B, 2)  # (B, 2)
        aspect_ratio = torch.tensor([[h / w]]).expand(B, 1)  # (B, 1)
        return self.model(x, t, encoder_hidden_states, encoder_attention_mask, resolution, aspect_ratio)


def step_model(model: PixArt, latent_hw: tuple[int, int], image_hw: tuple[int, int]) -> nn.Module:
    return MicroConditioned(model, image_hw) if model.cfg.micro_conditions else model


def text_engine(path, cfg: PixArtConfig, text_len: int, load) -> TextEngine | None:
    """T5-XXL with its attention mask; the pipelines lowercase and strip the prompt (clean_caption off)."""
    from transformers import AutoTokenizer, T5EncoderModel

    from ditrt.runtime.manifest import TextInput

    from ..text_encoders import MaskedPromptGraph

    if not has_component(path, "text_encoder"):
        return None
    tok = AutoTokenizer.from_pretrained(path / "tokenizer")
    graph = MaskedPromptGraph(load(T5EncoderModel, "text_encoder"), text_len, cfg.caption_channels)
    spec = TextInput("tokenizer/tokenizer.json", text_len, tok.pad_token_id, lowercase=True)
    return TextEngine(graph, [("tokenizer", tok, spec)])


def resolution_bins(cfg: PixArtConfig, vae) -> dict[str, tuple[int, int]]:
    """The bins a pipeline folder's engines honour (pixels, so only with a VAE)."""
    from ..pixart_bins import pixart_bins

    return pixart_bins(cfg.sample_size) if vae is not None else {}


FAMILY = Family(
    name="pixart",
    checkpoint=Checkpoint(("PixArtTransformer2DModel",), PixArt, config_from_diffusers, KEYS),
    config=PixArtConfig,
    conditioning=conditioning,
    defaults=defaults,
    step_model=step_model,
    text_engine=text_engine,
    resolution_bins=resolution_bins,
)
