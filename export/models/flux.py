"""Flux.1 (Black Forest Labs 2024): MMDiT double-stream blocks, then single-stream blocks over [text; image], RoPE.

Matches diffusers' FluxTransformer2DModel (reference/architectures.md §5). The model works on packed tokens; the
2×2 latent packing and the position ids are pipeline work, given here as pure functions.
"""

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ditrt.runtime import schedules
from ditrt.runtime.errors import ConfigError, InputError
from ditrt.runtime.manifest import TensorSpec

from ..family import Checkpoint, Conditioning, Defaults, Family, Sampler, TextEngine, has_component, scheduler
from ..loaders import keymaps
from ..loaders.keymaps import KeyRule
from .blocks import JointBlock, clip_fp16
from .layers import (
    Attention,
    FinalLayer,
    MLPEmbedder,
    Modulation,
    TimestepEmbedder,
    modulate,
    rope_freqs,
    rope_omega,
)


@dataclass(frozen=True)
class FluxConfig:
    in_channels: int = 64  # 16 latent channels packed 2×2
    out_channels: int = 64
    hidden_size: int = 3072
    num_heads: int = 24
    depth: int = 19  # double-stream blocks
    depth_single: int = 38  # single-stream blocks
    mlp_ratio: float = 4.0
    joint_attention_dim: int = 4096  # T5-XXL
    pooled_projection_dim: int = 768  # CLIP-L pooled output
    guidance_embeds: bool = True  # dev: distilled guidance enters as an embedding; schnell has none
    axes_dims_rope: tuple[int, ...] = (
        16,
        56,
        56,
    )  # RoPE dims per id axis (index, row, column); sum = head_dim
    rope_theta: float = 10000.0
    time_factor: float = (
        1000.0  # t and guidance come as σ-scale values, embedded ×1000 (diffusers #L725, BFL)
    )

    def __post_init__(self):
        if self.hidden_size % self.num_heads:
            raise ConfigError(
                f"FluxConfig.hidden_size={self.hidden_size} must divide by num_heads={self.num_heads}"
            )
        if sum(self.axes_dims_rope) != self.head_dim or any(d % 2 for d in self.axes_dims_rope):
            raise ConfigError(
                f"FluxConfig.axes_dims_rope={self.axes_dims_rope} must be even sizes summing to "
                f"head_dim={self.head_dim}"
            )
        if self.depth < 0 or self.depth_single < 0:
            raise ConfigError(
                f"FluxConfig.depth={self.depth} and depth_single={self.depth_single} cannot be negative"
            )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


# Released architectures (reference/architectures.md §5.3); the weights come from their diffusers folders.
FLUX_DEV = FluxConfig()
FLUX_SCHNELL = replace(FLUX_DEV, guidance_embeds=False)


def double_stream_block(cfg: FluxConfig) -> JointBlock:
    """diffusers FluxTransformerBlock: an MMDiT block with qk RMSNorm and RoPE, its text clipped in fp16."""
    return JointBlock(cfg.hidden_size, cfg.num_heads, cfg.mlp_ratio, qk_norm=True, clip_context=True)


class SingleStreamBlock(nn.Module):
    """diffusers FluxSingleTransformerBlock: attention and MLP side by side from one modulation, one output Linear
    over [attention ‖ MLP] (BFL fuses the inputs as linear1 and the output as linear2)."""

    def __init__(self, cfg: FluxConfig):
        super().__init__()
        D, hidden = cfg.hidden_size, int(cfg.hidden_size * cfg.mlp_ratio)
        self.adaLN = Modulation(D, 1)
        self.attn = Attention(D, cfg.num_heads, qk_norm=True, out_proj=False)
        self.proj_mlp = nn.Linear(D, hidden)
        self.proj_out = nn.Linear(D + hidden, D)

    def forward(self, h: Tensor, temb: Tensor, rope: tuple[Tensor, Tensor]) -> Tensor:
        """h (B, T+N, D) text and image tokens, temb (B, D) -> new h."""
        (mod,) = self.adaLN(temb)
        n = modulate(h, mod)
        out = torch.cat(
            [self.attn(n, rope), F.gelu(self.proj_mlp(n), approximate="tanh")], dim=-1
        )  # (B, S, D+4D)
        return clip_fp16(h + mod.gate[:, None] * self.proj_out(out))


class Flux(nn.Module):
    def __init__(self, cfg: FluxConfig):
        super().__init__()
        self.cfg = cfg
        D = cfg.hidden_size
        self.x_embedder = nn.Linear(cfg.in_channels, D)
        self.t_embedder = TimestepEmbedder(D)
        self.rope_omega = rope_omega(cfg.axes_dims_rope, cfg.rope_theta)  # a constant, not a buffer
        if cfg.guidance_embeds:
            self.guidance_embedder = TimestepEmbedder(D)
        self.pooled_embedder = MLPEmbedder(cfg.pooled_projection_dim, D)
        self.context_embedder = nn.Linear(cfg.joint_attention_dim, D)
        self.transformer_blocks = nn.ModuleList(double_stream_block(cfg) for _ in range(cfg.depth))
        self.single_transformer_blocks = nn.ModuleList(
            SingleStreamBlock(cfg) for _ in range(cfg.depth_single)
        )
        self.final = FinalLayer(D, 1, cfg.out_channels)

    def conditioning(self, t: Tensor, guidance: Tensor | None, pooled: Tensor, dtype: torch.dtype) -> Tensor:
        """temb (B, D). t and guidance are rounded to the activation dtype before ×1000, as diffusers and BFL do."""
        if self.cfg.guidance_embeds and guidance is None:
            raise InputError(
                "this Flux model embeds guidance (guidance_embeds=True, as FLUX.1-dev): pass guidance"
            )
        if not self.cfg.guidance_embeds and guidance is not None:
            raise InputError(
                "this Flux model has no guidance input (guidance_embeds=False, as FLUX.1-schnell): "
                "pass guidance=None"
            )
        temb = self.t_embedder(t.to(dtype) * self.cfg.time_factor)
        if guidance is not None:
            temb = temb + self.guidance_embedder(guidance.to(dtype) * self.cfg.time_factor)
        return temb + self.pooled_embedder(pooled)

    def forward(
        self,
        hidden_states: Tensor,
        t: Tensor,
        encoder_hidden_states: Tensor,
        pooled_projections: Tensor,
        img_ids: Tensor,
        txt_ids: Tensor,
        guidance: Tensor | None = None,
    ) -> Tensor:
        """hidden_states (B, N, C_in) packed latents, t (B,) σ in [0, 1], encoder_hidden_states (B, T, 4096),
        pooled_projections (B, 768), img_ids (N, 3), txt_ids (T, 3), guidance (B,) -> velocity (B, N, C_out)."""
        x = self.x_embedder(hidden_states)  # (B, N, D)
        temb = self.conditioning(t, guidance, pooled_projections, x.dtype)  # (B, D)
        c = self.context_embedder(encoder_hidden_states)  # (B, T, D)
        rope = rope_freqs(torch.cat([txt_ids, img_ids]), self.cfg.axes_dims_rope, self.rope_omega)
        for block in self.transformer_blocks:
            x, c = block(x, c, temb, rope)
        h = torch.cat([c, x], dim=1)  # (B, T+N, D): one stream from here on
        for block in self.single_transformer_blocks:
            h = block(h, temb, rope)
        return self.final(h[:, c.shape[1] :], temb)


def _check_even(height: int, width: int) -> None:
    if height % 2 or width % 2:
        raise InputError(
            f"latent {height}x{width} must have even sides for Flux's 2x2 packing "
            f"(images a multiple of 16 px)"
        )


def pack_latents(latents: Tensor) -> Tensor:
    """(B, C, h, w) -> (B, h/2·w/2, 4C), channel index c·4 + dy·2 + dx (FluxPipeline._pack_latents)."""
    B, C, h, w = latents.shape
    _check_even(h, w)
    x = latents.view(B, C, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)  # (B, h/2, w/2, C, 2, 2)
    return x.reshape(B, (h // 2) * (w // 2), 4 * C)


def unpack_latents(packed: Tensor, height: int, width: int) -> Tensor:
    """(B, h/2·w/2, 4C) -> (B, C, h, w) for a latent of height h and width w (FluxPipeline._unpack_latents)."""
    _check_even(height, width)
    B, _, C4 = packed.shape
    x = packed.view(B, height // 2, width // 2, C4 // 4, 2, 2).permute(
        0, 3, 1, 4, 2, 5
    )  # (B, C, h/2, 2, w/2, 2)
    return x.reshape(B, C4 // 4, height, width)


def latent_image_ids(height: int, width: int) -> Tensor:
    """Ids (0, row, col) of the packed tokens of a height×width latent -> (h/2·w/2, 3) float32, row-major
    (FluxPipeline._prepare_latent_image_ids). Text ids are zeros (T, 3)."""
    _check_even(height, width)
    rows, cols = torch.meshgrid(torch.arange(height // 2), torch.arange(width // 2), indexing="ij")
    return torch.stack([torch.zeros_like(rows), rows, cols], dim=-1).reshape(-1, 3).float()


def config_from_diffusers(d: dict) -> FluxConfig:
    """diffusers FluxTransformer2DModel config.json -> FluxConfig (missing keys take diffusers' defaults)."""
    if d.get("patch_size", 1) != 1:
        raise ConfigError(
            f"Flux config patch_size={d['patch_size']} is not supported (only 1: tokens are packed "
            "by the pipeline)"
        )
    heads, head_dim = d.get("num_attention_heads", 24), d.get("attention_head_dim", 128)
    in_ch = d.get("in_channels", 64)
    return FluxConfig(
        in_channels=in_ch,
        out_channels=d.get("out_channels") or in_ch,
        hidden_size=heads * head_dim,
        num_heads=heads,
        depth=d.get("num_layers", 19),
        depth_single=d.get("num_single_layers", 38),
        joint_attention_dim=d.get("joint_attention_dim", 4096),
        pooled_projection_dim=d.get("pooled_projection_dim", 768),
        guidance_embeds=bool(d.get("guidance_embeds", False)),
        axes_dims_rope=tuple(d.get("axes_dims_rope", (16, 56, 56))),
    )


# --- family descriptor: what "flux" means to the exporter (export/family.py) ---
# diffusers checkpoint names -> ours (loaders/keymaps.py: the rules and the blocks' shared rows)
KEYS = keymaps.MMDIT_COMMON + [
    KeyRule(r"(x_embedder\.(?:weight|bias))", r"\1"),
    KeyRule(r"time_text_embed\.guidance_embedder\.(linear_[12]\.(?:weight|bias))", r"guidance_embedder.\1"),
    KeyRule(r"(single_transformer_blocks\.\d+)\.norm\.linear\.(weight|bias)", r"\1.adaLN.\2"),
    KeyRule(
        r"(single_transformer_blocks\.\d+\.(?:attn\.(?:to_[qkv]|norm_[qk])|proj_mlp|proj_out)\.(?:weight|bias))",
        r"\1",
    ),
]


FLUX_DEV_EULER = Sampler(
    scheduler(
        schedules.FLOW,
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    ),
    28,
    3.5,
)
FLUX_SCHNELL_EULER = Sampler(scheduler(schedules.FLOW, shift=1.0), 4, 0.0)
CLIP_LENGTH = 77
T5_LENGTH = 512  # FluxPipeline's max_sequence_length


def conditioning(cfg: FluxConfig, text_len: int | str, latent_hw: tuple[int, int]) -> Conditioning:
    """T5 states (B, T, 4096) and pooled CLIP-L (B, 768), one forward per step: dev embeds the guidance scale
    (distilled guidance), schnell has none; there is no CFG batch. The model takes σ (the scheduler's t / 1000)."""
    text = (
        TensorSpec("prompt_embeds", "float32", ["B", text_len, cfg.joint_attention_dim]),
        TensorSpec("pooled_prompt_embeds", "float32", ["B", cfg.pooled_projection_dim]),
    )
    return Conditioning((), text, cfg_batch=False, guidance_input=cfg.guidance_embeds, timestep_scale=1e-3)


def defaults(cfg: FluxConfig, pipeline_class: str | None) -> Defaults:
    """FluxPipeline passes sigmas linspace(1, 1/n, n) and μ(image tokens) to set_timesteps, always.
    schnell (no guidance embedding): 4 steps, no guidance."""
    call = {"custom_sigmas": "linspace", "mu": "always", "mu_defaults": [256, 4096, 0.5, 1.15]}
    return Defaults(FLUX_DEV_EULER if cfg.guidance_embeds else FLUX_SCHNELL_EULER, "T", call)


class PositionedFlux(nn.Module):
    """Flux at one latent size: the position ids FluxPipeline passes are constants of the engine's size,
    (0, row, column) per packed image token and zeros per text token (fp32, as RoPE wants them)."""

    def __init__(self, model: Flux, latent_hw: tuple[int, int]):
        super().__init__()
        self.model = model
        self.latent_hw = latent_hw

    def forward(
        self,
        hidden_states: Tensor,
        t: Tensor,
        encoder_hidden_states: Tensor,
        pooled_projections: Tensor,
        guidance: Tensor | None = None,
    ) -> Tensor:
        img_ids = latent_image_ids(*self.latent_hw)  # (N, 3)
        txt_ids = torch.zeros(encoder_hidden_states.shape[1], 3)  # (T, 3)
        return self.model(
            hidden_states, t, encoder_hidden_states, pooled_projections, img_ids, txt_ids, guidance
        )


def step_model(model: Flux, latent_hw: tuple[int, int], image_hw: tuple[int, int]) -> nn.Module:
    return PositionedFlux(model, latent_hw)


def text_engine(path, cfg: FluxConfig, text_len: int | str, load) -> TextEngine | None:
    """CLIP-L's pooled output and T5-XXL's states, without masks (FluxPipeline's encode_prompt)."""
    from transformers import CLIPTextModel, T5EncoderModel

    from ..text_encoders import FluxPromptGraph, unmasked_tokenizers

    if not has_component(path, "text_encoder_2"):
        return None
    graph = FluxPromptGraph(
        load(CLIPTextModel, "text_encoder"), load(T5EncoderModel, "text_encoder_2"), CLIP_LENGTH, text_len
    )
    rows = [("tokenizer", "clip_l", CLIP_LENGTH), ("tokenizer_2", "t5", T5_LENGTH)]
    return TextEngine(graph, unmasked_tokenizers(path, rows))


FAMILY = Family(
    name="flux",
    checkpoint=Checkpoint(("FluxTransformer2DModel",), Flux, config_from_diffusers, KEYS),
    config=FluxConfig,
    conditioning=conditioning,
    defaults=defaults,
    step_model=step_model,
    text_engine=text_engine,
    packing=2,  # the loop runs on 2×2-packed latents (B, H/2·W/2, 4·C)
    latent_hw=lambda cfg: (128, 128),  # 1024 px: Flux has no native sample size
)
