"""TensorRT plugins for our custom ops, as ahead-of-time (AOT) `tensorrt.plugin` definitions.

The ONNX parser maps a plugin-lowered node (op type "AdaLNModulate", attribute plugin_namespace="dit") to the
plugin registered here as "dit::AdaLNModulate". `aot_impl` hands TensorRT the PTX of one entry point of
csrc/trt_aot.cu plus its launch configuration, which TensorRT bakes into the engine: a .plan then runs on any
TensorRT runtime (C++, trtexec, our runtime backend) without Python plugin code. No JIT (`impl`) is defined:
TensorRT uses the AOT implementation when it is the only one.

Everything above `register_plugins` is plain Python on concrete or symbolic sizes, so tests check the kernel
names, argument lists and launch shapes without TensorRT. Annotations stay real objects (no `from __future__
import annotations`): tensorrt.plugin inspects them.
"""

import functools
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Tuple

from ditrt.runtime.errors import BackendUnavailable

from ..ops import PLUGIN_NAMESPACE
from ..ops.adaln import PLUGIN_NAME as ADALN
from ..ops.adaln_residual import PLUGIN_NAME as ADALN_RESIDUAL
from ..ops.linear_attention import PLUGIN_NAME as LINEAR_ATTENTION

SUFFIX = {"float32": "f32", "float16": "f16", "bfloat16": "bf16"}
CTYPE = {"float32": "float", "float16": "__half", "bfloat16": "__nv_bfloat16"}
ELEM_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
# The launch contract of csrc/adaln_modulate.cuh and csrc/linear_attention.cuh (tests compare with the C++).
ADALN_BYTES_PER_THREAD, ADALN_MAX_THREADS = 32, 1024
LA_THREADS, LA_MAX_HEAD_DIM, LA_BUCKETS = 288, 64, (8, 16, 32, 64)
PTX_ARCH = "compute_80"  # PTX the driver JIT-compiles for any GPU from Ampere on


@dataclass(frozen=True)
class Launch:
    grid: tuple  # (x, y, z); ints, or TensorRT shape expressions inside aot_impl
    block: tuple
    shared_mem: int = 0  # dynamic shared memory in bytes; our kernels use static shared memory only


def ceil_div(a, b):
    return (a + b - 1) // b


def eps_bits(eps: float) -> int:
    """eps as the int32 with its float32 bits: TensorRT passes only integer scalars to AOT kernels."""
    return struct.unpack("<i", struct.pack("<f", eps))[0]


def la_bucket(head_dim: int) -> int:
    """The padded head dim DK a linear-attention kernel is compiled for (la_bucket in linear_attention.cuh)."""
    if not 1 <= head_dim <= LA_MAX_HEAD_DIM:
        raise ValueError(
            f"linear attention head dim {head_dim} is not supported; the kernel takes 1..{LA_MAX_HEAD_DIM}"
        )
    return next(b for b in LA_BUCKETS if head_dim <= b)


def kernel_name(op: str, dtype: str, dk: int | None = None) -> str:
    """Entry point of csrc/trt_aot.cu: dit_adaln_modulate_f16, dit_linear_attention_f32_dk32, ..."""
    return f"dit_{op}_{SUFFIX[dtype]}" + (f"_dk{dk}" if dk is not None else "")


def adaln_max_dim(dtype: str) -> int:
    """Widest row the AdaLN kernel holds in registers (adaln_max_dim in adaln_modulate.cuh)."""
    return ADALN_MAX_THREADS * (ADALN_BYTES_PER_THREAD // ELEM_BYTES[dtype])


def adaln_launch(rows, dim: int, dtype: str, cdiv=ceil_div) -> Launch:
    """Blocks of tx threads per row and ty rows (adaln_threads_x / adaln_rows_per_block); rows = batch·tokens."""
    if not 1 <= dim <= adaln_max_dim(dtype):
        raise ValueError(
            f"AdaLN width {dim} is not supported for {dtype}; the kernel takes 1..{adaln_max_dim(dtype)}"
        )
    v = 16 // ELEM_BYTES[dtype]
    chunks = dim // v if dim % v == 0 else dim  # 16-byte packs, or scalars for ragged widths
    tx = min(max(((chunks + 1) // 2 + 31) // 32 * 32, 32), ADALN_MAX_THREADS)  # ~two packs per thread
    ty = 1 if tx >= 256 else 256 // tx
    return Launch((cdiv(rows, ty), 1, 1), (tx, ty, 1))


def adaln_args(batch, tokens, dim, eps: float) -> tuple:
    """int32 scalars of dit_adaln_modulate_* and dit_adaln_modulate_residual_*, between the input and output
    pointers (both launch as adaln_launch says)."""
    return batch, tokens, dim, eps_bits(eps)


def linear_attention_launch(slabs, head_dim: int) -> Launch:
    """One CTA of LA_THREADS per (batch, head) slab; slabs = batch·heads."""
    la_bucket(head_dim)  # refuses unsupported head dims
    return Launch((slabs, 1, 1), (LA_THREADS, 1, 1))


def linear_attention_args(tokens, head_dim, eps: float) -> tuple:
    """int32 scalars of dit_linear_attention_*, between the input and output pointers."""
    return tokens, head_dim, eps_bits(eps)


@functools.cache
def kernel_ptx(op: str, dtype: str, dk: int | None = None) -> str:
    """PTX holding only the entry point kernel_name(op, dtype, dk): an engine embeds it once per plugin layer."""
    from ..kernels import emit_ptx

    macro = {
        "adaln_modulate": "DIT_AOT_ADALN",
        "adaln_modulate_residual": "DIT_AOT_ADALN_RESIDUAL",
        "linear_attention": "DIT_AOT_LA",
    }[op]
    args = [SUFFIX[dtype], CTYPE[dtype]] + ([str(dk)] if dk is not None else [])
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / f"{kernel_name(op, dtype, dk)}.cu"
        src.write_text(f'#define DIT_AOT_MACROS_ONLY\n#include "trt_aot.cu"\n{macro}({", ".join(args)})\n')
        return emit_ptx(src, PTX_ARCH)


_registered = False


def register_plugins() -> None:
    """Register dit::AdaLNModulate, dit::AdaLNModulateResidual and dit::LinearAttention with TensorRT (once per
    process)."""
    global _registered
    try:
        import tensorrt as trt
        import tensorrt.plugin as trtp
    except ImportError:
        raise BackendUnavailable(
            "TensorRT is not installed; `pip install tensorrt` on a machine with an NVIDIA GPU, "
            "or export with --engine onnx"
        ) from None
    if not hasattr(trtp, "aot_impl"):
        raise BackendUnavailable(
            f"TensorRT {trt.__version__} has no AOT plugins; install tensorrt 10.8 or newer"
        )
    if not _registered:
        dtypes = {trt.float32: "float32", trt.float16: "float16", trt.bfloat16: "bfloat16"}
        _define_adaln(trtp, dtypes)
        _define_adaln_residual(trtp, dtypes)
        _define_linear_attention(trtp, dtypes)
        _registered = True


def _dtype(op: str, dtypes: dict, *tensors) -> str:
    if any(t.dtype != tensors[0].dtype for t in tensors) or tensors[0].dtype not in dtypes:
        raise ValueError(
            f"{PLUGIN_NAMESPACE}::{op} takes float32, float16 or bfloat16 inputs of one dtype; got "
            f"{[str(t.dtype) for t in tensors]}"
        )
    return dtypes[tensors[0].dtype]


def _params(trtp, launch: Launch, args: tuple):
    p = trtp.KernelLaunchParams()
    p.grid_x, p.grid_y, p.grid_z = launch.grid
    p.block_x, p.block_y, p.block_z = launch.block
    p.shared_mem = launch.shared_mem
    return p, trtp.SymIntExprs.from_tuple([trtp.SymInt32(a) for a in args])


def _constant(expr, what: str) -> int:
    if not expr.is_constant:  # block shapes are chosen from it at build time
        raise ValueError(f"{what} must be a fixed size in the ONNX graph")
    return expr.constant_value()


def _define_adaln(trtp, dtypes: dict) -> None:
    plugin_id = f"{PLUGIN_NAMESPACE}::{ADALN}"

    @trtp.register(plugin_id)
    def adaln_desc(
        x: trtp.TensorDesc, shift: trtp.TensorDesc, scale: trtp.TensorDesc, eps: float
    ) -> trtp.TensorDesc:
        _dtype(ADALN, dtypes, x, shift, scale)
        if x.ndim != 3 or shift.ndim != 2 or scale.ndim != 2:
            raise ValueError(f"{plugin_id} takes x (B, N, D) and shift, scale (B, D)")
        return x.like()

    @trtp.aot_impl(plugin_id)
    def adaln_aot(
        x: trtp.TensorDesc,
        shift: trtp.TensorDesc,
        scale: trtp.TensorDesc,
        eps: float,
        outputs: Tuple[trtp.TensorDesc],
        tactic: int,
    ) -> Tuple[str, str, trtp.KernelLaunchParams, trtp.SymIntExprs]:
        dtype = _dtype(ADALN, dtypes, x, shift, scale)
        B, N, D = x.shape_expr
        launch = adaln_launch(B * N, _constant(D, f"{plugin_id} width D"), dtype, trtp.cdiv)
        ptx = kernel_ptx("adaln_modulate", dtype)
        return (kernel_name("adaln_modulate", dtype), ptx, *_params(trtp, launch, adaln_args(B, N, D, eps)))


def _define_adaln_residual(trtp, dtypes: dict) -> None:
    plugin_id = f"{PLUGIN_NAMESPACE}::{ADALN_RESIDUAL}"

    @trtp.register(plugin_id)
    def residual_desc(
        residual: trtp.TensorDesc,
        y: trtp.TensorDesc,
        gate: trtp.TensorDesc,
        shift: trtp.TensorDesc,
        scale: trtp.TensorDesc,
        eps: float,
    ) -> Tuple[trtp.TensorDesc, trtp.TensorDesc]:
        _dtype(ADALN_RESIDUAL, dtypes, residual, y, gate, shift, scale)
        if [t.ndim for t in (residual, y, gate, shift, scale)] != [3, 3, 2, 2, 2]:
            raise ValueError(f"{plugin_id} takes residual, y (B, N, D) and gate, shift, scale (B, D)")
        return residual.like(), residual.like()  # h, out

    @trtp.aot_impl(plugin_id)
    def residual_aot(
        residual: trtp.TensorDesc,
        y: trtp.TensorDesc,
        gate: trtp.TensorDesc,
        shift: trtp.TensorDesc,
        scale: trtp.TensorDesc,
        eps: float,
        outputs: Tuple[trtp.TensorDesc, trtp.TensorDesc],
        tactic: int,
    ) -> Tuple[str, str, trtp.KernelLaunchParams, trtp.SymIntExprs]:
        dtype = _dtype(ADALN_RESIDUAL, dtypes, residual, y, gate, shift, scale)
        B, N, D = residual.shape_expr
        launch = adaln_launch(B * N, _constant(D, f"{plugin_id} width D"), dtype, trtp.cdiv)
        ptx = kernel_ptx("adaln_modulate_residual", dtype)
        return (
            kernel_name("adaln_modulate_residual", dtype),
            ptx,
            *_params(trtp, launch, adaln_args(B, N, D, eps)),
        )


def _define_linear_attention(trtp, dtypes: dict) -> None:
    plugin_id = f"{PLUGIN_NAMESPACE}::{LINEAR_ATTENTION}"

    @trtp.register(plugin_id)
    def la_desc(q: trtp.TensorDesc, k: trtp.TensorDesc, v: trtp.TensorDesc, eps: float) -> trtp.TensorDesc:
        _dtype(LINEAR_ATTENTION, dtypes, q, k, v)
        if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
            raise ValueError(f"{plugin_id} takes q, k, v of shape (B, heads, N, d)")
        return q.like()

    @trtp.aot_impl(plugin_id)
    def la_aot(
        q: trtp.TensorDesc,
        k: trtp.TensorDesc,
        v: trtp.TensorDesc,
        eps: float,
        outputs: Tuple[trtp.TensorDesc],
        tactic: int,
    ) -> Tuple[str, str, trtp.KernelLaunchParams, trtp.SymIntExprs]:
        dtype = _dtype(LINEAR_ATTENTION, dtypes, q, k, v)
        B, H, N, d = q.shape_expr
        head_dim = _constant(d, f"{plugin_id} head dim d")
        dk, launch = la_bucket(head_dim), linear_attention_launch(B * H, head_dim)
        ptx = kernel_ptx("linear_attention", dtype, dk)
        args = linear_attention_args(N, d, eps)
        return (kernel_name("linear_attention", dtype, dk), ptx, *_params(trtp, launch, args))
