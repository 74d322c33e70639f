"""What each engine computes, and its I/O declared once.

The denoiser *step* graph holds the CFG batch, the guidance combine and the sampler update, so the runtime
loop is one engine call per step plus a buffer swap (see DESIGN.md). Per-step scalars come from
runtime/schedules.py:
    x0     = clamp(p·x + q·g, −clip, clip)
    x_next = a·x + b·x0 + c·x0_prev + e·x0_prev2 + d·g
where g is the guided model output. Classifier-free guidance is a leading "n" axis on the paired conditioning
inputs: n = 2 holds [negative; positive] and the graph combines g = out_u + guidance·(out_c − out_u); n = 1 holds
the positive branch alone (diffusers' guidance_scale <= 1), which halves the denoiser work and gives g = out_c.
"""

import inspect

import torch
from torch import Tensor, nn

from ditrt.runtime.manifest import TensorSpec

from .family import BRANCH_AXIS, Conditioning
from .precision import TORCH_DTYPES
from .registry import family_of

SCALARS = ("t", "guidance", "p", "q", "a", "b", "c", "e", "d", "clip")
STATE = ("x", "x0_prev", "x0_prev2")  # the sampler state the runtime carries between steps


def conditioning(model: nn.Module, text_len: int | str, latent_hw: tuple[int, int]) -> Conditioning:
    """The step's model inputs beyond (x, t), as the model's family declares them."""
    return family_of(model).conditioning(model.cfg, text_len, latent_hw)


def default_latent_hw(model: nn.Module) -> tuple[int, int]:
    return family_of(model).default_latent_hw(model.cfg)


def latent_shape(model: nn.Module, latent_hw: tuple[int, int]) -> list:
    """The sampler's latents: (B, C, H, W), or (B, H/k·W/k, C) tokens where the family packs k×k (Flux)."""
    H, W = latent_hw
    k = family_of(model).packing
    if k > 1:
        return ["B", (H // k) * (W // k), model.cfg.in_channels]
    return ["B", model.cfg.in_channels, H, W]


def step_io(
    model: nn.Module, text_len: int | str = 0, latent_hw: tuple[int, int] | None = None
) -> tuple[list[TensorSpec], list[TensorSpec]]:
    latent_hw = latent_hw or default_latent_hw(model)
    cond, latent = conditioning(model, text_len, latent_hw), latent_shape(model, latent_hw)
    paired = [
        TensorSpec(s.name, s.dtype, [BRANCH_AXIS, *s.shape]) if cond.cfg_batch else s for s in cond.paired
    ]
    inputs = [TensorSpec(s, "float32", latent) for s in STATE]
    inputs += [TensorSpec(s, "float32", []) for s in SCALARS] + paired + list(cond.shared)
    return inputs, [TensorSpec("x_next", "float32", latent), TensorSpec("x0", "float32", latent)]


class StepGraph(nn.Module):
    """One sampler step of any family: model forward over the CFG branches, guidance combine, update.

    The model computes in its parameters' dtype; the engine's inputs and outputs stay fp32, cast at the model's
    boundary, so the guidance combine and the sampler update (the state carried across steps) run in fp32.
    """

    def __init__(
        self,
        model: nn.Module,
        text_len: int | str = 0,
        latent_hw: tuple[int, int] | None = None,
        image_hw: tuple[int, int] | None = None,
    ):
        """image_hw: the decoded image's (H, W) in pixels where the family's step holds it (PixArt-α); without a
        VAE the image is the latent."""
        super().__init__()
        family = family_of(model)
        latent_hw = latent_hw or family.default_latent_hw(model.cfg)
        self.cond = family.conditioning(model.cfg, text_len, latent_hw)
        self.model = (
            family.step_model(model, latent_hw, image_hw or latent_hw) if family.step_model else model
        )
        self.channels = model.cfg.in_channels
        self.dtype = next(model.parameters()).dtype
        conds = step_io(model, text_len, latent_hw)[0][len(STATE) + len(SCALARS) :]
        self.cast_conds = tuple(s.dtype == "float32" for s in conds)

    def forward(
        self,
        x: Tensor,
        x0_prev: Tensor,
        x0_prev2: Tensor,
        t: Tensor,
        guidance: Tensor,
        p: Tensor,
        q: Tensor,
        a: Tensor,
        b: Tensor,
        c: Tensor,
        e: Tensor,
        d: Tensor,
        clip: Tensor,
        *conds: Tensor,
    ) -> tuple[Tensor, Tensor]:
        B, C, k = x.shape[0], self.channels, len(self.cond.paired)
        t = t * self.cond.timestep_scale
        conds = tuple(v.to(self.dtype) if cast else v for v, cast in zip(conds, self.cast_conds))
        if not self.cond.cfg_batch:  # Flux: guidance goes into the model (dev) or nowhere (schnell)
            extra = {"guidance": guidance.expand(B)} if self.cond.guidance_input else {}
            guided = self.model(x.to(self.dtype), t.expand(B), *conds, **extra).float()
        else:
            paired, shared = conds[:k], conds[k:]
            n = paired[0].shape[0]  # CFG branches, [negative; positive]: 2, or 1 (positive only)
            if self.cond.cond_first:  # DiT batches [cond; uncond]
                paired = tuple(v.flip(0) for v in paired)
            batched = [v.reshape(n * B, *v.shape[2:]) for v in paired]  # (n, B, ...) -> (n·B, ...)
            batched += [s.unsqueeze(0).expand(n, *s.shape).reshape(n * B, *s.shape[1:]) for s in shared]
            x_in = x.unsqueeze(0).expand(n, *x.shape).reshape(n * B, *x.shape[1:]).to(self.dtype)
            out = self.model(x_in, t.expand(n * B), *batched)
            out = (
                out[:, :C].float().reshape(n, B, C, *out.shape[2:])
            )  # learned sigma: drop the variance channels
            if self.cond.cond_first:
                out = out.flip(0)
            uncond, cond = out[0], out[n - 1]  # n = 1: both are the positive branch, so g = out_c
            guided = uncond + guidance * (cond - uncond)
        x0 = torch.clamp(p * x + q * guided, -clip, clip)
        x_next = a * x + b * x0 + c * x0_prev + e * x0_prev2 + d * guided
        return x_next, x0


class DecoderGraph(nn.Module):
    """VAE decoder engine: sampler latents -> image in [0, 1] (scaling, shift and clamp inside)."""

    def __init__(self, vae: nn.Module):
        super().__init__()
        self.vae = vae

    def forward(self, latents: Tensor) -> Tensor:  # fp32 in and out, whatever the VAE's dtype
        image = self.vae(latents.to(next(self.vae.parameters()).dtype)).float()
        return (image / 2 + 0.5).clamp(0, 1)


def decoder_io(vae: nn.Module, latent_hw: tuple[int, int]) -> tuple[list[TensorSpec], list[TensorSpec]]:
    H, W = latent_hw
    up = vae.cfg.spatial_factor
    return (
        [TensorSpec("latents", "float32", ["B", vae.cfg.latent_channels, H, W])],
        [TensorSpec("image", "float32", ["B", vae.cfg.image_channels, up * H, up * W])],
    )


def sample_inputs(specs: list[TensorSpec], dims: dict[str, int], seed: int = 0) -> tuple[Tensor, ...]:
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


DIM_MAX = {"n": 2}  # CFG branches: positive only, or negative and positive


def export_args(
    module: nn.Module, inputs: list[TensorSpec], max_dim: int = 1024
) -> tuple[tuple[Tensor, ...], tuple]:
    """Sample arguments and torch.export dynamic_shapes for a graph's declared inputs: every symbolic axis ("B")
    becomes a Dim of that name, in 1..max_dim (the CFG axis in 1..2); forward(..., *conds) takes its tail as one
    nested tuple."""
    dims = {
        d: torch.export.Dim(d, min=1, max=DIM_MAX.get(d, max_dim))
        for s in inputs
        for d in s.shape
        if isinstance(d, str)
    }
    dynamic = [{i: dims[d] for i, d in enumerate(s.shape) if isinstance(d, str)} or None for s in inputs]
    params = inspect.signature(module.forward).parameters.values()
    if any(p.kind is p.VAR_POSITIONAL for p in params):
        n = sum(p.kind is p.POSITIONAL_OR_KEYWORD for p in params)
        dynamic = dynamic[:n] + [tuple(dynamic[n:])]
    return sample_inputs(inputs, {d: 2 for d in dims}), tuple(dynamic)
