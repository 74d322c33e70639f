"""Sana: linear DiT with ReLU linear attention, Mix-FFN (GLUMBConv), adaLN-single and Gemma-2 text (Xie et al. 2024)."""

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
from ..loaders.keymaps import KeyRule
from .blocks import CrossDiTBlock, output_norm
from .layers import (
    CaptionProjection,
    CrossAttention,
    GLUMBConv,
    LinearAttention,
    PatchEmbed,
    RMSNorm,
    TimestepEmbedder,
    mask_to_bias,
    sincos_pos_embed_2d,
    unpatchify,
)


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
    interpolation_scale: float | None = (
        None  # None: no position embedding (512/1024 models); 2K/4K use sin-cos
    )
    norm_eps: float = 1e-6  # the blocks' LayerNorms; the output norm's is 1e-6 always, as in diffusers

    def __post_init__(self):
        for heads in (self.num_heads, self.cross_num_heads):
            if self.hidden_size % heads:
                raise ConfigError(
                    f"SanaConfig.hidden_size={self.hidden_size} is not divisible by {heads} heads"
                )


def sana_block(cfg: SanaConfig) -> CrossDiTBlock:
    """PixArt's block with ReLU linear self-attention and the Mix-FFN (GLUMBConv) in place of the MLP."""
    D = cfg.hidden_size
    return CrossDiTBlock(
        D,
        LinearAttention(D, cfg.num_heads),
        CrossAttention(D, D, cfg.cross_num_heads),
        GLUMBConv(D, cfg.mlp_ratio),
        cfg.norm_eps,
    )


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
        self.blocks = nn.ModuleList(sana_block(cfg) for _ in range(cfg.depth))
        self.scale_shift_table = nn.Parameter(torch.zeros(2, D))
        self.proj_out = nn.Linear(D, cfg.patch_size**2 * cfg.out_channels)

    def forward(
        self,
        x: Tensor,
        t: Tensor,
        encoder_hidden_states: Tensor,
        encoder_attention_mask: Tensor | None = None,
    ) -> Tensor:
        """x (B, C, H, W), t (B,) timesteps (int(σ·1000) for flow), Gemma states (B, T, 2304), keep-mask (B, T)."""
        p = self.cfg.patch_size
        h, w = x.shape[-2] // p, x.shape[-1] // p
        tokens = self.x_embedder(x)  # (B, h·w, D)
        if self.cfg.interpolation_scale is not None:
            base = self.cfg.sample_size // p
            tokens = tokens + sincos_pos_embed_2d(
                self.cfg.hidden_size, h, w, base, self.cfg.interpolation_scale
            ).to(x)
        emb = self.t_embedder(t)
        t6 = self.t_block(F.silu(emb))  # (B, 6D), shared by all blocks
        y = self.caption_norm(self.caption_projection(encoder_hidden_states))
        bias = None if encoder_attention_mask is None else mask_to_bias(encoder_attention_mask, x.dtype)
        for block in self.blocks:
            tokens = block(tokens, t6, y, bias, (h, w))
        tokens = output_norm(tokens, self.scale_shift_table, emb)
        return unpatchify(self.proj_out(tokens), h, w, p, self.cfg.out_channels)


SANA_1600M_1024 = SanaConfig()
SANA_600M_1024 = replace(SANA_1600M_1024, hidden_size=1152, depth=28, num_heads=36, cross_num_heads=16)


def config_from_diffusers(d: dict) -> SanaConfig:
    """diffusers SanaTransformer2DModel config.json -> SanaConfig."""
    from ditrt.runtime.errors import ConfigError

    fixed = {
        "guidance_embeds": False,
        "qk_norm": None,
        "timestep_scale": 1.0,
        "attention_bias": False,
        "norm_elementwise_affine": False,
    }
    for key, want in fixed.items():
        if d.get(key, want) != want:
            raise ConfigError(f"Sana config {key}={d[key]!r} is not supported yet (only {want!r})")
    heads, head_dim = d.get("num_attention_heads", 70), d.get("attention_head_dim", 32)
    D = heads * head_dim
    cross_heads, cross_dim = d.get("num_cross_attention_heads", 20), d.get("cross_attention_head_dim", 112)
    if cross_heads * cross_dim != D or d.get("cross_attention_dim", D) != D:
        raise ConfigError(
            f"Sana config: cross-attention width {cross_heads}×{cross_dim} and cross_attention_dim "
            f"{d.get('cross_attention_dim')} must equal the model width {D}"
        )
    return SanaConfig(
        sample_size=d.get("sample_size", 32),
        in_channels=d.get("in_channels", 32),
        out_channels=d.get("out_channels") or d.get("in_channels", 32),
        patch_size=d.get("patch_size", 1),
        hidden_size=D,
        depth=d.get("num_layers", 20),
        num_heads=heads,
        cross_num_heads=cross_heads,
        caption_channels=d.get("caption_channels", 2304),
        mlp_ratio=d.get("mlp_ratio", 2.5),
        interpolation_scale=d.get("interpolation_scale"),
        norm_eps=d.get("norm_eps", 1e-6),
    )


# --- family descriptor: what "sana" means to the exporter (export/family.py) ---
# diffusers checkpoint names -> ours (loaders/keymaps.py: the rules and the blocks' shared rows)
KEYS = keymaps.ADALN_SINGLE + [
    KeyRule(r"transformer_blocks\.(\d+)\.ff\.(conv_\w+\.(?:weight|bias))", r"blocks.\1.ff.\2"),
]


SANA_DPM = Sampler(
    scheduler(schedules.DPM, prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0), 20, 4.5
)

# SanaPipeline's default complex_human_instruction (diffusers pipeline_sana.py), byte for byte.
SANA_INSTRUCTION = (
    "Given a user prompt, generate an 'Enhanced prompt' that provides detailed visual descriptions suitable for image "
    "generation. Evaluate the level of detail in the user prompt:",
    "- If the prompt is simple, focus on adding specifics about colors, shapes, sizes, textures, and spatial "
    "relationships to create vivid and concrete scenes.",
    "- If the prompt is already detailed, refine and enhance the existing details slightly without overcomplicating.",
    "Here are examples of how to transform or refine prompts:",
    "- User Prompt: A cat sleeping -> Enhanced: A small, fluffy white cat curled up in a round shape, sleeping "
    "peacefully on a warm sunny windowsill, surrounded by pots of blooming red flowers.",
    "- User Prompt: A busy city street -> Enhanced: A bustling city street scene at dusk, featuring glowing street "
    "lamps, a diverse crowd of people in colorful clothing, and a double-decker bus passing by towering glass "
    "skyscrapers.",
    "Please generate only the enhanced description for the prompt below and avoid including any additional "
    "commentary or evaluations:",
    "User Prompt: ",
)


def conditioning(cfg: SanaConfig, text_len: int, latent_hw: tuple[int, int]) -> Conditioning:
    """Gemma-2 states (B, T, 2304) and their keep-mask (B, T); the batch is [uncond; cond]."""
    return Conditioning(masked_text(cfg.caption_channels, text_len))


def defaults(cfg: SanaConfig, pipeline_class: str | None) -> Defaults:
    return Defaults(SANA_DPM, 300)


def text_engine(path, cfg: SanaConfig, text_len: int, load) -> TextEngine | None:
    """Gemma-2 with its attention mask. The positive prompt gets the instruction prefix, then the pipeline keeps
    BOS and the prompt's last tokens; the negative prompt goes as it is. So the engine's length is dynamic."""
    from transformers import AutoTokenizer, Gemma2Model

    from ditrt.runtime.manifest import TextInput

    from ..text_encoders import MaskedPromptGraph

    if not has_component(path, "text_encoder"):
        return None
    tok = AutoTokenizer.from_pretrained(path / "tokenizer")
    prefix = "\n".join(SANA_INSTRUCTION)
    prefixed = len(tok.encode(prefix)) + text_len - 2  # diffusers: max_length_all
    graph = MaskedPromptGraph(load(Gemma2Model, "text_encoder"), "T", cfg.caption_channels)
    spec = TextInput(
        "tokenizer/tokenizer.json",
        text_len,
        tok.pad_token_id,
        lowercase=True,
        prefix=prefix,
        prefixed_max_length=prefixed,
    )
    return TextEngine(graph, [("tokenizer", tok, spec)])


FAMILY = Family(
    name="sana",
    checkpoint=Checkpoint(("SanaTransformer2DModel",), Sana, config_from_diffusers, KEYS),
    config=SanaConfig,
    conditioning=conditioning,
    defaults=defaults,
    text_engine=text_engine,
)
