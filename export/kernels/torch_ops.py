"""CUDA implementations of the dit:: custom ops: csrc/ kernels called through the C ABI with ctypes.

How they get registered, and when the library is built:
- `install()` registers the "cuda" kernels below with torch.library. `ditrt.export.ops` calls it at import; that
  compiles nothing and touches no GPU, and on a CPU-only machine nothing ever calls these kernels.
- The first dit op on a CUDA tensor loads the library, building it once if the cache has none (about a minute;
  `python -m ditrt.export.kernels build` does it ahead of time). If it cannot be built or loaded (no nvcc, no
  sources), that call and later ones use the plain-torch reference after one warning naming the reason.
- `register()` is the strict form for tests and benchmarks: it needs a CUDA device, builds and loads now, and raises
  KernelUnavailable otherwise.
`adaln_modulate_cuda`, `adaln_modulate_residual_cuda` and `linear_attention_cuda` are those kernels, callable
directly (their input checks run before any device work); `library()` is the loaded library or None.
Inputs the kernels do not cover (dtypes other than fp32/fp16/bf16, D above the kernel's limit, head dims above 64,
empty tensors) go to the reference, which computes the same op. Inconsistent inputs raise InputError.
"""

import functools
import importlib
import warnings

import torch
from torch import Tensor

from ditrt.runtime.errors import InputError

from .build import KernelUnavailable, load

DTYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
ADALN_MAX_DIM = {torch.float32: 8192, torch.float16: 16384, torch.bfloat16: 16384}  # adaln_max_dim in csrc
LA_MAX_HEAD_DIM = 64


def _load_usable():
    """The library, once its CUDA runtime has accepted the current device."""
    lib = load()
    code = lib.dit_runtime_check()
    if code != 0:
        raise KernelUnavailable(
            f"libditkernels cannot use this GPU: {lib.dit_error_string(code).decode()} "
            f"(cudaError {code}); build it with a CUDA toolkit no newer than the driver"
        )
    return lib


@functools.lru_cache(maxsize=None)
def library():
    """The usable library, or None after one warning when it cannot be built or loaded here."""
    try:
        return _load_usable()
    except KernelUnavailable as e:
        warnings.warn(
            f"dit CUDA kernels unavailable, the dit ops use the torch reference: {e}",
            RuntimeWarning,
            stacklevel=4,
        )
        return None


def _reference(op: str):
    """The plain-torch reference of an op, imported on use (ditrt.export.ops imports this module)."""
    return importlib.import_module(f"ditrt.export.ops.{op}").reference


def _check_same(op: str, tensors: dict[str, Tensor]) -> None:
    first_name, first = next(iter(tensors.items()))
    for name, t in tensors.items():
        if t.device != first.device:
            raise InputError(
                f"{op}: {name} is on {t.device} but {first_name} on {first.device}; "
                "move all inputs to one device"
            )
        if t.dtype != first.dtype:
            raise InputError(
                f"{op}: {name} is {t.dtype} but {first_name} {first.dtype}; cast all inputs to one dtype"
            )


def _check_modulation(op: str, x: Tensor, rows: dict[str, Tensor]) -> None:
    if x.dim() != 3:
        raise InputError(f"{op}: expected a (B, N, D) input, got shape {tuple(x.shape)}")
    for name, t in rows.items():
        if t.shape != (x.shape[0], x.shape[2]):
            raise InputError(
                f"{op}: {name} must be (B, D) = {(x.shape[0], x.shape[2])}, got {tuple(t.shape)}"
            )


def _call(lib, fn, *args) -> None:
    code = fn(*args)
    if code != 0:
        raise RuntimeError(f"{fn.__name__} failed: {lib.dit_error_string(code).decode()} (cudaError {code})")


def _stream(t: Tensor) -> int:
    return torch.cuda.current_stream(t.device).cuda_stream


def adaln_modulate_cuda(x: Tensor, shift: Tensor, scale: Tensor, eps: float) -> Tensor:
    _check_same("adaln_modulate", {"x": x, "shift": shift, "scale": scale})
    _check_modulation("adaln_modulate", x, {"shift": shift, "scale": scale})
    lib = library()
    if lib is None or x.dtype not in DTYPES or x.numel() == 0 or x.shape[2] > ADALN_MAX_DIM[x.dtype]:
        return _reference("adaln")(x, shift, scale, eps)
    x, shift, scale = x.contiguous(), shift.contiguous(), scale.contiguous()
    out = torch.empty_like(x)
    B, N, D = x.shape
    with torch.cuda.device(x.device):
        _call(
            lib,
            lib.dit_adaln_modulate,
            x.data_ptr(),
            shift.data_ptr(),
            scale.data_ptr(),
            out.data_ptr(),
            B,
            N,
            D,
            eps,
            DTYPES[x.dtype],
            _stream(x),
        )
    return out


def adaln_modulate_residual_cuda(
    residual: Tensor, y: Tensor, gate: Tensor, shift: Tensor, scale: Tensor, eps: float
) -> tuple[Tensor, Tensor]:
    inputs = {"residual": residual, "y": y, "gate": gate, "shift": shift, "scale": scale}
    _check_same("adaln_modulate_residual", inputs)
    _check_modulation("adaln_modulate_residual", residual, {"gate": gate, "shift": shift, "scale": scale})
    if y.shape != residual.shape:
        raise InputError(
            f"adaln_modulate_residual: y must have the shape of residual {tuple(residual.shape)}, "
            f"got {tuple(y.shape)}"
        )
    lib = library()
    if (
        lib is None
        or residual.dtype not in DTYPES
        or residual.numel() == 0
        or residual.shape[2] > ADALN_MAX_DIM[residual.dtype]
    ):
        return _reference("adaln_residual")(residual, y, gate, shift, scale, eps)
    residual, y, gate, shift, scale = (t.contiguous() for t in (residual, y, gate, shift, scale))
    h, out = torch.empty_like(residual), torch.empty_like(residual)
    B, N, D = residual.shape
    with torch.cuda.device(residual.device):
        _call(
            lib,
            lib.dit_adaln_modulate_residual,
            residual.data_ptr(),
            y.data_ptr(),
            gate.data_ptr(),
            shift.data_ptr(),
            scale.data_ptr(),
            h.data_ptr(),
            out.data_ptr(),
            B,
            N,
            D,
            eps,
            DTYPES[residual.dtype],
            _stream(residual),
        )
    return h, out


def linear_attention_cuda(q: Tensor, k: Tensor, v: Tensor, eps: float) -> Tensor:
    _check_same("linear_attention", {"q": q, "k": k, "v": v})
    if q.dim() != 4 or not q.shape == k.shape == v.shape:
        raise InputError(
            f"linear_attention: q, k, v must share one (B, H, N, d) shape, got {tuple(q.shape)}, "
            f"{tuple(k.shape)}, {tuple(v.shape)}"
        )
    lib = library()
    if lib is None or q.dtype not in DTYPES or q.numel() == 0 or q.shape[3] > LA_MAX_HEAD_DIM:
        return _reference("linear_attention")(q, k, v, eps)
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    out = torch.empty_like(q)
    B, H, N, d = q.shape
    with torch.cuda.device(q.device):
        need = lib.dit_linear_attention_workspace_size(B, H, N, d)
        work = torch.empty(need, dtype=torch.uint8, device=q.device) if need else None
        _call(
            lib,
            lib.dit_linear_attention,
            q.data_ptr(),
            k.data_ptr(),
            v.data_ptr(),
            out.data_ptr(),
            B,
            H,
            N,
            d,
            eps,
            DTYPES[q.dtype],
            None if work is None else work.data_ptr(),
            need,
            _stream(q),
        )
    return out


@functools.lru_cache(maxsize=None)
def install() -> None:
    """Register the CUDA kernels of the dit:: ops (idempotent; compiles nothing)."""
    importlib.import_module("ditrt.export.ops")  # defines the ops (a no-op when that import is what calls us)
    torch.library.register_kernel("dit::adaln_modulate", "cuda", adaln_modulate_cuda)
    torch.library.register_kernel("dit::adaln_modulate_residual", "cuda", adaln_modulate_residual_cuda)
    torch.library.register_kernel("dit::linear_attention", "cuda", linear_attention_cuda)


def register() -> None:
    """Build and load the kernels now and register them; raises KernelUnavailable where they cannot run."""
    if not torch.cuda.is_available():
        raise KernelUnavailable(
            "no CUDA device: the dit CUDA kernels need a GPU (torch.cuda.is_available() is "
            "False); on this machine the dit ops use the torch reference"
        )
    _load_usable()
    library.cache_clear()  # a lazy attempt that failed earlier does not hide the library now
    install()
