"""Declarative checkpoint key tables: one row per real difference between a checkpoint's names and ours.

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


def same_as(template: str) -> Callable:
    """Check that a duplicated tensor equals its first copy (named by template), then drop it."""
    def check(m: re.Match, value: torch.Tensor, state: dict) -> torch.Tensor:
        first = state[m.expand(template)]
        if not torch.equal(first, value):
            raise LoaderError(f"{m.group(0)!r} differs from {m.expand(template)!r}; per-block copies of this "
                              "tensor must be identical (as in converted checkpoints)")
        return value
    return check


DIT = [
    KeyRule(r"pos_embed\.proj\.(weight|bias)", r"x_embedder.proj.\1"),
    KeyRule(r"transformer_blocks\.0\.norm1\.emb\.timestep_embedder\.(linear_[12]\.(?:weight|bias))", r"t_embedder.\1"),
    KeyRule(r"transformer_blocks\.0\.norm1\.emb\.class_embedder\.embedding_table\.weight", "y_embedder.weight"),
    KeyRule(r"transformer_blocks\.(\d+)\.norm1\.emb\.(.*)", DROP, same_as(r"transformer_blocks.0.norm1.emb.\2")),
    KeyRule(r"transformer_blocks\.(\d+)\.norm1\.linear\.(weight|bias)", r"blocks.\1.adaLN.\2"),
    KeyRule(r"transformer_blocks\.(\d+)\.attn1\.to_([qkv])\.(weight|bias)", r"blocks.\1.attn.to_\2.\3"),
    KeyRule(r"transformer_blocks\.(\d+)\.attn1\.to_out\.0\.(weight|bias)", r"blocks.\1.attn.to_out.\2"),
    KeyRule(r"transformer_blocks\.(\d+)\.ff\.net\.0\.proj\.(weight|bias)", r"blocks.\1.ff.fc1.\2"),
    KeyRule(r"transformer_blocks\.(\d+)\.ff\.net\.2\.(weight|bias)", r"blocks.\1.ff.fc2.\2"),
    KeyRule(r"proj_out_1\.(weight|bias)", r"final.adaLN.\1"),
    KeyRule(r"proj_out_2\.(weight|bias)", r"final.linear.\1"),
]
