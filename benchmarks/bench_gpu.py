"""End-to-end latency on one GPU, in one run: our engines against diffusers eager and diffusers + torch.compile.

    python benchmarks/bench_gpu.py                   # H100/H200: the five models within 7 minutes, compiles included
    python benchmarks/bench_gpu.py --quick           # 2 minutes: DiT-XL/2 (then Sana), eager vs ours, 10 steps
    python benchmarks/bench_gpu.py --models dit-xl-2-256,flux-dev --budget-s 300
    python benchmarks/bench_gpu.py --dry-run         # CPU: tiny DiT and Sana, fp32, 2 steps, the same code paths
    python benchmarks/bench_gpu.py --dry-run --models all     # every family (about 2.5 minutes on 2 cores)

Models, in priority order (a run that runs short of time drops the last ones): sana-1600m-1024, sd35-medium,
dit-xl-2-256, pixart-sigma-1024, flux-dev (export/presets.py), at their native sizes, batch 1, bf16, random weights.

Systems, each timed on the same function from the same noise and conditioning:
- diffusers-eager: the family's diffusers pipeline (SanaPipeline, StableDiffusion3Pipeline, DiTPipeline,
  PixArtSigmaPipeline, FluxPipeline) holding the diffusers transformer and VAE at the preset's configuration (the
  inverse of our loader's config mapping; the JSON records where our preset differs), seeded random weights drawn
  on the device, called with prompt embeddings (no text encoders inside the pipeline: see "Text encode").
- diffusers-compile: the same pipeline after regional compilation, `torch.compile(fullgraph=True)` on each repeated
  transformer block (diffusers' compile_repeated_blocks where the class defines it), default mode; VAE eager.
- ours-aoti: that pipeline written with save_pretrained (transformer, VAE, scheduler) and exported with
  `export_model(folder, engine="aoti")`: our loader reads the SAME weights, the denoiser step graph (CFG batch,
  guidance, sampler update) and the VAE decoder become AOTInductor packages with our kernels, and the runtime's
  device loop replays CUDA graphs. Engines are cached per model, configuration, torch version and export sources.
- ours-eager (dry run, or --systems): the very graphs the exporter compiles (export/build.py), run by torch eager.
- onnxruntime-cuda, tensorrt: timed like ours-aoti where onnxruntime's CUDA provider / tensorrt import; the H200
  image has neither, so they are reported as skipped with the reason.

Same function: a 2-step generation of each system is compared with diffusers eager (decoder-input latents and
images, relative L2 error): bound 5e-2 in bf16 (two precisions of the same maths: the pipelines keep some latents in
bf16, our step graph keeps the sampler state in fp32), 1e-3 in fp32 (the dry run). The config mapping is checked
against the preset (`config.differences`: DiT's timestep frequency shift is diffusers' 1, the original DiT's 0).

Timing: medians after a warm-up. Per step: the time between synchronised step starts inside one whole generation
(diffusers: a pre-forward hook on the transformer; ours: a synchronise after each loop step), so it includes the
CFG combine and the scheduler update. Generation: the whole call (noise in, image on the host out) with no
synchronisation inside, the median of --repeats runs; decode: its part of the instrumented run (diffusers) or the
median of 3 decoder calls (ours). Build (export + compile) and load times are reported apart, as is
torch.compile's first-call time. Peak memory: the torch allocator's peak and the device's used memory
(cudaMemGetInfo sampled every 5 ms) above what was in use before the system loaded its weights.

Text encode: the presets ship no text encoders, and T5-XXL alone is 4.7 B parameters. Each family's encoders
(Gemma-2-2B for Sana; T5-XXL for PixArt; CLIP-L, CLIP-G and T5-XXL for SD3.5; CLIP-L and T5-XXL for Flux) are built
once per model at native size with random weights, bf16, and run by transformers eager on the same device, calls
and token counts as the diffusers pipeline makes them (prompt and negative prompt; Sana's positive prompt with its
instruction prefix, its length estimated at 4 characters per token); the median time is added to EVERY system's
generation time ("generation_with_text_ms"), so the systems differ only in denoise and decode. (Our engine folders
run T5 in fp32 by the precision policy; that is not measured here.) --quick and --no-text skip it, and so does a run
short of time; the JSON then says so.

FLOPs: reference/architectures.md §8 (per block linear + attention, plus embedders, adaLN and final layers), per
forward of one sample, times the CFG branches per step; checked against torch's FlopCounterMode on the diffusers
model (`counted_step_tflop`). Roofline fraction = (FLOPs / peak) / measured time, peak 790 TFLOP/s dense bf16 on
H100/H200 (the 8192³ bf16 matmul measured on this project's H200), --peak-tflops otherwise.

Budget: --budget-s (default 420 s, --quick 120 s) counts from the start; before each model and each optional stage
the planning estimate (EST_S, recorded next to the measured stage times) is compared with the time left, and what
does not fit is skipped with a note. On a fresh machine the AOTInductor builds dominate (estimated 80-300 s per
model), so 7 minutes cover about two models and --quick about one; with the engines cached (a rerun on a warm machine:
inductor cache and engines live under --cache-dir) a model costs its runs only. Results are written
after every stage to <out>/<device>-e2e.json and .md (out: benchmarks/results; the dry run: a temp dir).
Exit status 0: every system ran or was skipped for a stated reason; 1: a system failed or parity was out of bound.
"""

import argparse
import contextlib
import functools
import gc
import hashlib
import importlib
import importlib.util
import inspect
import json
import math
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import warnings
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Callable

T0 = time.monotonic()  # the budget counts from here, imports included

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from ditrt.export.presets import PRESETS  # noqa: E402
from ditrt.runtime.backends import STATE  # noqa: E402
from ditrt.runtime.pipeline import pack, unpack  # noqa: E402
from ditrt.runtime.schedules import STEP_SCALARS, make_plan  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MODELS = ("sana-1600m-1024", "sd35-medium", "dit-xl-2-256", "pixart-sigma-1024", "flux-dev")
QUICK_MODELS = ("dit-xl-2-256", "sana-1600m-1024")  # the cheapest builds first
SYSTEMS = ("diffusers-eager", "diffusers-compile", "ours-aoti", "ours-eager", "onnxruntime-cuda", "tensorrt")
GPU_SYSTEMS = ("diffusers-eager", "diffusers-compile", "ours-aoti", "onnxruntime-cuda", "tensorrt")
DRY_SYSTEMS = ("diffusers-eager", "diffusers-compile", "ours-eager", "ours-aoti")
QUICK_SYSTEMS = ("diffusers-eager", "ours-aoti")
# Engine systems: export options and the runtime backend that runs them.
ENGINES = {
    "ours-aoti": (dict(engine="aoti"), "torch"),
    "onnxruntime-cuda": (dict(engine="onnx"), "onnxruntime"),
    "tensorrt": (dict(engine="tensorrt", lowering="plugin"), "tensorrt"),
}
# Dense bf16 matrix rate (TFLOP/s) for the roofline: the 8192³ bf16 matmul measured on this project's H200
# (KINDS.md: 769-798); the H100 SXM has the same tensor cores. Other devices: --peak-tflops.
PEAK_TFLOPS = [("H200", 790.0), ("H100", 790.0)]
PARITY_TOL = {torch.float32: 1e-3, torch.bfloat16: 5e-2, torch.float16: 5e-2}
SEED = 0
# Planning estimates in seconds on an H200 with nothing cached (setup = build the diffusers pipeline and save it;
# ours = export + load + runs); the JSON keeps them next to the measured stage times, to be refined from those.
EST_S = {
    "sana-1600m-1024": dict(setup=15, eager=15, compile=45, ours=110, text=15),
    "sd35-medium": dict(setup=20, eager=20, compile=60, ours=150, text=25),
    "dit-xl-2-256": dict(setup=8, eager=12, compile=40, ours=80, text=0),
    "pixart-sigma-1024": dict(setup=10, eager=15, compile=45, ours=100, text=15),
    "flux-dev": dict(setup=60, eager=45, compile=70, ours=300, text=25),
}
DRY_EST_S = dict(setup=3, eager=4, compile=20, ours=35, text=3)  # tiny configs on 2 CPU cores


# ------------------------------------------------------------------------------------------------ architectures
@dataclass(frozen=True)
class Encoder:
    """A text encoder as the diffusers pipeline calls it: transformers class and config, (tokens, batch) per call."""

    name: str
    cls: str
    config: str
    kwargs: dict
    calls: tuple[tuple[int, int], ...]


T5_XXL = dict(
    vocab_size=32128,
    d_model=4096,
    d_ff=10240,
    d_kv=64,
    num_heads=64,
    num_layers=24,
    feed_forward_proj="gated-gelu",
    relative_attention_num_buckets=32,
)
T5_TINY = dict(T5_XXL, d_model=32, d_ff=64, d_kv=8, num_heads=4, num_layers=2, vocab_size=1000)
CLIP_L = dict(
    vocab_size=49408,
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
    projection_dim=768,
)
CLIP_G = dict(CLIP_L, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20)
CLIP_G.update(hidden_act="gelu", projection_dim=1280)
CLIP_TINY = dict(CLIP_L, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
CLIP_TINY.update(projection_dim=32, vocab_size=1000, bos_token_id=0, eos_token_id=1)
GEMMA2_2B = {}  # transformers' Gemma2Config defaults are gemma-2-2b's
GEMMA2_TINY = dict(
    vocab_size=1000,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=1,
    head_dim=16,
)


def sana_chi_tokens() -> int:
    """Tokens of SanaPipeline's complex human instruction, estimated at 4 characters per Gemma token."""
    from ditrt.export.models.sana import SANA_INSTRUCTION

    return math.ceil(len("\n".join(SANA_INSTRUCTION)) / 4)


def encoders(family: str, tiny: bool) -> list[Encoder]:
    """The family's text encoders with the diffusers pipeline's calls (prompt, then negative prompt under CFG)."""
    t5, clip_l, clip_g = (T5_TINY, CLIP_TINY, CLIP_TINY) if tiny else (T5_XXL, CLIP_L, CLIP_G)
    n = 8 if tiny else None

    def tokens(k):
        return n or k

    if family == "sana":
        g = GEMMA2_TINY if tiny else GEMMA2_2B
        positive = tokens(300 + sana_chi_tokens() - 2)  # diffusers: max_length_all = chi tokens + 300 - 2
        return [Encoder("gemma-2-2b", "Gemma2Model", "Gemma2Config", g, ((positive, 1), (tokens(300), 1)))]
    if family == "pixart":
        return [Encoder("t5-xxl", "T5EncoderModel", "T5Config", t5, ((tokens(300), 1),) * 2)]
    if family == "mmdit":
        return [
            Encoder(
                "clip-l", "CLIPTextModelWithProjection", "CLIPTextConfig", clip_l, ((tokens(77), 1),) * 2
            ),
            Encoder(
                "clip-g", "CLIPTextModelWithProjection", "CLIPTextConfig", clip_g, ((tokens(77), 1),) * 2
            ),
            Encoder("t5-xxl", "T5EncoderModel", "T5Config", t5, ((tokens(256), 1),) * 2),
        ]
    if family == "flux":  # no CFG batch: the prompt alone
        return [
            Encoder("clip-l", "CLIPTextModel", "CLIPTextConfig", clip_l, ((tokens(77), 1),)),
            Encoder("t5-xxl", "T5EncoderModel", "T5Config", t5, ((tokens(512), 1),)),
        ]
    return []  # DiT: class labels


def sana_diffusers(c) -> dict:
    return dict(
        in_channels=c.in_channels,
        out_channels=c.out_channels,
        num_attention_heads=c.num_heads,
        attention_head_dim=c.hidden_size // c.num_heads,
        num_layers=c.depth,
        num_cross_attention_heads=c.cross_num_heads,
        cross_attention_head_dim=c.hidden_size // c.cross_num_heads,
        cross_attention_dim=c.hidden_size,
        caption_channels=c.caption_channels,
        mlp_ratio=c.mlp_ratio,
        sample_size=c.sample_size,
        patch_size=c.patch_size,
        norm_eps=c.norm_eps,
        interpolation_scale=c.interpolation_scale,
    )


def mmdit_diffusers(c) -> dict:
    assert c.mlp_ratio == 4.0, "diffusers' SD3 blocks have an MLP ratio of 4"
    return dict(
        sample_size=c.sample_size,
        patch_size=c.patch_size,
        in_channels=c.in_channels,
        out_channels=c.out_channels,
        num_layers=c.depth,
        attention_head_dim=c.head_dim,
        num_attention_heads=c.num_heads,
        joint_attention_dim=c.joint_attention_dim,
        caption_projection_dim=c.hidden_size,
        pooled_projection_dim=c.pooled_projection_dim,
        pos_embed_max_size=c.pos_embed_max_size,
        dual_attention_layers=tuple(c.dual_attention_layers),
        qk_norm="rms_norm" if c.qk_norm else None,
    )


def dit_diffusers(c) -> dict:
    return dict(
        num_attention_heads=c.num_heads,
        attention_head_dim=c.hidden_size // c.num_heads,
        in_channels=c.in_channels,
        out_channels=c.out_channels,
        num_layers=c.depth,
        sample_size=c.sample_size,
        patch_size=c.patch_size,
        num_embeds_ada_norm=c.num_classes,
        norm_eps=c.mlp_norm_eps,
    )


def pixart_diffusers(c) -> dict:
    return dict(
        num_attention_heads=c.num_heads,
        attention_head_dim=c.hidden_size // c.num_heads,
        in_channels=c.in_channels,
        out_channels=c.out_channels,
        num_layers=c.depth,
        cross_attention_dim=c.hidden_size if c.caption_projection else c.caption_channels,
        sample_size=c.sample_size,
        patch_size=c.patch_size,
        norm_eps=c.norm_eps,
        interpolation_scale=c.interpolation_scale,
        use_additional_conditions=c.micro_conditions,
        caption_channels=c.caption_channels if c.caption_projection else None,
    )


def flux_diffusers(c) -> dict:
    return dict(
        patch_size=1,
        in_channels=c.in_channels,
        out_channels=c.out_channels,
        num_layers=c.depth,
        num_single_layers=c.depth_single,
        attention_head_dim=c.head_dim,
        num_attention_heads=c.num_heads,
        joint_attention_dim=c.joint_attention_dim,
        pooled_projection_dim=c.pooled_projection_dim,
        guidance_embeds=c.guidance_embeds,
        axes_dims_rope=tuple(c.axes_dims_rope),
    )


def kl_vae(latent_channels: int, scaling: float, shift: float | None, quant: bool, tiny: bool) -> dict:
    """AutoencoderKL: SD/SDXL (4 channels, quant convs) and SD3/Flux (16 channels, none); tiny: 2 blocks, f2."""
    blocks = (8, 16) if tiny else (128, 256, 512, 512)
    return dict(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * len(blocks),
        up_block_types=("UpDecoderBlock2D",) * len(blocks),
        block_out_channels=blocks,
        layers_per_block=1 if tiny else 2,
        latent_channels=latent_channels,
        norm_num_groups=4 if tiny else 32,
        scaling_factor=scaling,
        shift_factor=shift,
        use_quant_conv=quant,
        use_post_quant_conv=quant,
    )


def dc_vae(latent_channels: int, tiny: bool) -> dict:
    """AutoencoderDC: dc-ae-f32c32-sana-1.0 (Sana's vae/config.json); tiny: 3 stages, f4."""
    stages = 3 if tiny else 6
    split = 2 if tiny else 3  # ResBlock stages, then EfficientViT stages
    channels = (8, 16, 16) if tiny else (128, 256, 512, 512, 1024, 1024)
    types = ("ResBlock",) * split + ("EfficientViTBlock",) * (stages - split)
    scales = ((),) * split + ((5,),) * (stages - split)
    return dict(
        in_channels=3,
        latent_channels=latent_channels,
        attention_head_dim=8 if tiny else 32,
        encoder_block_types=types,
        decoder_block_types=types,
        encoder_block_out_channels=channels,
        decoder_block_out_channels=channels,
        encoder_layers_per_block=(1,) * stages if tiny else (2, 2, 2, 3, 3, 3),
        decoder_layers_per_block=(1,) * stages if tiny else (3,) * 6,
        encoder_qkv_multiscales=scales,
        decoder_qkv_multiscales=scales,
        upsample_block_type="interpolate",
        downsample_block_type="Conv",
        decoder_norm_types="rms_norm",
        decoder_act_fns="silu",
        scaling_factor=0.41407,
    )


@dataclass(frozen=True)
class Arch:
    """How a family is built on the diffusers side, shrunk for the dry run, and counted."""

    transformer: str  # diffusers class
    pipeline: str  # diffusers pipeline class
    to_diffusers: (
        Callable  # our config -> diffusers transformer kwargs (the inverse of config_from_diffusers)
    )
    tiny: dict  # replace() fields giving a tiny config of the same structure
    vae: Callable[[bool, int], tuple[str, dict]]  # (tiny, latent channels) -> diffusers VAE class, kwargs
    pixels: Callable[[bool], int]  # image side in pixels
    flops: Callable  # (cfg, image tokens N, text tokens T) -> (FLOPs of one forward of one sample, of which attention)
    latent_dtype_fp32: bool = (
        False  # the pipeline keeps its latents in fp32 (Sana), else in the model's dtype
    )


# ----------------------------------------------------------------------------------------------------- FLOPs
# reference/architectures.md §8, counted in multiply-adds (MAC) and returned as FLOPs = 2·MAC. N image tokens,
# T text tokens, D width; "other" = embedders, adaLN projections, timestep/caption MLPs, final layers.
def _t_embed(D: int) -> int:
    return 256 * D + D * D  # sinusoid (256) -> D -> D


def dit_flops(c, N: int, T: int) -> tuple[float, float]:
    D, r, pp = c.hidden_size, c.mlp_ratio, c.patch_size**2
    linear = c.depth * ((4 + 2 * r) * N * D * D + 6 * D * D)
    attn = c.depth * 2 * N * N * D
    other = N * c.in_channels * pp * D + _t_embed(D) + 2 * D * D + N * D * pp * c.out_channels
    return 2 * (linear + attn + other), 2 * attn


def pixart_flops(c, N: int, T: int) -> tuple[float, float]:
    D, pp = c.hidden_size, c.patch_size**2
    linear = c.depth * ((6 + 8) * N * D * D + 2 * T * D * D)  # self qkvo, cross q o, FFN ×4; cross k v on T
    attn = c.depth * (2 * N * N * D + 2 * N * T * D)
    caption = T * (c.caption_channels * D + D * D) if c.caption_projection else 0
    other = N * c.in_channels * pp * D + _t_embed(D) + 6 * D * D + caption + N * D * pp * c.out_channels
    return 2 * (linear + attn + other), 2 * attn


def sana_flops(c, N: int, T: int) -> tuple[float, float]:
    D, pp, d = c.hidden_size, c.patch_size**2, c.hidden_size // c.num_heads
    Hd = int(c.mlp_ratio * D)
    glumb = N * D * 2 * Hd + N * 9 * 2 * Hd + N * Hd * D  # 1×1 up (gated), depthwise 3×3, 1×1 down
    linear = c.depth * (6 * N * D * D + 2 * T * D * D + glumb)
    attn = c.depth * (
        2 * N * D * (d + 1) + 2 * N * T * D
    )  # ReLU linear self-attention; softmax cross-attention
    caption = T * (c.caption_channels * D + D * D)
    other = N * c.in_channels * pp * D + _t_embed(D) + 6 * D * D + caption + N * D * pp * c.out_channels
    return 2 * (linear + attn + other), 2 * attn


def mmdit_flops(c, N: int, T: int) -> tuple[float, float]:
    D, r, pp = c.hidden_size, c.mlp_ratio, c.patch_size**2
    linear = attn = 0
    for i in range(c.depth):
        last = i == c.depth - 1  # context_pre_only: the text stream gets q, k, v and nothing after
        dual = i in c.dual_attention_layers
        linear += (4 + 2 * r) * N * D * D + (3 if last else 4 + 2 * r) * T * D * D
        linear += (9 if dual else 6) * D * D + (2 if last else 6) * D * D  # adaLN of both streams
        attn += 2 * (N + T) ** 2 * D
        if dual:  # MMDiT-X: an image-only self-attention
            linear += 4 * N * D * D
            attn += 2 * N * N * D
    other = N * c.in_channels * pp * D + T * c.joint_attention_dim * D + _t_embed(D)
    other += c.pooled_projection_dim * D + D * D + 2 * D * D + N * D * pp * c.out_channels
    return 2 * (linear + attn + other), 2 * attn


def flux_flops(c, N: int, T: int) -> tuple[float, float]:
    D, r, S = c.hidden_size, c.mlp_ratio, N + T
    linear = c.depth * ((4 + 2 * r) * S * D * D + 12 * D * D)
    linear += c.depth_single * ((4 + 2 * r) * S * D * D + 3 * D * D)  # qkv + MLP in, [attn; MLP] out
    attn = (c.depth + c.depth_single) * 2 * S * S * D
    embeds = _t_embed(D) * (2 if c.guidance_embeds else 1) + c.pooled_projection_dim * D + D * D
    other = (
        N * c.in_channels * D + T * c.joint_attention_dim * D + embeds + 2 * D * D + N * D * c.out_channels
    )
    return 2 * (linear + attn + other), 2 * attn


ARCHS = {
    "sana": Arch(
        "SanaTransformer2DModel",
        "SanaPipeline",
        sana_diffusers,
        dict(
            sample_size=8,
            in_channels=8,
            out_channels=8,
            hidden_size=64,
            depth=2,
            num_heads=2,
            cross_num_heads=2,
            caption_channels=32,
        ),
        lambda tiny, ch: ("AutoencoderDC", dc_vae(ch, tiny)),
        lambda tiny: 32 if tiny else 1024,  # SanaPipeline wants multiples of 32
        sana_flops,
        latent_dtype_fp32=True,
    ),
    "mmdit": Arch(
        "SD3Transformer2DModel",
        "StableDiffusion3Pipeline",
        mmdit_diffusers,
        dict(
            sample_size=8,
            in_channels=4,
            out_channels=4,
            hidden_size=64,
            depth=3,
            num_heads=2,
            joint_attention_dim=32,
            pooled_projection_dim=32,
            pos_embed_max_size=8,
            dual_attention_layers=(0,),
        ),
        lambda tiny, ch: ("AutoencoderKL", kl_vae(ch, 1.5305, 0.0609, False, tiny)),
        lambda tiny: 16 if tiny else 1024,
        mmdit_flops,
    ),
    "dit": Arch(
        "DiTTransformer2DModel",
        "DiTPipeline",
        dit_diffusers,
        dict(sample_size=8, hidden_size=64, depth=2, num_heads=2),  # 1000 classes: DiTPipeline's null is 1000
        lambda tiny, ch: ("AutoencoderKL", kl_vae(ch, 0.18215, None, True, tiny)),
        lambda tiny: 16 if tiny else 256,
        dit_flops,
    ),
    "pixart": Arch(
        "PixArtTransformer2DModel",
        "PixArtSigmaPipeline",
        pixart_diffusers,
        dict(sample_size=8, hidden_size=64, depth=2, num_heads=2, caption_channels=32),
        lambda tiny, ch: ("AutoencoderKL", kl_vae(ch, 0.13025, None, True, tiny)),  # SDXL's VAE
        lambda tiny: 16 if tiny else 1024,
        pixart_flops,
    ),
    "flux": Arch(
        "FluxTransformer2DModel",
        "FluxPipeline",
        flux_diffusers,
        dict(
            in_channels=16,
            out_channels=16,
            hidden_size=64,
            num_heads=2,
            depth=1,
            depth_single=2,
            joint_attention_dim=32,
            pooled_projection_dim=32,
            axes_dims_rope=(8, 12, 12),
        ),
        lambda tiny, ch: ("AutoencoderKL", kl_vae(ch, 0.3611, 0.1159, False, tiny)),
        lambda tiny: 16 if tiny else 1024,
        flux_flops,
    ),
}


@dataclass
class Case:
    """One model as benchmarked: the preset, our config (tiny or native), its diffusers twin and the request."""

    name: str
    preset: object
    arch: Arch
    cfg: object  # our config dataclass
    tiny: bool
    pixels: int
    steps: int
    guidance: float
    text_len: int  # text tokens (0: class-conditional)

    @property
    def family(self):
        return self.preset.family

    @property
    def packing(self) -> int:
        return self.family.packing

    @property
    def latent_channels(self) -> int:
        return self.cfg.in_channels // self.packing**2

    @property
    def vae(self) -> tuple[str, dict]:
        return self.arch.vae(self.tiny, self.latent_channels)

    @property
    def vae_factor(self) -> int:
        cls, kw = self.vae
        blocks = kw["decoder_block_out_channels"] if cls == "AutoencoderDC" else kw["block_out_channels"]
        return 2 ** (len(blocks) - 1)

    @property
    def latent_hw(self) -> tuple[int, int]:
        side = self.pixels // self.vae_factor
        return side, side

    @property
    def image_tokens(self) -> int:
        p = getattr(self.cfg, "patch_size", 1) * self.packing
        return (self.latent_hw[0] // p) * (self.latent_hw[1] // p)

    @property
    def cfg_branches(self) -> int:
        return 2 if self.family.conditioning(self.cfg, self.text_len, self.latent_hw).cfg_batch else 1

    @property
    def branches(self) -> int:  # forwards per step: diffusers runs CFG at guidance > 1 only
        return self.cfg_branches if self.guidance > 1 else 1

    def transformer_config(self) -> dict:
        return self.arch.to_diffusers(self.cfg)


def make_case(name: str, tiny: bool, steps: int | None, quick: bool) -> Case:
    preset = PRESETS[name]
    arch = ARCHS[preset.family.name]
    cfg = replace(preset.config, **arch.tiny) if tiny else preset.config
    default = preset.sampler.steps
    n = steps or (2 if tiny else min(default, 10) if quick else default)
    # the preset's text length, tiny too: a pipeline folder's Sana/PixArt engine is built for 300 tokens
    text_len = preset.text_len
    return Case(name, preset, arch, cfg, tiny, arch.pixels(tiny), n, preset.sampler.guidance, text_len)


def config_differences(case: Case) -> dict:
    """Our loader's config of the diffusers twin against ours (preset or tiny): {field: [ours, loaded]}."""
    loaded = case.family.checkpoint.from_diffusers(json.loads(json.dumps(case.transformer_config())))
    return {
        f.name: [getattr(case.cfg, f.name), getattr(loaded, f.name)]
        for f in fields(case.cfg)
        if _norm(getattr(case.cfg, f.name)) != _norm(getattr(loaded, f.name))
    }


def _norm(v):
    return tuple(map(_norm, v)) if isinstance(v, (list, tuple)) else v


def step_flops(case: Case) -> dict:
    fwd, attn = case.arch.flops(case.cfg, case.image_tokens, case.text_len)
    return {
        "forward_tflop": fwd / 1e12,
        "attention_share": attn / fwd,
        "step_tflop": case.branches * fwd / 1e12,
    }


# ------------------------------------------------------------------------------------------------- the clock
class Clock:
    """The run's time budget and timestamped progress on stderr."""

    def __init__(self, budget_s: float):
        self.budget_s = budget_s

    @staticmethod
    def elapsed() -> float:
        return time.monotonic() - T0

    def left(self) -> float:
        return self.budget_s - self.elapsed()

    def log(self, msg: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')} +{self.elapsed():6.1f}s] {msg}", file=sys.stderr, flush=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def stamp(device: torch.device) -> float:
    sync(device)
    return time.perf_counter()


def used_bytes(device: torch.device) -> int | None:
    if device.type != "cuda":
        return None
    free, total = torch.cuda.mem_get_info(device)
    return total - free


class PeakMemory:
    """The device's used memory, sampled every 5 ms in a thread, and the torch allocator's peak, while inside;
    reported above `baseline` (the bytes in use before the system loaded its weights)."""

    def __init__(self, device: torch.device, baseline: int | None):
        self.device, self.baseline, self.peak = device, baseline, 0
        self._stop = threading.Event()

    def _sample(self):
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, used_bytes(self.device))

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.peak = used_bytes(self.device)
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        if self.device.type != "cuda":
            return
        self._stop.set()
        self._thread.join()
        self.result = {
            "peak_alloc_gb": torch.cuda.max_memory_allocated(self.device) / 1e9,
            "peak_device_gb": (self.peak - (self.baseline or 0)) / 1e9,
        }

    def report(self) -> dict:
        return getattr(self, "result", {"peak_alloc_gb": None, "peak_device_gb": None})


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def summary(samples: list[float]) -> dict:
    return {"median": statistics.median(samples), "min": min(samples), "max": max(samples), "n": len(samples)}


def rel_l2(got: np.ndarray, want: np.ndarray) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    if got.shape != want.shape:
        raise AssertionError(f"shapes differ: {got.shape} vs {want.shape}")
    return float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30))


# ------------------------------------------------------------------------------------------- diffusers side
@torch.no_grad()
def materialize(model: nn.Module, device: torch.device, dtype: torch.dtype, seed: int) -> nn.Module:
    """Seeded random weights for a model built with meta parameters (loaders.diffusers.empty_parameters), drawn
    on the device in dtype: matrices N(0, 0.02²), vectors 0.02·N (biases) or 1 + 0.02·N (weights)."""
    g = torch.Generator(device).manual_seed(seed)
    meta = [(n, t) for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    for name, t in meta:
        v = torch.randn(t.shape, generator=g, device=device, dtype=dtype).mul_(0.02)
        if t.ndim < 2 and name.endswith("weight"):
            v.add_(1.0)
        owner, _, leaf = name.rpartition(".")
        module = model.get_submodule(owner)
        if leaf in module._parameters:
            module._parameters[leaf] = nn.Parameter(v, requires_grad=False)
        else:
            module._buffers[leaf] = v
    return model.to(device=device, dtype=dtype).eval()


def diffusers_pipeline(case: Case, device: torch.device, dtype: torch.dtype, seed: int):
    """The family's diffusers pipeline with the transformer, VAE and scheduler only (no text encoders)."""
    import diffusers

    from ditrt.export.loaders.diffusers import empty_parameters

    with empty_parameters():
        transformer = getattr(diffusers, case.arch.transformer)(**case.transformer_config())
    materialize(transformer, device, dtype, seed)
    if case.family.name == "dit":  # released DiT checkpoints hold one embedder copied into every block
        for block in transformer.transformer_blocks[1:]:
            block.norm1.emb.load_state_dict(transformer.transformer_blocks[0].norm1.emb.state_dict())
    vae_cls, vae_kw = case.vae
    with empty_parameters():
        vae = getattr(diffusers, vae_cls)(**vae_kw)
    materialize(vae, device, dtype, seed + 1)
    sched_cfg = case.preset.sampler.config
    scheduler = getattr(diffusers, sched_cfg["_class_name"]).from_config(sched_cfg)
    cls = getattr(diffusers, case.arch.pipeline)
    given = dict(transformer=transformer, vae=vae, scheduler=scheduler)
    params = inspect.signature(cls.__init__).parameters.values()
    others = {
        p.name: None for p in params if p.name not in given and p.name != "self" and p.default is p.empty
    }
    pipe = cls(**given, **others)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@dataclass
class Request:
    """One generation's inputs, the same for every system: noise (B, C, H, W) and conditioning per CFG branch."""

    noise: torch.Tensor  # in the dtype the diffusers pipeline draws its latents in
    pos: dict[str, np.ndarray]  # conditioning inputs by the step engine's names (float32 / int64, batch 1)
    neg: dict[str, np.ndarray]
    seed: int
    label: int | None = None  # DiT's class


def make_request(case: Case, dtype: torch.dtype, seed: int) -> Request:
    g = torch.Generator().manual_seed(seed)
    shape = (1, case.latent_channels, *case.latent_hw)
    if (
        case.family.name == "dit"
    ):  # DiTPipeline draws (B, C, s, s) in the model's dtype from the generator itself
        noise = torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)
    else:
        noise = torch.randn(shape, generator=g).to(torch.float32 if case.arch.latent_dtype_fp32 else dtype)
    cond = case.family.conditioning(case.cfg, case.text_len, case.latent_hw)
    pos, neg = {}, {}
    for spec in (*cond.paired, *cond.shared):
        dims = tuple(1 if d == "B" else case.text_len if isinstance(d, str) else d for d in spec.shape)
        if spec.dtype == "int64" and spec.name.endswith(
            "mask"
        ):  # keep-masks: the first tokens are the prompt's
            keep = np.arange(dims[-1])
            pos[spec.name] = (keep < max(1, dims[-1] // 3)).astype(np.int64)[None].repeat(dims[0], 0)
            neg[spec.name] = (keep < max(1, dims[-1] // 5)).astype(np.int64)[None].repeat(dims[0], 0)
        elif spec.dtype == "int64":  # class labels
            pos[spec.name] = np.full(dims, 207, np.int64)
            neg[spec.name] = np.full(dims, cond.null_class, np.int64)
        else:  # rounded to the model's dtype, so both sides get the same values
            for d in (pos, neg):
                d[spec.name] = torch.randn(dims, generator=g).to(dtype).float().numpy()
    return Request(noise, pos, neg, seed, 207 if case.family.name == "dit" else None)


def pipeline_kwargs(case: Case, req: Request, steps: int, device, dtype, output_type: str = "np") -> dict:
    kw = dict(num_inference_steps=steps, guidance_scale=case.guidance, output_type=output_type)
    if case.family.name == "dit":
        return dict(kw, class_labels=[req.label], generator=torch.Generator().manual_seed(req.seed))
    kw.update(height=case.pixels, width=case.pixels)
    for name, value in req.pos.items():
        t = torch.from_numpy(value).to(device)
        kw[name] = t.to(dtype) if t.is_floating_point() else t
        if case.cfg_branches == 2:
            n = torch.from_numpy(req.neg[name]).to(device)
            kw["negative_" + name] = n.to(dtype) if n.is_floating_point() else n
    latents = req.noise.to(device)
    if case.packing == 2:  # FluxPipeline takes the packed latents
        latents = torch.from_numpy(pack(latents.float().cpu().numpy(), 2)).to(device, latents.dtype)
    kw["latents"] = latents
    if case.family.name in ("sana", "pixart"):
        kw.update(use_resolution_binning=False, negative_prompt=None, max_sequence_length=case.text_len)
    if case.family.name == "sana":
        kw["complex_human_instruction"] = None
    if case.family.name == "flux":
        kw["max_sequence_length"] = case.text_len
    return kw


class Probe:
    """Instruments a diffusers pipeline: a synchronised timestamp at each transformer call (one per step) and at
    the VAE decode, the decoder's input latents, and the FLOP count up to the decode."""

    def __init__(self, pipe, device: torch.device):
        self.pipe, self.device = pipe, device
        self.steps: list[float] = []
        self.decode_at = self.z = self.flops_at_decode = None
        self.counter = None
        self.hook = pipe.transformer.register_forward_pre_hook(lambda *_: self.steps.append(stamp(device)))
        original = pipe.vae.decode

        def decode(z, *args, **kwargs):
            self.z = z.float().cpu().numpy()
            self.decode_at = stamp(device)
            if self.counter is not None:
                self.flops_at_decode = self.counter.get_total_flops()
            return original(z, *args, **kwargs)

        pipe.vae.decode = decode

    def __enter__(self) -> "Probe":
        return self

    def __exit__(self, *exc) -> None:
        self.hook.remove()
        self.pipe.vae.__dict__.pop("decode", None)  # the class's method again


def register_cpu_sdpa_flops():
    """FlopCounterMode counts the CUDA attention kernels; the CPU's flash kernel (the dry run) needs a formula."""
    from torch.utils import flop_counter

    op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if op is None or op in flop_counter.flop_registry:
        return

    @flop_counter.register_flop_formula(op)
    def _flops(query, key, value, *args, out_shape=None, **kwargs):
        b, h, L, e = query
        return 2 * b * h * L * key[-2] * (e + value[-1])


# ----------------------------------------------------------------------------------------------- our side
class TorchGraphBackend:
    """A graph of export/build.py (StepGraph, DecoderGraph) run by torch eager, with the backends' interface."""

    name = "torch-eager"

    def __init__(self, graph, device: torch.device):
        self.module, self.inputs, self.outputs = graph.module.to(device).eval(), graph.inputs, graph.outputs
        self.device = device

    def tensor(self, value) -> torch.Tensor:
        return torch.as_tensor(np.asarray(value)).to(self.device)

    @torch.no_grad()
    def call(self, feeds: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = self.module(*[feeds[s.name] for s in self.inputs])
        return dict(zip([s.name for s in self.outputs], out if isinstance(out, tuple) else (out,)))

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = self.call({k: self.tensor(v) for k, v in feeds.items()})
        return {k: v.float().cpu().numpy() for k, v in out.items()}

    def loop(self, static: dict, state: dict) -> "TorchLoop":
        return TorchLoop(self, static, state)

    def close(self):
        self.module = None


class TorchLoop:
    """The device loop without CUDA graphs: inputs bound once, the state rotated between device tensors."""

    def __init__(self, backend: TorchGraphBackend, static: dict, state: dict):
        self.backend = backend
        self.feeds = {k: backend.tensor(v) for k, v in {**static, **state}.items()}

    def step(self, scalars: dict) -> None:
        out = self.backend.call({**self.feeds, **{k: self.backend.tensor(v) for k, v in scalars.items()}})
        self.feeds.update(x0_prev2=self.feeds["x0_prev"], x0_prev=out["x0"], x=out["x_next"])

    def read(self) -> dict[str, np.ndarray]:
        return {k: self.feeds[k].float().cpu().numpy() for k in STATE}

    def close(self):
        self.feeds = {}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


@dataclass
class Runner:
    """Our side of a generation, as the runtime's Pipeline drives it (runtime/pipeline.py `_denoise`, `_decode`):
    the step engine's loop on the device, per step the scheduler's scalars, then the decoder engine."""

    denoiser: object
    decoder: object
    scheduler: object  # manifest.Scheduler
    latent: object  # manifest.Latent
    inputs: list  # the denoiser's input specs
    device: torch.device
    plans: dict = field(default_factory=dict)

    def plan(self, steps: int) -> dict:
        if steps not in self.plans:
            self.plans[steps] = make_plan(self.scheduler.config, steps, self.scheduler.call)
        return self.plans[steps]

    def static(self, req: Request, guidance: float) -> dict[str, np.ndarray]:
        feeds = {"guidance": np.asarray(guidance, np.float32)}
        for s in self.inputs:
            if s.name in STATE or s.name in STEP_SCALARS or s.name == "guidance":
                continue
            if s.shape[:1] == ["n"]:  # [negative; positive] under CFG, the positive branch alone otherwise
                feeds[s.name] = np.stack(
                    [req.neg[s.name], req.pos[s.name]] if guidance > 1 else [req.pos[s.name]]
                )
            else:
                feeds[s.name] = req.pos[s.name]
        return feeds

    def denoise(self, noise: np.ndarray, static: dict, steps: int, sync_each: bool = False):
        """Final latents (B, C, H, W) and, with sync_each, the time of each step."""
        plan = self.plan(steps)
        x = pack(noise * plan["init"], self.latent.packing)
        zeros = np.zeros_like(x)
        times = []
        with self.denoiser.loop(static, {"x": x, "x0_prev": zeros, "x0_prev2": zeros}) as loop:
            last = stamp(self.device) if sync_each else None
            for i in range(steps):
                loop.step({k: np.asarray(plan[k][i], np.float32) for k in STEP_SCALARS})
                if sync_each:
                    now = stamp(self.device)
                    times.append(now - last)
                    last = now
            state = loop.read()
        final = state["x0_prev"] if plan["final_from_x0"] else state["x"] * plan["final"]
        return unpack(final, self.latent.packing, self.latent.height, self.latent.width), times

    def decode(self, latents: np.ndarray) -> np.ndarray:
        return self.decoder.run({"latents": latents})["image"]

    def decoder_input(self, latents: np.ndarray) -> np.ndarray:
        """What the diffusers pipeline hands its VAE: latents / scaling_factor + shift_factor."""
        return latents / self.latent.scaling_factor + self.latent.shift_factor

    def close(self):
        for engine in (self.denoiser, self.decoder):
            with contextlib.suppress(Exception):
                engine.close()


def export_sources_hash() -> str:
    """The export and runtime code an engine was built by (a cached engine is rebuilt when it changes)."""
    h = hashlib.sha256()
    for folder in ("export", "runtime", "csrc"):
        for path in sorted((ROOT / folder).rglob("*")):
            if path.suffix in (".py", ".cu", ".cuh", ".h", ".cpp") and path.is_file():
                h.update(path.relative_to(ROOT).as_posix().encode() + path.read_bytes())
    return h.hexdigest()[:12]


# ------------------------------------------------------------------------------------------------- the run
class Bench:
    def __init__(self, args, device: torch.device, dtype: torch.dtype):
        self.args, self.device, self.dtype = args, device, dtype
        self.clock = Clock(args.budget_s)
        self.cache = Path(args.cache_dir)
        self.failed = False
        self.results = {
            "schema": 1,
            "script": "benchmarks/bench_gpu.py",
            "command": " ".join([Path(sys.argv[0]).name, *args.argv]),
            "dry_run": args.dry_run,
            "quick": args.quick,
            "device": device_info(device),
            "versions": versions(),
            "settings": {
                "dtype": str(dtype).removeprefix("torch."),
                "batch": 1,
                "repeats": args.repeats,
                "budget_s": args.budget_s,
                "seed": args.seed,
                "systems": list(args.systems),
                "parity_tol_rel_l2": PARITY_TOL[dtype],
                "compile": "torch.compile(fullgraph=True) per repeated transformer block, default mode; VAE eager",
                "text_encode": TEXT_DECISION,
                "weights": "random, seeded, drawn on the device; ours loads the same through export_model",
            },
            "models": {},
        }
        peak, source = peak_tflops(device, args.peak_tflops)
        self.peak = peak
        self.results["settings"].update(peak_tflops=peak, peak_source=source)
        slug = re.sub(r"[^a-z0-9]+", "-", self.results["device"]["name"].lower()).strip("-")
        self.json_path = Path(args.out) / f"{slug}{'-dry-run' if args.dry_run else ''}-e2e.json"

    # -- output
    def save(self) -> None:
        self.results["elapsed_s"] = round(self.clock.elapsed(), 1)
        self.json_path.parent.mkdir(parents=True, exist_ok=True)
        for path, text in (
            (self.json_path, json.dumps(self.results, indent=2, default=_json) + "\n"),
            (self.json_path.with_suffix(".md"), markdown(self.results)),
        ):
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text(text)
            tmp.replace(path)

    def est(self, name: str, stage: str) -> float:
        return (DRY_EST_S if self.args.dry_run else EST_S[name])[stage]

    def fits(self, r: dict, name: str, stage: str, also: float = 0.0, est: float | None = None) -> bool:
        """Whether `stage` (and `also` seconds of what must follow it) fits the time left; else a note."""
        est = self.est(name, stage) if est is None else est
        need = est + also
        r["est_s"][stage] = est
        if self.clock.left() >= need:
            return True
        note = f"{stage} skipped: the budget has {self.clock.left():.0f} s left, it needs about {need:.0f} s"
        r["notes"].append(note)
        self.clock.log(f"{name}: {note}")
        return False

    # -- one model
    def model(self, name: str) -> None:
        args, dev = self.args, self.device
        case = make_case(name, args.dry_run, args.steps, args.quick)
        r = self.results["models"][name] = {
            "status": "running",
            "notes": [],
            "stage_s": {},
            "est_s": {},
            "systems": {},
        }
        key = self.engine_key(case)
        engines = [s for s in args.systems if s in ENGINES and engine_available(s)]
        cached = all((self.cache / "engines" / f"{key}-{s}" / "manifest.json").is_file() for s in engines)
        # a cached engine costs its load and runs only: about what diffusers eager costs
        ours_est = (self.est(name, "eager") if cached else self.est(name, "ours")) if engines else 0
        if not self.fits(r, name, "setup", self.est(name, "eager") + ours_est):
            r["status"] = "skipped"
            self.save()
            return
        self.clock.log(
            f"{name}: {'tiny ' if case.tiny else ''}{case.pixels}px, {case.steps} steps, guidance {case.guidance}"
        )
        r.update(describe(case, self.peak))
        with torch.no_grad():
            t = time.monotonic()
            base = used_bytes(dev)
            pipe = diffusers_pipeline(case, dev, self.dtype, args.seed)
            req = make_request(case, self.dtype, args.seed)
            parity_req = make_request(case, self.dtype, args.seed + 1)
            source = self.cache / "sources" / key
            to_build = [
                s for s in engines if not (self.cache / "engines" / f"{key}-{s}" / "manifest.json").is_file()
            ]
            modules = (pipe.transformer, pipe.vae)
            r["weights_gb"] = sum(p.numel() * p.element_size() for m in modules for p in m.parameters()) / 1e9
            self.cache.mkdir(parents=True, exist_ok=True)
            free_gb = shutil.disk_usage(self.cache).free / 1e9
            # the saved pipeline, and an export's package(s) with the weights inside, at least twice over
            short = f"disk: {free_gb:.0f} GB free, an export needs about {3 * r['weights_gb']:.0f} GB"
            if to_build and free_gb < 3 * r["weights_gb"]:
                r["notes"].append(short)
                engines = [s for s in engines if s not in to_build]
            need_source = "ours-eager" in args.systems or bool(set(to_build) & set(engines))
            if need_source:
                shutil.rmtree(source, ignore_errors=True)
                pipe.save_pretrained(source, safe_serialization=True)
            r["stage_s"]["setup"] = time.monotonic() - t
            self.clock.log(f"{name}: diffusers pipeline built{' and saved' if need_source else ''}")
            ref = {}
            for system in ("diffusers-eager", "diffusers-compile"):
                if system not in args.systems:
                    continue
                if system == "diffusers-compile" and not self.fits(r, name, "compile", ours_est):
                    r["systems"][system] = {"status": "skipped", "reason": "time budget"}
                    continue
                self.stage(
                    r,
                    name,
                    system,
                    functools.partial(self.diffusers, case, pipe, req, parity_req, system, base, r, ref),
                )
            del pipe
            torch.compiler.reset()
            free_memory(dev)
            ours = [s for s in args.systems if s in ENGINES or s == "ours-eager"]
            for i, system in enumerate(ours):
                # the saved pipeline goes once its last user has read it (Flux: 24 GB of disk)
                drop = not args.keep_sources and not any(
                    s == "ours-eager" or s in to_build for s in ours[i + 1 :]
                )
                if system == "ours-eager":
                    run = lambda: self.ours_eager(case, source, req, parity_req, r, ref)  # noqa: E731
                elif not engine_available(system):
                    r["systems"][system] = {"status": "skipped", "reason": engine_unavailable_reason(system)}
                    continue
                elif system not in engines:
                    r["systems"][system] = {"status": "skipped", "reason": short}
                    continue
                elif not self.fits(r, name, "ours", est=ours_est):
                    r["systems"][system] = {"status": "skipped", "reason": "time budget"}
                    continue
                else:
                    run = functools.partial(
                        self.engine, case, system, key, source, req, parity_req, r, ref, drop
                    )
                self.stage(r, name, system, run)
                free_memory(dev)
            if not args.keep_sources:
                shutil.rmtree(source, ignore_errors=True)
            if args.no_text or args.quick:
                r["text_encode"] = {"status": "skipped", "reason": "--quick" if args.quick else "--no-text"}
            elif not encoders(case.family.name, case.tiny):
                r["text_encode"] = {
                    "status": "none",
                    "ms": 0.0,
                    "reason": "class-conditional (no text encoder)",
                }
            elif self.fits(r, name, "text"):
                self.stage(r, name, "text", lambda: self.text(case, r))
            else:
                r["text_encode"] = {"status": "skipped", "reason": "time budget"}
        finish(r, self.peak)
        r["status"] = "done"
        self.save()

    def stage(self, r: dict, name: str, stage: str, fn) -> None:
        t = time.monotonic()
        self.clock.log(f"{name}: {stage} ...")
        try:
            fn()
        except Exception as e:  # recorded, and the run goes on with the next system
            self.failed = True
            trace = traceback.format_exc(limit=-4)
            target = r["systems"] if stage != "text" else r
            key = stage if stage != "text" else "text_encode"
            target[key] = {
                "status": "error",
                "error": f"{type(e).__name__}: {e}"[:2000],
                "trace": trace[-3000:],
            }
            self.clock.log(f"{name}: {stage} FAILED: {type(e).__name__}: {str(e)[:300]}")
        r["stage_s"][stage] = time.monotonic() - t
        free_memory(self.device)
        self.save()

    def engine_key(self, case: Case) -> str:
        what = json.dumps(
            [
                case.transformer_config(),
                case.vae,
                case.preset.sampler.config,
                case.pixels,
                case.text_len,
                self.args.seed,
                str(self.dtype),
                self.device.type,
                torch.__version__,
                export_sources_hash(),
            ],
            sort_keys=True,
            default=str,
        )
        tag = "tiny" if case.tiny else "native"
        arch = (
            "sm%d%d" % torch.cuda.get_device_capability(self.device) if self.device.type == "cuda" else "cpu"
        )
        digest = hashlib.sha256(what.encode()).hexdigest()[:10]
        return f"{case.name}-{tag}-{arch}-torch{torch.__version__.split('+')[0]}-{digest}"

    # -- diffusers systems
    def diffusers(self, case: Case, pipe, req, parity_req, system: str, base, r: dict, ref: dict) -> None:
        dev, dtype, args = self.device, self.dtype, self.args
        out = r["systems"][system] = {"status": "running"}
        if system == "diffusers-compile":
            out["compiled"] = compile_regions(pipe.transformer)
        t = time.monotonic()  # warm-up: cuBLAS/cuDNN set-up; for torch.compile, the compilation itself
        pipe(**pipeline_kwargs(case, parity_req, 2, dev, dtype))
        out["warmup_s"] = time.monotonic() - t
        with Probe(pipe, dev) as probe:  # the same function: a 2-step generation, decoder input and image
            t = stamp(dev)
            image = pipe(**pipeline_kwargs(case, parity_req, 2, dev, dtype)).images
            warm = stamp(dev) - t
        if system == "diffusers-eager":
            ref.update(z=probe.z, image=image, warm2_s=warm)
            self.count_flops(case, pipe, req, r)
        else:
            out["compile_s"] = out["warmup_s"] - ref.get("warm2_s", 0.0)
            if ref:
                out["parity_vs_eager"] = parity(probe.z, image, ref, dtype)
        with PeakMemory(dev, base) as mem:
            with Probe(pipe, dev) as probe:
                t0 = stamp(dev)
                pipe(**pipeline_kwargs(case, req, case.steps, dev, dtype))
                end = stamp(dev)
            starts = probe.steps + [probe.decode_at]
            out.update(
                step_ms=summary([1e3 * (b - a) for a, b in zip(starts, starts[1:])]),
                denoise_ms=1e3 * (probe.decode_at - probe.steps[0]),
                decode_ms=1e3 * (end - probe.decode_at),
                prepare_ms=1e3 * (probe.steps[0] - t0),
            )
            gens = [self.time_call(pipe, case, req, case.steps) * 1e3 for _ in range(args.repeats)]
        out.update(generation_ms=summary(gens), **mem.report(), status="ok")

    def time_call(self, pipe, case: Case, req: Request, steps: int) -> float:
        kw = pipeline_kwargs(case, req, steps, self.device, self.dtype)
        t = stamp(self.device)
        pipe(**kw)
        return stamp(self.device) - t

    def count_flops(self, case: Case, pipe, req: Request, r: dict) -> None:
        """One untimed 1-step generation under FlopCounterMode: the denoiser's FLOPs per step (up to the decode)
        and the decoder's; a check of the formula, and the decode's count for the generation roofline."""
        from torch.utils.flop_counter import FlopCounterMode

        register_cpu_sdpa_flops()
        with Probe(pipe, self.device) as probe, FlopCounterMode(display=False) as counter:
            probe.counter = counter
            pipe(**pipeline_kwargs(case, req, 1, self.device, self.dtype))
        total = counter.get_total_flops()
        f = r["flops"]
        f["counted_step_tflop"] = probe.flops_at_decode / 1e12
        f["counted_vs_formula"] = f["counted_step_tflop"] / f["step_tflop"]
        f["decode_tflop"] = (total - probe.flops_at_decode) / 1e12
        f["generation_tflop"] = case.steps * f["step_tflop"] + f["decode_tflop"]
        if self.peak:
            f["roofline_generation_ms"] = f["generation_tflop"] / self.peak * 1e3

    # -- our systems
    def engine(self, case, system, key, source, req, parity_req, r, ref, drop_source=False) -> None:
        from ditrt.export import ExportOptions, export_model
        from ditrt.runtime.backends import open_backend
        from ditrt.runtime.manifest import load_manifest

        out = r["systems"][system] = {"status": "running"}
        folder = self.cache / "engines" / f"{key}-{system}"
        options, backend = ENGINES[system]
        options = dict(
            options, precision=PRECISION[self.dtype], height=case.pixels, width=case.pixels, force=True
        )
        if system == "ours-aoti":
            options["device"] = self.device.type
        if "text_len" in getattr(ExportOptions, "__dataclass_fields__", {}) and case.text_len:
            options["text_len"] = case.text_len  # a fixed text length, as the presets' (else "T", dynamic)
        out["export_options"] = options
        out["cached"] = (folder / "manifest.json").is_file()
        if not out["cached"]:
            t = time.monotonic()
            folder.parent.mkdir(parents=True, exist_ok=True)
            export_model(str(source), folder, **options)
            out["build_s"] = time.monotonic() - t
            self.clock.log(f"{case.name}: {system} built in {out['build_s']:.1f} s")
            if drop_source:
                shutil.rmtree(source, ignore_errors=True)
            free_memory(self.device)
        base = used_bytes(self.device)
        t = time.monotonic()
        m = load_manifest(folder)
        den, vae = m.components["denoiser"], m.components["vae_decoder"]
        runner = Runner(
            open_backend(backend, folder / den.file, den),
            open_backend(backend, folder / vae.file, vae),
            m.scheduler,
            m.latent,
            den.inputs,
            self.device,
        )
        out["load_s"] = time.monotonic() - t
        out["engine_bytes"] = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
        out["text_len"] = next((s.shape[-2] for s in den.inputs if s.name == "prompt_embeds"), None)
        out["lowering"] = {"denoiser": den.lowering, "vae_decoder": vae.lowering}  # "kernels": our CUDA ops
        try:
            self.time_runner(case, runner, req, parity_req, base, out, ref)
        finally:
            runner.close()
        if out["engine_bytes"] > self.args.keep_engines_gb * 1e9:  # e.g. Flux: 24 GB per engine folder
            shutil.rmtree(folder, ignore_errors=True)
            out["note"] = (
                f"engine folder removed after the run (over --keep-engines-gb {self.args.keep_engines_gb})"
            )

    def ours_eager(self, case, source, req, parity_req, r, ref) -> None:
        from ditrt.export.build import build
        from ditrt.export.exporter import latent
        from ditrt.export.source import resolve_source

        out = r["systems"]["ours-eager"] = {"status": "running"}
        base = used_bytes(self.device)
        t = time.monotonic()
        precision = PRECISION[self.dtype]
        src = resolve_source(str(source), precision=precision)
        built = build(src, precision, case.pixels, case.pixels)
        graphs = {g.name: g for g in built.graphs}
        runner = Runner(
            TorchGraphBackend(graphs["denoiser"], self.device),
            TorchGraphBackend(graphs["vae_decoder"], self.device),
            built.scheduler,
            latent(src, built.latent_hw),
            graphs["denoiser"].inputs,
            self.device,
        )
        out["load_s"] = time.monotonic() - t
        del src, built, graphs
        try:
            self.time_runner(case, runner, req, parity_req, base, out, ref)
        finally:
            runner.close()

    def time_runner(self, case, runner: Runner, req, parity_req, base, out: dict, ref: dict) -> None:
        dev, args = self.device, self.args
        noise = req.noise.float().numpy()
        static = runner.static(req, case.guidance)
        t = time.monotonic()
        with warnings.catch_warnings(record=True) as caught:  # e.g. "CUDA graph capture failed"
            warnings.simplefilter("always")
            for _ in range(
                2
            ):  # warm-up: CUDA graph capture, in each of the backend's pooled step contexts (2)
                runner.decode(runner.denoise(noise, static, min(3, case.steps))[0])
        out["warmup_s"] = time.monotonic() - t
        out["warnings"] = sorted({str(w.message)[:300] for w in caught})
        if ref:
            lat, _ = runner.denoise(
                parity_req.noise.float().numpy(), runner.static(parity_req, case.guidance), 2
            )
            image = runner.decode(lat).transpose(0, 2, 3, 1)
            out["parity"] = parity(runner.decoder_input(lat), image, ref, self.dtype)
            self.failed |= not out["parity"]["ok"]
        with PeakMemory(dev, base) as mem:
            final, times = runner.denoise(noise, static, case.steps, sync_each=True)
            decodes = []
            for _ in range(3):
                t = stamp(dev)
                runner.decode(final)
                decodes.append(1e3 * (stamp(dev) - t))
            gens = []
            for _ in range(args.repeats):
                t = stamp(dev)
                runner.decode(runner.denoise(noise, static, case.steps)[0])
                gens.append(1e3 * (stamp(dev) - t))
        out.update(
            step_ms=summary([1e3 * s for s in times]),
            denoise_ms=1e3 * sum(times),
            decode_ms=statistics.median(decodes),
            generation_ms=summary(gens),
            **mem.report(),
            status="ok",
        )

    # -- text encoders
    def text(self, case: Case, r: dict) -> None:
        import transformers

        rows, total = [], 0.0
        for enc in encoders(case.family.name, case.tiny):
            config = getattr(transformers, enc.config)(**enc.kwargs)
            t = time.monotonic()
            with torch.device(self.device), default_dtype(self.dtype):
                model = getattr(transformers, enc.cls)(config).eval()
            build_s = time.monotonic() - t
            params = sum(p.numel() for p in model.parameters())
            g = torch.Generator().manual_seed(0)
            calls = []
            for tokens, batch in enc.calls:
                ids = torch.randint(0, config.vocab_size, (batch, tokens), generator=g).to(self.device)
                mask = torch.ones_like(ids)
                run = functools.partial(model, input_ids=ids, attention_mask=mask)
                run()
                samples = []
                for _ in range(3):
                    t = stamp(self.device)
                    run()
                    samples.append(1e3 * (stamp(self.device) - t))
                calls.append({"tokens": tokens, "batch": batch, "ms": statistics.median(samples)})
            ms = sum(c["ms"] for c in calls)
            total += ms
            rows.append(
                {"encoder": enc.name, "params_b": params / 1e9, "build_s": build_s, "calls": calls, "ms": ms}
            )
            del model
            free_memory(self.device)
        r["text_encode"] = {
            "status": "ok",
            "ms": total,
            "encoders": rows,
            "how": "transformers eager, " + str(self.dtype),
        }


PRECISION = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
TEXT_DECISION = (
    "measured once per model with transformers eager on the same device (native-size encoders, random weights, "
    "the run's dtype, the diffusers pipeline's calls and token counts) and added to every system's generation; "
    "skipped with --quick / --no-text or when the budget is short"
)


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype):
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def compile_regions(transformer: nn.Module) -> list[str]:
    """Regional compilation: each repeated block compiled in place (identical blocks share one compiled graph)."""
    if getattr(transformer, "_repeated_blocks", None):
        transformer.compile_repeated_blocks(fullgraph=True)
        return list(transformer._repeated_blocks)
    names = []
    for name, child in transformer.named_children():
        if isinstance(child, nn.ModuleList) and len(child) > 1:
            for block in child:
                block.compile(fullgraph=True)
            names.append(f"{name} ({len(child)} × {type(child[0]).__name__})")
    return names


def parity(z: np.ndarray, image: np.ndarray, ref: dict, dtype: torch.dtype) -> dict:
    """A 2-step generation's decoder-input latents and image against diffusers eager's (relative L2)."""
    tol = PARITY_TOL[dtype]
    result = {"latents_rel_l2": rel_l2(z, ref["z"]), "image_rel_l2": rel_l2(image, ref["image"]), "tol": tol}
    result["ok"] = bool(result["latents_rel_l2"] <= tol and result["image_rel_l2"] <= tol)
    return result


def describe(case: Case, peak: float | None) -> dict:
    f = step_flops(case)
    if peak:
        f["roofline_step_ms"] = f["step_tflop"] / peak * 1e3
    diff = config_differences(case)
    return {
        "config": {
            "tiny": case.tiny,
            "transformer": case.transformer_config(),
            "vae": {"class": case.vae[0], **case.vae[1]},
            "scheduler": case.preset.sampler.config,
            "matches_preset": not diff,
            "differences": diff,
        },
        "image_px": case.pixels,
        "latent": [case.latent_channels, *case.latent_hw],
        "tokens": {"image": case.image_tokens, "text": case.text_len},
        "steps": case.steps,
        "default_steps": case.preset.sampler.steps,
        "guidance": case.guidance,
        "forwards_per_step": case.branches,
        "flops": f,
    }


def finish(r: dict, peak: float | None) -> None:
    """Derived numbers: text-inclusive generation, roofline fractions, speed-ups against diffusers."""
    text = r.get("text_encode", {}).get("ms")
    f = r["flops"]
    for out in r["systems"].values():
        if out.get("status") != "ok":
            continue
        if text is not None:
            out["generation_with_text_ms"] = out["generation_ms"]["median"] + text
        if peak:
            out["roofline_fraction_step"] = f["step_tflop"] / peak / (out["step_ms"]["median"] / 1e3)
            if "generation_tflop" in f:
                t = out["denoise_ms"] + out["decode_ms"]
                out["roofline_fraction_generation"] = f["generation_tflop"] / peak / (t / 1e3)
    for base in ("diffusers-eager", "diffusers-compile"):
        b = r["systems"].get(base, {})
        if b.get("status") != "ok":
            continue
        for name, out in r["systems"].items():
            if out.get("status") == "ok" and name != base:
                out[f"speedup_vs_{base}"] = {
                    "step": b["step_ms"]["median"] / out["step_ms"]["median"],
                    "generation": b["generation_ms"]["median"] / out["generation_ms"]["median"],
                }


# ------------------------------------------------------------------------------------------- device, versions
def device_info(device: torch.device) -> dict:
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return {
            "name": props.name,
            "capability": "%d.%d" % (props.major, props.minor),
            "sm_count": props.multi_processor_count,
            "memory_gb": props.total_memory / 1e9,
            "driver": nvidia_smi("driver_version"),
            "cuda": torch.version.cuda,
        }
    name = cpu_name()
    return {"name": f"cpu {name}", "cores": os.cpu_count(), "driver": None, "cuda": None}


def nvidia_smi(query: str) -> str | None:
    try:
        out = subprocess.run(
            ["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        return out.stdout.splitlines()[0].strip() if out.returncode == 0 and out.stdout else None
    except (OSError, subprocess.TimeoutExpired):
        return None


def cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def versions() -> dict:
    import ditrt.runtime

    out = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "ditrt": ditrt.runtime.__version__,
    }
    for name in ("triton", "diffusers", "transformers", "onnxruntime", "tensorrt", "numpy"):
        try:
            out[name] = importlib.import_module(name).__version__
        except Exception:  # not installed, or broken: say so rather than fail
            out[name] = None
    if out["onnxruntime"]:
        import onnxruntime

        out["onnxruntime_providers"] = onnxruntime.get_available_providers()
    return out


def peak_tflops(device: torch.device, given: float | None) -> tuple[float | None, str]:
    if given:
        return given, "--peak-tflops"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, value in PEAK_TFLOPS:
            if key in name:
                return value, f"dense bf16 matmul rate of the {key} (measured on this project's H200)"
        return None, f"unknown for {name}: pass --peak-tflops"
    # nominal fp32 peak of the dry run's CPU (cores × 2 FMA × 8 lanes × 2 FLOP × 3 GHz): code path only
    return os.cpu_count() * 96e9 / 1e12, "nominal CPU fp32 peak (dry run: exercises the code path only)"


def engine_available(system: str) -> bool:
    return engine_unavailable_reason(system) is None


def engine_unavailable_reason(system: str) -> str | None:
    if system == "onnxruntime-cuda":
        import onnxruntime

        if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
            return "onnxruntime has no CUDAExecutionProvider here (CPU build)"
    if system == "tensorrt" and importlib.util.find_spec("tensorrt") is None:
        return "tensorrt is not importable here"
    return None


def _json(v):
    if isinstance(v, (np.floating, np.integer)):
        return v.item()
    if isinstance(v, Path):
        return str(v)
    return str(v)


# ------------------------------------------------------------------------------------------------- markdown
def markdown(res: dict) -> str:
    d, v, s = res["device"], res["versions"], res["settings"]
    lines = [
        f"# End-to-end latency: {d['name']}" + (" (dry run: tiny configs, CPU)" if res["dry_run"] else ""),
        "",
        f"Driver {d.get('driver')}, CUDA {d.get('cuda')}, torch {v['torch']}, triton {v['triton']}, "
        f"diffusers {v['diffusers']}, transformers {v['transformers']}. {s['dtype']}, batch 1, random weights; "
        f"medians; generation = denoise + decode, host to host; `+ text` adds the text encode (the same for every "
        f"system: {s['text_encode']}). Roofline: model FLOPs / {s['peak_tflops']} TFLOP/s "
        f"({s['peak_source']}). Command: `{res['command']}`.",
        "",
        "| model | system | step ms | denoise ms | decode ms | generation ms | + text ms | build / compile s "
        "| peak GB | roofline (step) | × eager (step / gen) | parity rel-L2 |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]

    def num(x, fmt="{:.1f}"):
        return "—" if x is None else fmt.format(x)

    for name, r in res["models"].items():
        if r["status"] == "skipped":
            lines.append(f"| {name} | skipped | {'; '.join(r['notes'])} |" + " |" * 9)
            continue
        for system, o in r["systems"].items():
            if o.get("status") != "ok":
                why = o.get("reason") or o.get("error", o.get("status"))
                lines.append(f"| {name} | {system} | {o.get('status')}: {str(why)[:120]} |" + " |" * 9)
                continue
            build = o.get("build_s", o.get("compile_s"))
            if o.get("cached"):
                build = "cached"
            sp = o.get("speedup_vs_diffusers-eager")
            par = o.get("parity") or o.get("parity_vs_eager")
            lines.append(
                "| "
                + " | ".join(
                    [
                        name,
                        system,
                        num(o["step_ms"]["median"], "{:.2f}"),
                        num(o["denoise_ms"]),
                        num(o["decode_ms"]),
                        num(o["generation_ms"]["median"]),
                        num(o.get("generation_with_text_ms")),
                        build if isinstance(build, str) else num(build),
                        num(o.get("peak_device_gb") or o.get("peak_alloc_gb"), "{:.2f}"),
                        num(o.get("roofline_fraction_step"), "{:.1%}"),
                        f"{sp['step']:.2f} / {sp['generation']:.2f}" if sp else "—",
                        (
                            f"{par['latents_rel_l2']:.1e} {'ok' if par['ok'] else 'FAIL'}"
                            if par
                            else "reference"
                        ),
                    ]
                )
                + " |"
            )
    lines.append("")
    for name, r in res["models"].items():
        if r["status"] == "skipped":
            continue
        f, te = r["flops"], r.get("text_encode", {})
        lines.append(
            f"- {name}: {r['image_px']} px, {r['steps']} steps ({r['forwards_per_step']} forward(s) per step), "
            f"{f['step_tflop']:.3g} TFLOP/step by §8"
            + (f" ({f['counted_vs_formula']:.3f}× counted)" if "counted_vs_formula" in f else "")
            + (f", roofline {f['roofline_step_ms']:.2f} ms/step" if "roofline_step_ms" in f else "")
            + f"; text encode: {num(te.get('ms'))} ms ({te.get('status')}"
            + (f": {te['reason']}" if te.get("reason") else "")
            + ")"
            + (f"; notes: {'; '.join(r['notes'])}" if r["notes"] else "")
            + (
                f"; config differs from the preset: {r['config']['differences']}"
                if r["config"]["differences"]
                else ""
            )
        )
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------------- main
def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--models",
        help=f"comma-separated, in order, or all (default: {','.join(MODELS)}; --quick, --dry-run: "
        f"{','.join(QUICK_MODELS)})",
    )
    ap.add_argument("--systems", default=None, help=f"comma-separated from {','.join(SYSTEMS)}")
    ap.add_argument(
        "--quick",
        action="store_true",
        help="2-minute run: DiT-XL/2 then Sana, ≤10 steps, eager vs ours only, 1 repeat, no text",
    )
    ap.add_argument(
        "--dry-run", action="store_true", help="CPU, tiny configs, fp32, 2 steps (a code-path check)"
    )
    ap.add_argument("--steps", type=int, help="denoising steps (default: the family's; --quick ≤ 10)")
    ap.add_argument("--repeats", type=int, help="timed whole generations per system (default 2; quick/dry 1)")
    ap.add_argument("--budget-s", type=float, help="time budget from the start (default 420; --quick 120)")
    ap.add_argument("--no-text", action="store_true", help="leave out the text-encoder measurement")
    ap.add_argument("--peak-tflops", type=float, help="the device's dense matrix rate for the roofline")
    ap.add_argument("--out", help="results folder (default benchmarks/results; the dry run: a temp folder)")
    ap.add_argument(
        "--cache-dir", help="engines and inductor cache (default $DITRT_BENCH_CACHE, ~/.cache/ditrt/bench)"
    )
    ap.add_argument(
        "--keep-sources", action="store_true", help="keep the saved diffusers folders in the cache"
    )
    ap.add_argument(
        "--keep-engines-gb", type=float, default=8.0, help="remove engine folders above this size"
    )
    ap.add_argument("--seed", type=int, default=SEED)
    args = ap.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if args.models == "all":
        args.models = MODELS
    elif args.models:
        args.models = tuple(args.models.split(","))
    else:
        args.models = QUICK_MODELS if args.quick or args.dry_run else MODELS
    default_systems = DRY_SYSTEMS if args.dry_run else QUICK_SYSTEMS if args.quick else GPU_SYSTEMS
    args.systems = tuple(args.systems.split(",")) if args.systems else default_systems
    for what, chosen, known in (("model", args.models, MODELS), ("system", args.systems, SYSTEMS)):
        bad = [x for x in chosen if x not in known]
        if bad:
            ap.error(f"unknown {what} {', '.join(bad)}; choose from {', '.join(known)}")
    args.repeats = args.repeats or (1 if args.quick or args.dry_run else 2)
    args.budget_s = args.budget_s or (120.0 if args.quick else 900.0 if args.dry_run else 420.0)
    if args.out is None:
        args.out = (
            tempfile.mkdtemp(prefix="bench-gpu-dry-")
            if args.dry_run
            else str(ROOT / "benchmarks" / "results")
        )
    if args.cache_dir is None:
        if args.dry_run:
            args.cache_dir = tempfile.mkdtemp(prefix="bench-gpu-cache-")
        else:
            default = Path(os.environ.get("DITRT_BENCH_CACHE", Path.home() / ".cache" / "ditrt" / "bench"))
            args.cache_dir = str(default)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.dry_run:
        device, dtype = torch.device("cpu"), torch.float32
    elif not torch.cuda.is_available():
        print("error: no CUDA device; the benchmark needs a GPU (or use --dry-run)", file=sys.stderr)
        return 2
    else:
        device, dtype = torch.device("cuda"), torch.bfloat16
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(Path(args.cache_dir) / "inductor"))
    torch.manual_seed(args.seed)
    bench = Bench(args, device, dtype)
    info, ver = bench.results["device"], bench.results["versions"]
    bench.clock.log(
        f"device {info['name']}, driver {info.get('driver')}, CUDA {info.get('cuda')}, torch {ver['torch']}, "
        f"triton {ver['triton']}, diffusers {ver['diffusers']}, transformers {ver['transformers']}"
    )
    bench.clock.log(
        f"models {', '.join(args.models)}; systems {', '.join(args.systems)}; budget {args.budget_s:.0f} s; "
        f"cache {args.cache_dir}; results {bench.json_path}"
    )
    bench.save()
    for name in args.models:
        try:
            bench.model(name)
        except Exception as e:  # e.g. out of memory building a model: recorded, the next model runs
            bench.failed = True
            r = bench.results["models"].setdefault(name, {"notes": []})
            r.update(
                status="error", error=f"{type(e).__name__}: {e}"[:2000], trace=traceback.format_exc()[-3000:]
            )
            bench.clock.log(f"{name}: FAILED: {type(e).__name__}: {str(e)[:300]}")
            free_memory(device)
            bench.save()
    bench.save()
    bench.clock.log(f"wrote {bench.json_path} and {bench.json_path.with_suffix('.md').name}")
    print(markdown(bench.results))
    return 1 if bench.failed else 0


if __name__ == "__main__":
    sys.exit(main())
