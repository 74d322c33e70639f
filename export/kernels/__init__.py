"""CUDA kernels for the dit:: custom ops: building csrc/ with nvcc, loading it, and the torch CUDA bindings.

Importing this package compiles nothing and touches no GPU. `load()` builds the library on first use (cached, see
`build`); `python -m ditrt.export.kernels build` does it ahead of time, with the C++ torch op library of `cpp_ops`
(torch.ops.ditrt.*, what AOTInductor packages call), and prints both paths.
"""

from .build import KernelUnavailable, build, csrc_dir, emit_ptx, find_nvcc, library_path, load

__all__ = ["KernelUnavailable", "build", "csrc_dir", "emit_ptx", "find_nvcc", "library_path", "load"]
