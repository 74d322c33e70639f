"""ONNX Runtime backend: CPU by default; CUDA when onnxruntime-gpu is installed and a GPU is visible."""

from pathlib import Path

import numpy as np

from ..errors import BackendUnavailable, ManifestError
from ..manifest import Component


class OrtBackend:
    name = "onnxruntime"

    def __init__(self, path: Path, component: Component, threads: int | None = None,
                 providers: list[str] | None = None):
        try:
            import onnxruntime as ort
        except ImportError:
            raise BackendUnavailable("onnxruntime is not installed; `pip install onnxruntime`") from None
        if component.lowering != "portable":
            raise BackendUnavailable(f"{path.name!r} contains TensorRT plugin nodes (lowering "
                                     f"{component.lowering!r}), which ONNX Runtime cannot run; "
                                     "re-export with the portable lowering")
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        if threads:
            opts.intra_op_num_threads = threads
        available = ort.get_available_providers()
        providers = providers or [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
        try:
            self.session = ort.InferenceSession(str(path), opts, providers=providers)
        except Exception as e:  # ORT raises its own types for corrupt or truncated models
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ManifestError(f"ONNX Runtime cannot load {str(path)!r}: {first}") from None
        self.providers = self.session.get_providers()
        names = {i.name for i in self.session.get_inputs()}
        declared = {s.name for s in component.inputs}
        if names != declared:
            raise ManifestError(f"{path.name!r} has inputs {sorted(names)}, the manifest declares {sorted(declared)}")
        self.output_names = [s.name for s in component.outputs]
        missing = sorted(set(self.output_names) - {o.name for o in self.session.get_outputs()})
        if missing:
            raise ManifestError(f"{path.name!r} has no output(s) {missing} that the manifest declares")

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        # InferenceSession.run is thread-safe, so one session serves concurrent requests.
        return dict(zip(self.output_names, self.session.run(self.output_names, feeds)))

    def close(self) -> None:
        self.session = None
