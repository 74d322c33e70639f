"""Compile csrc/ with the machine's nvcc into libditkernels.so (cached), emit PTX, and load the library with ctypes.

Nothing runs at import. The cache folder is $DITRT_KERNEL_CACHE, else ~/.cache/ditrt/kernels; each build lives in a
subfolder named by a hash of the sources, the flags and `nvcc --version`, and appears there only when complete.
"""

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from ditrt.runtime.errors import BackendUnavailable

LIBRARY = "libditkernels.so"
ENTRY = "dit_kernels.cu"
# sm_80 and sm_90 machine code, plus compute_90 PTX for the driver to JIT on newer GPUs. No --use_fast_math:
# LayerNorm's statistics and linear attention's division keep IEEE fp32 rounding.
GENCODE = (
    "-gencode",
    "arch=compute_80,code=sm_80",
    "-gencode",
    "arch=compute_90,code=sm_90",
    "-gencode",
    "arch=compute_90,code=compute_90",
)
FLAGS = ("-O3", "-std=c++17", "-lineinfo", "--threads", "0", "-Xcompiler", "-fPIC", "-shared")


class KernelUnavailable(BackendUnavailable):
    """The CUDA kernels cannot be built or loaded here (no nvcc, no sources, compile error, no GPU)."""


def csrc_dir() -> Path:
    """The kernel sources: csrc/ at the repository root (an editable install)."""
    path = Path(__file__).resolve().parents[2] / "csrc"
    if not (path / ENTRY).is_file():
        raise KernelUnavailable(
            f"CUDA kernel sources not found at {path}: build the kernels from a source checkout "
            "installed with `pip install -e .`"
        )
    return path


def find_nvcc() -> str:
    """$CUDA_HOME/bin/nvcc when CUDA_HOME is set, else nvcc on PATH."""
    home = os.environ.get("CUDA_HOME")
    if home:
        nvcc = Path(home) / "bin" / "nvcc"
        if not os.access(nvcc, os.X_OK):
            raise KernelUnavailable(
                f"CUDA_HOME={home} has no bin/nvcc: point CUDA_HOME at a CUDA toolkit "
                "(12 or newer) or unset it to use nvcc from PATH"
            )
        return str(nvcc)
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        raise KernelUnavailable(
            "nvcc not found: install the CUDA toolkit (12 or newer) and set CUDA_HOME to it "
            "or put its bin/ on PATH"
        )
    return nvcc


def cache_root() -> Path:
    return Path(os.environ.get("DITRT_KERNEL_CACHE") or Path.home() / ".cache" / "ditrt" / "kernels")


def library_path(nvcc: str | None = None) -> Path:
    """Where the library for these sources, flags and nvcc lives (built or not)."""
    nvcc = nvcc or find_nvcc()
    src = csrc_dir()
    digest = hashlib.sha256()
    for path in sorted([src / ENTRY, *src.glob("*.cuh"), *src.glob("*.h")]):
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    digest.update(" ".join(GENCODE + FLAGS).encode())
    digest.update(_run([nvcc, "--version"], "nvcc --version").encode())
    return cache_root() / digest.hexdigest()[:16] / LIBRARY


def build(force: bool = False) -> Path:
    """Compile csrc/dit_kernels.cu into the cache unless it is there already; returns the library's path."""
    nvcc = find_nvcc()
    out = library_path(nvcc)
    if out.is_file() and not force:
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    try:
        src = csrc_dir()
        _run([nvcc, *GENCODE, *FLAGS, "-I", str(src), "-o", tmp, str(src / ENTRY)], f"nvcc {ENTRY}")
        os.replace(tmp, out)  # concurrent builders each rename a complete file
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


def emit_ptx(source: str | Path, arch: str = "compute_80") -> str:
    """PTX of one .cu file (a TensorRT plugin embeds it), compiled like the library with csrc/ on the include path."""
    nvcc, src = find_nvcc(), csrc_dir()
    source = Path(source)
    if not source.is_absolute():
        source = src / source
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / (source.stem + ".ptx")
        _run(
            [nvcc, "-ptx", f"-arch={arch}", "-O3", "-std=c++17", "-I", str(src), "-o", str(out), str(source)],
            f"nvcc -ptx {source.name}",
        )
        return out.read_text()


@functools.lru_cache(maxsize=None)
def load() -> ctypes.CDLL:
    """Build if needed, then load the library with its C ABI typed (see csrc/dit_kernels.h)."""
    path = build()
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as e:
        raise KernelUnavailable(f"cannot load {path}: {e}") from None
    p, i64, f32, i32, size = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float, ctypes.c_int, ctypes.c_size_t
    lib.dit_adaln_modulate.argtypes = [p, p, p, p, i64, i64, i64, f32, i32, p]
    lib.dit_adaln_modulate_residual.argtypes = [p, p, p, p, p, p, p, i64, i64, i64, f32, i32, p]
    lib.dit_linear_attention_workspace_size.argtypes = [i64, i64, i64, i64]
    lib.dit_linear_attention_workspace_size.restype = size
    lib.dit_linear_attention.argtypes = [p, p, p, p, i64, i64, i64, i64, f32, i32, p, size, p]
    lib.dit_runtime_check.argtypes = []
    lib.dit_error_string.argtypes = [i32]
    lib.dit_error_string.restype = ctypes.c_char_p
    lib.dit_kernels_version.argtypes = []
    lib.dit_kernels_version.restype = ctypes.c_char_p
    for name in (
        "dit_adaln_modulate",
        "dit_adaln_modulate_residual",
        "dit_linear_attention",
        "dit_runtime_check",
    ):
        getattr(lib, name).restype = i32
    return lib


def _run(cmd: list[str], what: str) -> str:
    """Run a compiler command; on failure raise with its first error line."""
    try:
        r = subprocess.run(cmd, capture_output=True, text=True)
    except OSError as e:
        raise KernelUnavailable(f"{what} could not run: {e}") from None
    if r.returncode != 0:
        lines = (r.stderr + r.stdout).splitlines()
        errors = [ln for ln in lines if "error:" in ln.lower()] or [
            ln for ln in lines if "error" in ln.lower()
        ]
        first = (errors or lines or [f"exit code {r.returncode}"])[0]
        raise KernelUnavailable(f"{what} failed: {first.strip()}")
    return r.stdout
