"""Plugin-lowered ONNX -> TensorRT engine (.plan): strongly typed, one optimisation profile, our AOT plugins.

The profile comes from the engine's declared inputs: every symbolic axis ("B", "T") gets a (min, opt, max)
range from `dims`, so the same declaration drives the ONNX axes, the manifest and the engine's shape range.
"""

import os
import tempfile
from dataclasses import replace
from pathlib import Path

from ditrt.runtime.errors import BackendUnavailable, InputError
from ditrt.runtime.manifest import Component, TensorSpec

ENGINES = ("onnx", "tensorrt", "aoti")

# Batch: 1..4 as TensorRT's diffusion demo; text tokens: up to the ONNX export's dynamic-dim bound.
DEFAULT_DIMS = {"B": (1, 1, 4), "T": (1, 300, 1024), "n": (1, 2, 2)}


def import_tensorrt():
    try:
        import tensorrt
    except ImportError:
        raise BackendUnavailable(
            "TensorRT is not installed; `pip install tensorrt` on a machine with an NVIDIA "
            "GPU, or export with --engine onnx"
        ) from None
    return tensorrt


def check_engine(engine: str, lowering_name: str) -> None:
    """Refuse an engine request that cannot succeed, before the (slow) ONNX export."""
    if engine not in ENGINES:
        raise InputError(f"unknown engine {engine!r}; choose from {', '.join(ENGINES)}")
    if engine == "aoti" and lowering_name != "portable":
        raise InputError(
            "AOTInductor packages choose how the dit ops go in (CUDA kernels on a GPU, their reference on "
            "the CPU); leave --lowering out with --engine aoti"
        )
    if engine == "tensorrt":
        if lowering_name != "plugin":
            raise InputError(
                "TensorRT engines are built from the plugin lowering; use --lowering plugin (or leave it out)"
            )
        import_tensorrt()
        from ..kernels import find_nvcc

        find_nvcc()  # the plugins' PTX is compiled while the engine builds; say now if that cannot work


def engine_components(engine: str, folder: Path, components: dict[str, Component], **options) -> dict:
    """The exported ONNX components as they are ("onnx"), or each built into folder/<name>/<name>.plan."""
    if engine != "tensorrt":
        return components
    out = {}
    for name, c in components.items():
        plan = (Path(c.file).parent / f"{name}.plan").as_posix()
        build_engine(folder / c.file, folder / plan, c.inputs, **options)
        out[name] = replace(c, file=plan, backend="tensorrt")
    return out


def profile_shapes(inputs: list[TensorSpec], dims: dict[str, tuple[int, int, int]] | None = None) -> dict:
    """{input name: (min, opt, max) shapes} for every input with a symbolic axis; fixed inputs need none."""
    dims = {**DEFAULT_DIMS, **(dims or {})}
    missing = sorted({d for s in inputs for d in s.shape if isinstance(d, str)} - set(dims))
    if missing:
        raise InputError(
            f"no TensorRT profile range for axis {', '.join(map(repr, missing))}; give "
            f"dims={{{missing[0]!r}: (min, opt, max)}}"
        )
    for name, (lo, opt, hi) in dims.items():
        if not 1 <= lo <= opt <= hi:
            raise InputError(
                f"profile range {name}={(lo, opt, hi)} is not allowed; use 1 <= min <= opt <= max"
            )
    out = {}
    for s in inputs:
        if any(isinstance(d, str) for d in s.shape):
            out[s.name] = tuple(
                tuple(dims[d][i] if isinstance(d, str) else d for d in s.shape) for i in range(3)
            )
    return out


def build_engine(
    onnx_path: Path,
    plan_path: Path,
    inputs: list[TensorSpec],
    dims: dict[str, tuple[int, int, int]] | None = None,
    timing_cache: Path | None = None,
    optimization_level: int | None = None,
) -> Path:
    """Build onnx_path into a serialized engine at plan_path (written to a temp file, then renamed)."""
    trt = import_tensorrt()
    from .plugins import register_plugins

    register_plugins()  # the parser maps our plugin nodes to creators found in the registry
    shapes = profile_shapes(inputs, dims)
    logger = trt.Logger(trt.Logger.WARNING)
    try:
        builder = trt.Builder(logger)
    except (TypeError, RuntimeError):  # the binding raises when the C++ factory returns null
        builder = None
    if builder is None:
        raise BackendUnavailable("TensorRT cannot start a builder here (no CUDA GPU visible?)")
    typed = getattr(
        trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None
    )  # always on (and ignored) in 11.x
    network = builder.create_network(0 if typed is None else 1 << int(typed))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):  # from the path, so external weights resolve
        first = parser.get_error(0).desc() if parser.num_errors else "unknown error"
        raise BackendUnavailable(f"TensorRT cannot parse {str(onnx_path)!r}: {first}")
    config = builder.create_builder_config()
    tf32 = getattr(trt.BuilderFlag, "TF32", None)
    if tf32 is not None:  # fp32 graphs stay fp32: lower precision is chosen in the ONNX graph (--precision)
        config.clear_flag(tf32)
    profile = builder.create_optimization_profile()
    for name, (lo, opt, hi) in shapes.items():
        profile.set_shape(name, lo, opt, hi)
    config.add_optimization_profile(profile)
    if optimization_level is not None:
        config.builder_optimization_level = optimization_level
    if timing_cache is not None:
        cached = Path(timing_cache).read_bytes() if Path(timing_cache).is_file() else b""
        config.set_timing_cache(
            config.create_timing_cache(cached), False
        )  # False: refuse another GPU's cache
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise BackendUnavailable(
            f"TensorRT could not build an engine from {str(onnx_path)!r}; see its log above"
        )
    if timing_cache is not None:
        _write_atomic(Path(timing_cache), config.get_timing_cache().serialize())
    _write_atomic(Path(plan_path), plan)
    return Path(plan_path)


def _write_atomic(path: Path, data) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
