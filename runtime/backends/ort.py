"""ONNX Runtime backend: CPU by default; CUDA when onnxruntime-gpu is installed and a GPU is visible."""

import re
from pathlib import Path

import numpy as np

from ..errors import BackendUnavailable, ManifestError
from ..manifest import Component


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
            p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available
        ]
        try:
            self.session = ort.InferenceSession(str(path), opts, providers=providers)
        except Exception as e:  # ORT raises its own types for corrupt or truncated models
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            missing = re.search(r"NOT_IMPLEMENTED.*implementation for (\w+)", first)
            if (
                missing and component.precision != "fp32"
            ):  # e.g. ORT's CPU provider has almost no bf16 kernels
                raise BackendUnavailable(
                    f"the onnxruntime backend ({', '.join(providers)}) cannot run the {component.precision} engine "
                    f"{component.file!r}: no {component.precision} kernel for {missing[1]}; re-export with "
                    f"dit-export --precision {'fp16' if component.precision == 'bf16' else 'fp32'}"
                ) from None
            raise ManifestError(f"ONNX Runtime cannot load {str(path)!r}: {first}") from None
        self.providers = self.session.get_providers()
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

    def _disagree(self, what: str) -> ManifestError:
        return ManifestError(
            f"engine {self.component.file!r} failed on inputs its manifest describes ({what}); "
            "the folder's engines and manifest disagree — re-export it"
        )

    def close(self) -> None:
        self.session = None


def _first_line(e: Exception) -> str:
    """The first line of an ORT message, without terminal colour codes, cut to a readable length."""
    text = re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", str(e)).strip()
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
