"""The dit ops as C++ torch ops: csrc/torch_ops.cpp compiled with g++ into libditrt_ops.so (cached) and loaded.

`torch.ops.ditrt.adaln_modulate / adaln_modulate_residual / linear_attention` have CUDA (the csrc/ kernels), CPU
(the reference maths in ATen) and Meta kernels, and are registered from C++, so AOTInductor packages that call
them also run from the C++ package loader (torch::inductor::AOTIModelPackageLoader), where ops registered from
Python do not exist. Lowering "kernels" (ditrt.export.ops) puts them into exported graphs.

The build: libditkernels.so first (`build.build()`, nvcc), then g++ against the installed torch (its headers, the
CUDA toolkit's cuda_runtime_api.h, `-lc10 -ltorch_cpu -ltorch`, its C++ ABI) into
$DITRT_KERNEL_CACHE/<hash>/ (default ~/.cache/ditrt/kernels), named by a hash of the sources, the flags, the
compiler, torch and the kernel library; the folder appears complete (temporary files, then renames).
That folder holds libditrt_ops.so and a copy of libditkernels.so: libditrt_ops.so links the kernel library by name
with RUNPATH $ORIGIN, so a plain dlopen of libditrt_ops.so, from Python (`torch.ops.load_library`) or from a C++
program (`dlopen(path, RTLD_NOW)` before loading a package), finds the copy beside it, and the two files can be
shipped together (`package_libraries()`). libditkernels links the CUDA runtime statically and loads libcuda only
when a kernel runs, so both load on a machine without a GPU.

A process holds one set of ditrt ops: when a copy of the library is already registered (an engine folder's), a
later copy registers nothing and the first serves (see `Registration` in torch_ops.cpp).

`load()` builds if needed and loads, raising KernelUnavailable; `available()` is the lenient form for callers
that can do without: the library's path, or None after one warning naming the reason.
"""

import functools
import hashlib
import importlib
import os
import re
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

from .build import KernelUnavailable, cache_root, csrc_dir, find_nvcc

kernels = importlib.import_module(
    ".build", __package__
)  # the module (the package exports its build function)

LIBRARY = "libditrt_ops.so"
SOURCE = "torch_ops.cpp"
# torch's headers need C++20 (torch.utils.cpp_extension compiles extensions with -std=c++20).
FLAGS = ("-O2", "-std=c++20", "-fPIC", "-shared")
OPS = ("adaln_modulate", "adaln_modulate_residual", "linear_attention")


def find_cxx() -> str:
    """$CXX when set, else g++ on PATH."""
    cxx = os.environ.get("CXX") or "g++"
    path = shutil.which(cxx)
    if path is None:
        raise KernelUnavailable(
            f"C++ compiler {cxx!r} not found: install g++ (or set CXX) to build the ditrt torch ops"
        )
    return path


def cuda_include_dir(nvcc: str) -> Path:
    """The CUDA toolkit's include folder (cuda_runtime_api.h): nvcc's own -I, which also sees through wrapper
    scripts, else <toolkit>/include next to nvcc's bin/."""
    r = subprocess.run([nvcc, "--dryrun", "-c", "x.cu", "-o", os.devnull], capture_output=True, text=True)
    found = re.findall(r'INCLUDES="?-I"?([^"\s]+)', r.stdout + r.stderr)
    home = os.environ.get("CUDA_HOME")
    candidates = [*map(Path, found), *([Path(home) / "include"] if home else [])]
    candidates.append(Path(nvcc).resolve().parents[1] / "include")
    for folder in candidates:
        if (folder / "cuda_runtime_api.h").is_file():
            return folder.resolve()
    raise KernelUnavailable(
        f"cuda_runtime_api.h not found in {', '.join(map(str, candidates))}: point CUDA_HOME at a complete "
        "CUDA toolkit"
    )


def torch_config() -> tuple[list[str], Path, list[str]]:
    """torch's include folders, its lib/ folder and the defines its C++ ABI needs."""
    import torch
    import torch.utils.cpp_extension

    includes = torch.utils.cpp_extension.include_paths()
    defines = [f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"]
    return includes, Path(torch.__file__).parent / "lib", defines


def _command(cxx: str, out: str, folder: Path, cuda_include: Path) -> list[str]:
    includes, torch_lib, defines = torch_config()
    src = csrc_dir()
    return [
        cxx,
        *FLAGS,
        *defines,
        *(f"-I{p}" for p in includes),
        f"-I{src}",
        f"-I{cuda_include}",
        str(src / SOURCE),
        "-o",
        out,
        f"-L{folder}",
        "-lditkernels",
        f"-L{torch_lib}",
        "-lc10",
        "-ltorch_cpu",
        "-ltorch",
        "-Wl,--no-undefined",
        # the kernel library beside this one; torch's lib/ for a process that has not loaded torch yet
        "-Wl,-rpath,$ORIGIN",
        f"-Wl,-rpath,{torch_lib}",
    ]


def library_path(kernel_library: Path | None = None) -> Path:
    """Where the op library for these sources, flags, compiler, torch and kernel library lives (built or not)."""
    import torch

    kernel_library = kernel_library or kernels.library_path()
    cxx, src = find_cxx(), csrc_dir()
    digest = hashlib.sha256()
    for path in (src / SOURCE, src / "dit_kernels.h"):
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    digest.update(" ".join(_command(cxx, "OUT", Path("DIR"), Path("CUDA"))).encode())
    digest.update(kernels._run([cxx, "--version"], f"{cxx} --version").encode())
    digest.update(f"torch {torch.__version__}\0{kernel_library.parent.name}".encode())
    return cache_root() / f"ops-{digest.hexdigest()[:16]}" / LIBRARY


def build(force: bool = False) -> Path:
    """Build libditkernels.so (nvcc) and then libditrt_ops.so (g++) unless cached; returns the op library's path."""
    kernel_library = kernels.build()
    out = library_path(kernel_library)
    if out.is_file() and not force:
        return out
    cxx, cuda_include = find_cxx(), cuda_include_dir(find_nvcc())
    folder = out.parent
    folder.mkdir(parents=True, exist_ok=True)
    _publish(folder / kernels.LIBRARY, lambda tmp: shutil.copyfile(kernel_library, tmp))
    _publish(out, lambda tmp: kernels._run(_command(cxx, tmp, folder, cuda_include), f"g++ {SOURCE}"))
    return out


def _publish(path: Path, write) -> None:
    """write(tmp) a temporary file beside path, then rename it over path (concurrent builders each rename a
    complete file)."""
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o755)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def package_libraries(path: Path | None = None) -> list[Path]:
    """The files to ship beside packages that call the ops, in load order: the kernel library, then the op
    library (which finds the first beside it through its $ORIGIN RUNPATH)."""
    path = path or build()
    return [path.parent / kernels.LIBRARY, path]


def registered() -> bool:
    """Whether the ditrt ops are registered in this process (by this library or another copy of it)."""
    import torch

    try:
        return all(torch._C._dispatch_has_kernel_for_dispatch_key(f"ditrt::{op}", "CPU") for op in OPS)
    except RuntimeError:  # "operator ditrt::... does not exist"
        return False


@functools.lru_cache(maxsize=None)
def load() -> Path:
    """Build if needed, then load the op library into this process (torch.ops.ditrt.*); returns its path.
    Raises KernelUnavailable (no nvcc or g++, compile error, library that does not load)."""
    import torch

    path = build()
    try:
        torch.ops.load_library(str(path))
    except OSError as e:
        raise KernelUnavailable(f"cannot load {path}: {e}") from None
    if not registered():
        raise KernelUnavailable(f"{path} loaded but registered no ditrt ops (see the warning it printed)")
    return path


@functools.lru_cache(maxsize=None)
def available() -> Path | None:
    """load()'s path, or None after one warning naming why the ditrt ops cannot be built or loaded here."""
    try:
        return load()
    except KernelUnavailable as e:
        warnings.warn(f"ditrt torch ops unavailable: {e}", RuntimeWarning, stacklevel=3)
        return None
