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

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .models.dit import DiT
from .models.flux import Flux
from .models.mmdit import MMDiT
from .models.pixart import PixArt
from .models.sana import Sana

TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
                "int64": torch.int64, "int32": torch.int32}
SCALARS = ("t", "guidance", "p", "q", "a", "b", "c", "e", "d", "clip")
STATE = ("x", "x0_prev", "x0_prev2")  # the sampler state the runtime carries between steps
BRANCH_AXIS = "n"  # CFG branches: 1 (positive only) or 2 (negative, positive)
# Float inputs that feed fp32 sinusoids and RoPE tables: never rounded to a reduced compute dtype.
FP32_INPUTS = ("img_ids", "txt_ids", "resolution", "aspect_ratio")


@dataclass(frozen=True)
class IOSpec:
    name: str
    dtype: str
    shape: tuple  # ints are fixed, strings are symbolic ("B"); () is a scalar


@dataclass(frozen=True)
class Conditioning:
    """How a family's step graph feeds its model, beyond (x, t)."""
    paired: tuple[IOSpec, ...]  # per-sample inputs, given per CFG branch: shape ("n", "B", ...) in the engine
    shared: tuple[IOSpec, ...] = ()  # inputs used as they are by every branch (micro-conditions, ids)
    cfg_batch: bool = True  # False: one forward per step, guidance embedded in the model (Flux)
    cond_first: bool = False  # model batch order: DiT/SiT [cond; uncond], PixArt/Sana/SD3 [uncond; cond]
    null_class: int | None = None  # class-conditional: the label of the negative branch (the runtime fills it)
    timestep_scale: float = 1.0  # model timestep = t · scale (Flux takes σ, the scheduler gives σ·1000)


def conditioning(model: nn.Module, text_len: int, latent_hw: tuple[int, int]) -> Conditioning:
    """The conditioning of each family, written once. text_len: text tokens; latent_hw: latent (H, W)."""
    T, f32, i64 = text_len, "float32", "int64"
    cfg = model.cfg
    if isinstance(model, DiT):
        return Conditioning((IOSpec("class_labels", i64, ("B",)),), cond_first=True, null_class=cfg.num_classes)
    if isinstance(model, (PixArt, Sana)):
        text = (IOSpec("prompt_embeds", f32, ("B", T, cfg.caption_channels)),
                IOSpec("prompt_attention_mask", i64, ("B", T)))
        micro = (IOSpec("resolution", f32, ("B", 2)), IOSpec("aspect_ratio", f32, ("B", 1)))
        return Conditioning(text, micro if getattr(cfg, "micro_conditions", False) else ())
    if isinstance(model, MMDiT):
        return Conditioning((IOSpec("prompt_embeds", f32, ("B", T, cfg.joint_attention_dim)),
                             IOSpec("pooled_prompt_embeds", f32, ("B", cfg.pooled_projection_dim))))
    if isinstance(model, Flux):
        n = (latent_hw[0] // 2) * (latent_hw[1] // 2)  # 2×2-packed latent tokens
        return Conditioning((), (IOSpec("prompt_embeds", f32, ("B", T, cfg.joint_attention_dim)),
                                 IOSpec("pooled_prompt_embeds", f32, ("B", cfg.pooled_projection_dim)),
                                 IOSpec("img_ids", f32, (n, 3)), IOSpec("txt_ids", f32, (T, 3))),
                            cfg_batch=False, timestep_scale=1e-3)
    raise TypeError(f"no step graph for {type(model).__name__}")


def default_latent_hw(model: nn.Module) -> tuple[int, int]:
    size = getattr(model.cfg, "sample_size", None)
    if size is None:
        raise ValueError(f"{type(model).__name__} has no default latent size; give latent_hw=(H, W)")
    return size, size


def latent_shape(model: nn.Module, latent_hw: tuple[int, int]) -> tuple:
    H, W = latent_hw
    if isinstance(model, Flux):  # the loop runs on packed latents (B, H/2·W/2, 4·C)
        return ("B", (H // 2) * (W // 2), model.cfg.in_channels)
    return ("B", model.cfg.in_channels, H, W)


def step_io(model: nn.Module, text_len: int = 0,
            latent_hw: tuple[int, int] | None = None) -> tuple[list[IOSpec], list[IOSpec]]:
    latent_hw = latent_hw or default_latent_hw(model)
    cond, latent = conditioning(model, text_len, latent_hw), latent_shape(model, latent_hw)
    paired = tuple(IOSpec(s.name, s.dtype, (BRANCH_AXIS, *s.shape)) if cond.cfg_batch else s for s in cond.paired)
    inputs = [IOSpec(s, "float32", latent) for s in STATE]
    inputs += [IOSpec(s, "float32", ()) for s in SCALARS] + list(paired + cond.shared)
    return inputs, [IOSpec("x_next", "float32", latent), IOSpec("x0", "float32", latent)]


class StepGraph(nn.Module):
    """One sampler step of any family: model forward over the CFG branches, guidance combine, update.

    The model computes in its parameters' dtype; the engine's inputs and outputs stay fp32, cast at the model's
    boundary, so the guidance combine and the sampler update (the state carried across steps) run in fp32.
    """

    def __init__(self, model: nn.Module, text_len: int = 0, latent_hw: tuple[int, int] | None = None):
        super().__init__()
        self.model, self.cond = model, conditioning(model, text_len, latent_hw or default_latent_hw(model))
        self.dtype = next(model.parameters()).dtype
        conds = step_io(model, text_len, latent_hw)[0][len(STATE) + len(SCALARS):]
        self.cast_conds = tuple(s.dtype == "float32" and s.name not in FP32_INPUTS for s in conds)

    def forward(self, x: Tensor, x0_prev: Tensor, x0_prev2: Tensor, t: Tensor, guidance: Tensor, p: Tensor,
                q: Tensor, a: Tensor, b: Tensor, c: Tensor, e: Tensor, d: Tensor, clip: Tensor,
                *conds: Tensor) -> tuple[Tensor, Tensor]:
        B, C, k = x.shape[0], self.model.cfg.in_channels, len(self.cond.paired)
        t = t * self.cond.timestep_scale
        conds = tuple(v.to(self.dtype) if cast else v for v, cast in zip(conds, self.cast_conds))
        if not self.cond.cfg_batch:  # Flux: guidance goes into the model (dev) or nowhere (schnell)
            g = guidance.expand(B) if getattr(self.model.cfg, "guidance_embeds", False) else None
            guided = self.model(x.to(self.dtype), t.expand(B), *conds, **({"guidance": g} if g is not None else {}))
            guided = guided.float()
        else:
            paired, shared = conds[:k], conds[k:]
            n = paired[0].shape[0]  # CFG branches, [negative; positive]: 2, or 1 (positive only)
            if self.cond.cond_first:  # DiT batches [cond; uncond]
                paired = tuple(v.flip(0) for v in paired)
            batched = [v.reshape(n * B, *v.shape[2:]) for v in paired]  # (n, B, ...) -> (n·B, ...)
            batched += [s.unsqueeze(0).expand(n, *s.shape).reshape(n * B, *s.shape[1:]) for s in shared]
            x_in = x.unsqueeze(0).expand(n, *x.shape).reshape(n * B, *x.shape[1:]).to(self.dtype)
            out = self.model(x_in, t.expand(n * B), *batched)
            out = out[:, :C].float().reshape(n, B, C, *out.shape[2:])  # learned sigma: drop the variance channels
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


def decoder_io(vae: nn.Module, latent_hw: tuple[int, int]) -> tuple[list[IOSpec], list[IOSpec]]:
    H, W = latent_hw
    up = vae.cfg.spatial_factor
    return ([IOSpec("latents", "float32", ("B", vae.cfg.latent_channels, H, W))],
            [IOSpec("image", "float32", ("B", vae.cfg.image_channels, up * H, up * W))])


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
