"""What each engine computes, and its I/O declared once.

The denoiser *step* graph holds the CFG batch, the guidance combine and the sampler update, so the runtime
loop is one engine call per step plus a pointer swap (see DESIGN.md). Per-step scalars come from
runtime/schedules.py:
    x0     = p·x + q·(out_u + g·(out_c − out_u))
    x_next = a·x + b·x0 + c·x0_prev
"""

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .models.dit import DiT

TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
                "int64": torch.int64, "int32": torch.int32}
SCALARS = ("t", "guidance", "p", "q", "a", "b", "c")


@dataclass(frozen=True)
class IOSpec:
    name: str
    dtype: str
    shape: tuple  # ints are fixed, strings are symbolic ("B"); () is a scalar


def class_step_io(model: DiT) -> tuple[list[IOSpec], list[IOSpec]]:
    cfg = model.cfg
    latent = ("B", cfg.in_channels, cfg.sample_size, cfg.sample_size)
    inputs = [IOSpec("x", "float32", latent), IOSpec("x0_prev", "float32", latent),
              IOSpec("class_labels", "int64", ("B",))] + [IOSpec(s, "float32", ()) for s in SCALARS]
    return inputs, [IOSpec("x_next", "float32", latent), IOSpec("x0", "float32", latent)]


class ClassStepGraph(nn.Module):
    """One sampler step of a class-conditional model, CFG batch [cond; null] (DiT order) inside."""

    def __init__(self, model: DiT):
        super().__init__()
        self.model = model

    def forward(self, x: Tensor, x0_prev: Tensor, class_labels: Tensor, t: Tensor, guidance: Tensor,
                p: Tensor, q: Tensor, a: Tensor, b: Tensor, c: Tensor) -> tuple[Tensor, Tensor]:
        null = torch.full_like(class_labels, self.model.cfg.num_classes)
        timesteps = t.expand(2 * x.shape[0])
        out = self.model(torch.cat([x, x]), timesteps, torch.cat([class_labels, null]))
        out = out[:, : x.shape[1]]  # learn_sigma models: keep the prediction channels
        cond, uncond = out[: x.shape[0]], out[x.shape[0]:]  # slices, not chunk(): chunk specialises B
        guided = uncond + guidance * (cond - uncond)
        x0 = p * x + q * guided
        return a * x + b * x0 + c * x0_prev, x0


def sample_inputs(specs: list[IOSpec], dims: dict[str, int], seed: int = 0) -> tuple[Tensor, ...]:
    """Tensors matching specs, symbolic axes set from dims; int inputs in [0, 10)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for s in specs:
        shape = tuple(dims[d] if isinstance(d, str) else d for d in s.shape)
        if s.dtype.startswith("int"):
            out.append(torch.randint(0, 10, shape, generator=g, dtype=TORCH_DTYPES[s.dtype]))
        else:
            out.append(torch.rand(shape, generator=g).to(TORCH_DTYPES[s.dtype]))
    return tuple(out)
