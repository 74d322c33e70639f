"""Engine precision: the dtype each component computes in for a requested `--precision`, and the cast.

The fp32 islands live in the model code: FP32LayerNorm, FP32GroupNorm, RMSNorm and `sdpa` in models/layers.py,
the custom ops' fp32 statistics and sums, the fp32 timestep sinusoid and RoPE tables. They are `.float()` ...
`.to(dtype)` pairs, no-ops in fp32, that become Cast nodes around the norms and softmax of an fp16/bf16 graph,
which a strongly typed TensorRT build keeps in fp32. Engine inputs and outputs stay fp32 at every precision (the
graphs cast at their boundaries): the runtime feeds every folder the same arrays and keeps the sampler state in fp32.
"""

import torch
from torch import nn

from ditrt.runtime.errors import InputError

from .models.layers import FP32LayerNorm

# The dtype table: engine tensor dtypes by the names the manifest and ONNX use, and the --precision names of
# the float ones.
TORCH_DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int64": torch.int64,
    "int32": torch.int32,
}
PRECISIONS = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
FLOAT_DTYPES = tuple(TORCH_DTYPES[name] for name in PRECISIONS.values())
MIN_OPSET = {"bf16": 22}  # ONNX's Conv (and other ops) accept bfloat16 from opset 22 on

# What each kind of component computes in, per requested precision:
#   T5 overflows in fp16 (transformers keeps its `wo` in fp32; TensorRT's Flux demo notes accuracy issues): fp32.
#   VAE decoders overflow in fp16 (diffusers' force_upcast; TensorRT's Flux demo builds them bf16 or fp32).
#   Gemma-2 runs in bf16 in diffusers' SanaPipeline, never in fp16.
#   CLIP follows the request, as in TensorRT's Flux demo.
POLICY = {
    kind: dict(zip(PRECISIONS, row))
    for kind, row in {
        #            fp32    fp16    bf16
        "denoiser": ("fp32", "fp16", "bf16"),
        "clip": ("fp32", "fp16", "bf16"),
        "t5": ("fp32", "fp32", "fp32"),
        "gemma2": ("fp32", "fp32", "bf16"),
        "vae": ("fp32", "fp32", "bf16"),
    }.items()
}


def text_kind(module: nn.Module | type) -> str | None:
    """The POLICY row of a transformers text encoder (a module or its class), None for anything else."""
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, Gemma2Model, T5EncoderModel

    kinds = {
        "clip": (CLIPTextModel, CLIPTextModelWithProjection),
        "t5": (T5EncoderModel,),
        "gemma2": (Gemma2Model,),
    }
    cls = module if isinstance(module, type) else type(module)
    return next((k for k, types in kinds.items() if issubclass(cls, types)), None)


def policy_dtype(kind: str | None, precision: str) -> torch.dtype:
    """The torch dtype a component of this POLICY kind computes in for the requested precision (fp32 for a
    kind the table does not name). Loaders build each component directly in it (source.resolve_source)."""
    return torch_dtype(POLICY[kind][precision] if kind in POLICY else "fp32")


def cast(module: nn.Module, precision: str) -> nn.Module:
    """Cast module to precision in place (no copy of tensors already in it: modules loaded in their POLICY
    dtype pass through). A transformers encoder below fp32 also gets its islands: eager attention (whose
    softmax is fp32, where SDPA's is not) and LayerNorms with fp32 statistics (T5 and Gemma-2 RMSNorms compute
    in fp32 already)."""
    module.to(torch_dtype(precision))
    if precision != "fp32" and text_kind(module) is not None:
        module.set_attn_implementation("eager")
        for m in module.modules():
            if type(m) is nn.LayerNorm:
                m.__class__ = FP32LayerNorm  # same parameters, fp32 statistics
    return module


def apply_policy(
    precision: str, denoiser: nn.Module, vae: nn.Module | None = None, text: nn.Module | None = None
) -> dict:
    """Cast the exported modules in place as POLICY says for the requested precision -> what was done, for the
    manifest's export record (the text_encoder engine may hold encoders of different precisions)."""
    if precision not in PRECISIONS:
        raise InputError(f"unknown precision {precision!r}; choose from {', '.join(PRECISIONS)}")
    cast(denoiser, POLICY["denoiser"][precision])
    if vae is not None:
        cast(vae, POLICY["vae"][precision])
    parts = {}
    for path, module in text.named_modules() if text is not None else ():
        kind = text_kind(module)
        if (
            kind is not None
        ):  # prompt graphs name their encoders clip_l, clip_g, t5; a lone encoder is "encoder"
            name = kind if path.split(".")[0] == "encoder" else path.split(".")[0]
            parts[name] = POLICY[kind][precision]
            cast(module, parts[name])
    return {"requested": precision, "text_encoders": parts}


def precision_of(module: nn.Module) -> str:
    """The manifest's precision of an engine: its narrowest parameter dtype, the one a backend must run."""
    reduced = {p.dtype for p in module.parameters()} - {torch.float32}
    return next((p for p, name in PRECISIONS.items() if TORCH_DTYPES[name] in reduced), "fp32")


def torch_dtype(precision: str) -> torch.dtype:
    """--precision name (fp32, fp16, bf16) -> torch dtype."""
    return TORCH_DTYPES[PRECISIONS[precision]]


def dtype_name(dtype: torch.dtype) -> str | None:
    """torch dtype -> the manifest's name, None where engines have no such dtype."""
    return next((name for name, d in TORCH_DTYPES.items() if d == dtype), None)
