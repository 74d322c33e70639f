"""Declarative checkpoint key rules: one row per real difference between a checkpoint's names and ours. Each
family file (models/<family>.py) holds its KEYS; the rows shared by blocks the families share are here.

A rule maps keys matching `src` (a full regex) to `dst` (a template using the match groups), or drops them.
A transform may rewrite the tensor (`same_as` checks duplicated tensors before dropping them).
"""

import re
from dataclasses import dataclass
from typing import Callable

import torch

from ditrt.runtime.errors import LoaderError

DROP = None


@dataclass(frozen=True)
class KeyRule:
    src: str
    dst: str | None
    transform: Callable | None = None  # (match, tensor, state) -> tensor

    def apply(self, m: re.Match, value: torch.Tensor, state: dict) -> list[tuple[str, torch.Tensor]]:
        value = self.transform(m, value, state) if self.transform else value
        return [] if self.dst is DROP else [(m.expand(self.dst), value)]


def swap_halves(m: re.Match, value: torch.Tensor, state: dict) -> torch.Tensor:
    """diffusers' AdaLayerNormContinuous rows are (scale, shift); FinalLayer reads (shift, scale), as BFL/SAI store."""
    scale, shift = value.chunk(2, dim=0)
    return torch.cat([shift, scale], dim=0)


def same_as(template: str) -> Callable:
    """Check that a duplicated tensor equals its first copy (named by template), then drop it."""

    def check(m: re.Match, value: torch.Tensor, state: dict) -> torch.Tensor:
        first = state[m.expand(template)]
        if not torch.equal(first, value):
            raise LoaderError(
                f"{m.group(0)!r} differs from {m.expand(template)!r}; per-block copies of this "
                "tensor must be identical (as in converted checkpoints)"
            )
        return value

    return check


# diffusers BasicTransformerBlock leaves (DiT, PixArt): attn1 -> attn, ff.net.{0.proj,2} -> ff.fc{1,2}
SELF_ATTN = [
    KeyRule(r"transformer_blocks\.(\d+)\.attn1\.to_([qkv])\.(weight|bias)", r"blocks.\1.attn.to_\2.\3"),
    KeyRule(r"transformer_blocks\.(\d+)\.attn1\.to_out\.0\.(weight|bias)", r"blocks.\1.attn.to_out.\2"),
]
GELU_FF = [
    KeyRule(r"transformer_blocks\.(\d+)\.ff\.net\.0\.proj\.(weight|bias)", r"blocks.\1.ff.fc1.\2"),
    KeyRule(r"transformer_blocks\.(\d+)\.ff\.net\.2\.(weight|bias)", r"blocks.\1.ff.fc2.\2"),
]


# PixArt and Sana share the adaLN-single skeleton; their blocks differ only in what the FFN/attention hold.
ADALN_SINGLE = [
    KeyRule(r"(?:adaln_single|time_embed)\.emb\.timestep_embedder\.(.*)", r"t_embedder.\1"),
    KeyRule(r"adaln_single\.emb\.(resolution|aspect_ratio)_embedder\.(.*)", r"\1_embedder.\2"),
    KeyRule(r"(?:adaln_single|time_embed)\.linear\.(weight|bias)", r"t_block.\1"),
    KeyRule(r"pos_embed\.proj\.(weight|bias)|patch_embed\.proj\.(weight|bias)", r"x_embedder.proj.\1\2"),
    KeyRule(
        r"(caption_projection\.linear_[12]\.(?:weight|bias)|caption_norm\.weight|scale_shift_table|"
        r"proj_out\.(?:weight|bias))",
        r"\1",
    ),
    KeyRule(r"transformer_blocks\.(\d+)\.scale_shift_table", r"blocks.\1.scale_shift_table"),
    *SELF_ATTN,
    KeyRule(r"transformer_blocks\.(\d+)\.attn2\.to_([qkv])\.(weight|bias)", r"blocks.\1.cross_attn.to_\2.\3"),
    KeyRule(r"transformer_blocks\.(\d+)\.attn2\.to_out\.0\.(weight|bias)", r"blocks.\1.cross_attn.to_out.\2"),
]


# SD3/SD3.5 and Flux. Our JointAttention holds one Attention per stream (img, txt); diffusers keeps both flat.
MMDIT_COMMON = [
    KeyRule(r"(transformer_blocks\.\d+\.attn)\.(to_[qkv]|norm_[qk])\.(weight|bias)", r"\1.img.\2.\3"),
    KeyRule(r"(transformer_blocks\.\d+\.attn)\.to_out\.0\.(weight|bias)", r"\1.img.to_out.\2"),
    KeyRule(r"(transformer_blocks\.\d+\.attn)\.add_([qkv])_proj\.(weight|bias)", r"\1.txt.to_\2.\3"),
    KeyRule(r"(transformer_blocks\.\d+\.attn)\.norm_added_([qk])\.weight", r"\1.txt.norm_\2.weight"),
    KeyRule(r"(transformer_blocks\.\d+\.attn)\.to_add_out\.(weight|bias)", r"\1.txt.to_out.\2"),
    KeyRule(r"(transformer_blocks\.\d+)\.norm1(_context)?\.linear\.(weight|bias)", r"\1.adaLN\2.\3"),
    KeyRule(r"(transformer_blocks\.\d+\.ff(?:_context)?)\.net\.0\.proj\.(weight|bias)", r"\1.fc1.\2"),
    KeyRule(r"(transformer_blocks\.\d+\.ff(?:_context)?)\.net\.2\.(weight|bias)", r"\1.fc2.\2"),
    KeyRule(r"time_text_embed\.timestep_embedder\.(linear_[12]\.(?:weight|bias))", r"t_embedder.\1"),
    KeyRule(r"time_text_embed\.text_embedder\.(linear_[12]\.(?:weight|bias))", r"pooled_embedder.\1"),
    KeyRule(r"(context_embedder\.(?:weight|bias))", r"\1"),
    KeyRule(r"norm_out\.linear\.(weight|bias)", r"final.adaLN.\1", swap_halves),
    KeyRule(r"proj_out\.(weight|bias)", r"final.linear.\1"),
]

# AutoencoderDC (DC-AE): only the decoder is exported; its names are diffusers' own.
