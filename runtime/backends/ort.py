"""ONNX Runtime backend: CPU by default; CUDA when onnxruntime-gpu is installed and a GPU is visible.

Step loops use I/O binding (OrtLoop), so the sampler state stays where the session computes. ORT's own CUDA-graph
mode is not used: it needs every input, the per-step scalars included, at one fixed device address per captured
graph and runs one request at a time per session, while the loops here rotate state buffers and serve concurrent
requests. The torch backend (AOTInductor packages) is the GPU path with CUDA graphs.
"""

import re
from pathlib import Path

import numpy as np

from ..errors import BackendUnavailable, ManifestError
from ..manifest import Component
from . import READ

# cuDNN picks each convolution's fastest algorithm by timing them all once (the VAE's convolutions); ORT's copies
# between host and device go on its compute stream, so a loop's steps never wait for each other
CUDA_PROVIDER = (
    "CUDAExecutionProvider",
    {
        "cudnn_conv_algo_search": "EXHAUSTIVE",
        "cudnn_conv_use_max_workspace": "1",
        "do_copy_in_default_stream": "1",
    },
)


class OrtBackend:
    name = "onnxruntime"

    def __init__(
        self, path: Path, component: Component, threads: int | None = None, providers: list[str] | None = None
    ):
        try:
            import onnxruntime as ort
        except ImportError:
            raise BackendUnavailable("onnxruntime is not installed; `pip install onnxruntime`") from None
        if component.lowering != "portable":
            raise BackendUnavailable(
                f"{path.name!r} contains TensorRT plugin nodes (lowering "
                f"{component.lowering!r}), which ONNX Runtime cannot run; "
                "re-export with the portable lowering"
            )
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        # a failing run is reported by our own exception; at 3 ORT would also print a coloured log line of it
        self.run_options = ort.RunOptions()
        self.run_options.log_severity_level = 4
        if threads:
            opts.intra_op_num_threads = threads
        available = ort.get_available_providers()
        providers = providers or [
            CUDA_PROVIDER if p == "CUDAExecutionProvider" else p
            for p in ("CUDAExecutionProvider", "CPUExecutionProvider")
            if p in available
        ]
        try:
            self.session = ort.InferenceSession(str(path), opts, providers=providers)
        except Exception as e:  # ORT raises its own types for corrupt or truncated models
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            missing = re.search(r"NOT_IMPLEMENTED.*implementation for (\w+)", first)
            if (
                missing and component.precision != "fp32"
            ):  # e.g. ORT's CPU provider has almost no bf16 kernels
                names = [p if isinstance(p, str) else p[0] for p in providers]
                raise BackendUnavailable(
                    f"the onnxruntime backend ({', '.join(names)}) cannot run the {component.precision} engine "
                    f"{component.file!r}: no {component.precision} kernel for {missing[1]}; re-export with "
                    f"dit-export --precision {'fp16' if component.precision == 'bf16' else 'fp32'}"
                ) from None
            raise ManifestError(f"ONNX Runtime cannot load {str(path)!r}: {first}") from None
        self.providers = self.session.get_providers()
        self.ort, self.device = ort, "cuda" if self.providers[0] == "CUDAExecutionProvider" else "cpu"
        # a loop's steps queue on the device without waiting for each other; its read() synchronises
        self.step_options = ort.RunOptions()
        self.step_options.log_severity_level = 4
        self.step_options.add_run_config_entry("disable_synchronize_execution_providers", "1")
        names = {i.name for i in self.session.get_inputs()}
        declared = {s.name for s in component.inputs}
        if names != declared:
            raise ManifestError(
                f"{path.name!r} has inputs {sorted(names)}, the manifest declares {sorted(declared)}"
            )
        self.component = component
        self.output_names = [s.name for s in component.outputs]
        # feeds are cast to the declared dtypes (numpy has no bfloat16: such inputs are passed as given)
        self.dtypes = {s.name: np.dtype(s.dtype) for s in component.inputs if s.dtype != "bfloat16"}
        missing = sorted(set(self.output_names) - {o.name for o in self.session.get_outputs()})
        if missing:
            raise ManifestError(f"{path.name!r} has no output(s) {missing} that the manifest declares")
        check_specs(path, component, self.session)

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        # InferenceSession.run is thread-safe, so one session serves concurrent requests.
        feeds = {k: np.asarray(v, dtype=self.dtypes.get(k)) for k, v in feeds.items()}
        try:
            outputs = self.session.run(self.output_names, feeds, self.run_options)
        except Exception as e:  # ORT's own types; the feeds are the runtime's, built from the manifest
            first = _first_line(e)
            if "allocate" in first or "bad_alloc" in first:  # the machine, not the folder: left as it is
                raise
            raise self._disagree(first) from None
        out = dict(zip(self.output_names, outputs))
        check_outputs(self.component, feeds, out, self._disagree)
        return out

    def loop(self, static: dict[str, np.ndarray], state: dict[str, np.ndarray]) -> "OrtLoop":
        return OrtLoop(self, static, state)

    def _disagree(self, what: str) -> ManifestError:
        return ManifestError(
            f"engine {self.component.file!r} failed on inputs its manifest describes ({what}); "
            "the folder's engines and manifest disagree — re-export it"
        )

    def close(self) -> None:
        self.session = None


class OrtLoop:
    """A step loop through ONNX Runtime's I/O binding. The request's fixed inputs are bound once; the state lives
    in OrtValues on the session's device, x/x_next alternating between two and x0_prev2/x0_prev/x0 rotating through
    three, so that no input is also an output of the same run; per step only the scalars are bound (from the host:
    ORT copies them with the run)."""

    def __init__(self, backend: OrtBackend, static: dict[str, np.ndarray], state: dict[str, np.ndarray]):
        ort, device = backend.ort, backend.device
        self.backend, self.binding, self.step_count = backend, backend.session.io_binding(), 0

        def value(a: np.ndarray, dtype=np.float32):
            return ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(a, dtype=dtype), device, 0)

        self.static = {
            k: value(v, backend.dtypes.get(k)) for k, v in static.items()
        }  # kept alive while bound
        for name, v in self.static.items():
            self.binding.bind_ortvalue_input(name, v)
        # the first step's outputs (allocated by ORT, their shapes checked) complete the two rings
        self.xs, self.x0s = [value(state["x"])], [value(state["x0_prev2"]), value(state["x0_prev"])]
        self.shapes = {k: np.shape(v) for k, v in {**static, **state}.items()}
        self.initial, self.scalars = {k: state[k].copy() for k in READ}, {}

    def step(self, scalars: dict[str, np.ndarray]) -> None:
        i, b, device = self.step_count, self.binding, self.backend.device
        b.bind_ortvalue_input("x", self.xs[i % 2])
        b.bind_ortvalue_input("x0_prev2", self.x0s[i % 3])
        b.bind_ortvalue_input("x0_prev", self.x0s[(i + 1) % 3])
        if i == 0:
            b.bind_output("x_next", device)
            b.bind_output("x0", device)
        else:
            b.bind_ortvalue_output("x_next", self.xs[(i + 1) % 2])
            b.bind_ortvalue_output("x0", self.x0s[(i + 2) % 3])
        self.scalars = {
            k: np.asarray(v, dtype=np.float32) for k, v in scalars.items()
        }  # alive until the next
        for name, v in self.scalars.items():
            b.bind_cpu_input(name, v)
        try:
            self.backend.session.run_with_iobinding(b, self.backend.step_options)
        except Exception as e:  # ORT's own types, as in run()
            raise self.backend._disagree(_first_line(e)) from None
        if i == 0:
            x_next, x0 = b.get_outputs()
            shapes = {**self.shapes, **{k: np.shape(v) for k, v in self.scalars.items()}}
            got = {"x_next": x_next.shape(), "x0": x0.shape()}
            check_outputs(self.backend.component, _shaped(shapes), _shaped(got), self.backend._disagree)
            self.xs.append(x_next)
            self.x0s.append(x0)
        self.step_count += 1

    def read(self) -> dict[str, np.ndarray]:
        if self.step_count == 0:
            return {k: v.copy() for k, v in self.initial.items()}
        x, x0 = self.binding.copy_outputs_to_cpu()  # bound outputs in order: x_next, x0; waits for the device
        return {
            "x": np.array(x, np.float32),
            "x0_prev": np.array(x0, np.float32),
        }  # copies: the buffers rotate

    def close(self) -> None:
        self.binding.clear_binding_inputs()
        self.binding.clear_binding_outputs()
        self.static, self.xs, self.x0s = {}, [], []

    def __enter__(self) -> "OrtLoop":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _shaped(shapes: dict[str, tuple]) -> dict[str, np.ndarray]:
    """Arrays of these shapes that take no memory, for check_outputs."""
    return {k: np.broadcast_to(np.float32(0), tuple(v)) for k, v in shapes.items()}


def _first_line(e: Exception) -> str:
    """The first line of an ORT message, without terminal colour codes or the prefix run_with_iobinding adds,
    cut to a readable length."""
    text = re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", str(e)).strip().removeprefix("Error in execution: ")
    return (text.splitlines()[0] if text else type(e).__name__)[:300]


def check_outputs(component: Component, feeds: dict, out: dict, error) -> None:
    """Each output's shape against its spec: the rank, every fixed axis, and every named axis that an input also
    has (e.g. "B"), at that input's size in this call. An engine that computes other shapes than it declares
    would otherwise feed wrong-sized arrays to the next stage."""
    sizes = {}
    for spec in component.inputs:
        shape = np.shape(feeds.get(spec.name))
        if len(shape) == len(spec.shape):
            sizes.update({a: n for a, n in zip(spec.shape, shape) if isinstance(a, str) and a not in sizes})
    for spec in component.outputs:
        got = np.shape(out[spec.name])
        want = [sizes.get(a, a) if isinstance(a, str) else a for a in spec.shape]
        if len(got) != len(want) or any(isinstance(w, int) and g != w for g, w in zip(got, want)):
            shown = [f"{a}={sizes[a]}" if a in sizes else a for a in spec.shape]
            raise error(
                f"output {spec.name!r} has shape {list(got)}, declared [{', '.join(map(str, shown))}]"
            )


ORT_TYPES = {
    "tensor(float)": "float32",
    "tensor(float16)": "float16",
    "tensor(bfloat16)": "bfloat16",
    "tensor(int64)": "int64",
    "tensor(int32)": "int32",
}


def check_specs(path: Path, component: Component, session) -> None:
    """The manifest's tensor specs against the engine's own: dtype, rank and every fixed axis, so that a damaged
    manifest is refused at load rather than failing inside a generation."""
    actual = {t.name: t for t in [*session.get_inputs(), *session.get_outputs()]}
    for spec in [*component.inputs, *component.outputs]:
        t = actual[spec.name]
        same = all(_same_axis(a, d) for a, d in zip(t.shape, spec.shape))
        if ORT_TYPES.get(t.type) != spec.dtype or len(t.shape) != len(spec.shape) or not same:
            raise ManifestError(
                f"{path.name!r} takes {spec.name!r} as {ORT_TYPES.get(t.type, t.type)} {t.shape}, "
                f"the manifest declares {spec.dtype} {spec.shape}; re-export the folder"
            )


def _same_axis(engine, declared) -> bool:
    """An axis as the engine has it: a fixed size, or a named symbolic axis (the runtime relies on names such as
    the CFG branch axis "n"). Derived axes are written differently by each side ("T + 77" / "77+T"), and an axis
    the engine leaves unnamed (None) may be declared either way."""
    if engine is None or engine == declared:
        return True
    expressions = isinstance(engine, str) and isinstance(declared, str) and not engine.isidentifier()
    return expressions and not declared.isidentifier()
