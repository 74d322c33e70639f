"""TensorRT backend: runs an engine (.plan) written by `dit-export --engine tensorrt`.

Device memory and the stream come from cuda-python (no torch). Our custom ops are compiled into the engine as
ahead-of-time plugins, so no plugin library or Python plugin code has to be loaded here.
"""

import threading
from pathlib import Path

import numpy as np

from ..errors import BackendUnavailable, InputError, ManifestError
from ..manifest import Component

NUMPY = {"float32": np.float32, "float16": np.float16, "int64": np.int64, "int32": np.int32}


def _imports():
    try:
        import tensorrt as trt
    except ImportError:
        raise BackendUnavailable(
            "TensorRT is not installed; `pip install tensorrt cuda-python` on a machine with "
            "an NVIDIA GPU, or use --backend onnxruntime with a portable engine folder"
        ) from None
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        try:
            from cuda import cudart  # cuda-python before 12.8
        except ImportError:
            raise BackendUnavailable("cuda-python is not installed; `pip install cuda-python`") from None
    return trt, cudart


def _logger(trt):
    class Logger(trt.ILogger):  # keeps TensorRT's errors for our one-line messages instead of printing them
        def __init__(self):
            trt.ILogger.__init__(self)
            self.errors = []

        def log(self, severity, msg):
            if severity in (trt.ILogger.Severity.INTERNAL_ERROR, trt.ILogger.Severity.ERROR):
                self.errors.append(str(msg).strip())

    return Logger()


class TrtBackend:
    name = "tensorrt"

    def __init__(self, path: Path, component: Component, threads: int | None = None):
        trt, self.cudart = _imports()
        self.buffers, self.stream, self.lock = (
            {},
            None,
            threading.Lock(),
        )  # buffers: name -> (device ptr, bytes)
        if path.suffix != ".plan":
            raise BackendUnavailable(
                f"{path.name!r} is an ONNX graph with TensorRT plugin nodes, not an engine; "
                "export the folder with `dit-export --engine tensorrt`"
            )
        err, count = self.cudart.cudaGetDeviceCount()
        if err != self.cudart.cudaError_t.cudaSuccess or count == 0:
            raise BackendUnavailable(
                "no CUDA GPU is visible, which the tensorrt backend needs; use --backend "
                "onnxruntime with a portable engine folder"
            )
        unsupported = sorted({s.dtype for s in component.inputs + component.outputs} - set(NUMPY))
        if unsupported:
            raise BackendUnavailable(
                f"{path.name!r} has {', '.join(unsupported)} inputs/outputs, which this backend "
                "cannot exchange with numpy; export with another precision"
            )
        self.logger = _logger(trt)
        self.runtime = trt.Runtime(self.logger)  # kept: the engine must not outlive its runtime
        self.engine = self.runtime.deserialize_cuda_engine(path.read_bytes())
        if self.engine is None:
            why = self.logger.errors[-1] if self.logger.errors else "no reason given"
            raise BackendUnavailable(
                f"TensorRT cannot load {path.name!r} ({why}); an engine runs only on the GPU "
                "model and TensorRT version that built it: re-export it on this machine"
            )
        self._check_names(path, component, trt)
        self.inputs, self.outputs = component.inputs, component.outputs
        self.context = self.engine.create_execution_context()
        self.stream = self._cuda(self.cudart.cudaStreamCreate())

    def _check_names(self, path: Path, component: Component, trt) -> None:
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        inputs = {n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT}
        if inputs != {s.name for s in component.inputs}:
            raise ManifestError(
                f"{path.name!r} has inputs {sorted(inputs)}, the manifest declares "
                f"{sorted(s.name for s in component.inputs)}"
            )
        missing = sorted({s.name for s in component.outputs} - (set(names) - inputs))
        if missing:
            raise ManifestError(f"{path.name!r} has no output(s) {missing} that the manifest declares")

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        h2d, d2h = (
            self.cudart.cudaMemcpyKind.cudaMemcpyHostToDevice,
            self.cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost,
        )
        with self.lock:  # one execution context: calls take turns
            host = [self._input(s, feeds) for s in self.inputs]  # kept alive until the stream is synchronised
            for s, a in zip(self.inputs, host):
                ptr = self._buffer(s.name, a.nbytes)
                self._cuda(self.cudart.cudaMemcpyAsync(ptr, a.ctypes.data, a.nbytes, h2d, self.stream))
            out = {}
            for s in self.outputs:
                out[s.name] = np.empty(tuple(self.context.get_tensor_shape(s.name)), dtype=NUMPY[s.dtype])
                self._buffer(s.name, out[s.name].nbytes)
            if not self.context.execute_async_v3(int(self.stream)):
                why = self.logger.errors[-1] if self.logger.errors else "no reason given"
                raise BackendUnavailable(f"TensorRT failed to run the engine ({why})")
            for name, a in out.items():
                self._cuda(
                    self.cudart.cudaMemcpyAsync(
                        a.ctypes.data, self.buffers[name][0], a.nbytes, d2h, self.stream
                    )
                )
            self._cuda(self.cudart.cudaStreamSynchronize(self.stream))
        return out

    def _input(self, spec, feeds: dict[str, np.ndarray]) -> np.ndarray:
        if spec.name not in feeds:
            raise InputError(
                f"input {spec.name!r} is missing; the engine needs {[s.name for s in self.inputs]}"
            )
        a = np.ascontiguousarray(
            feeds[spec.name], dtype=NUMPY[spec.dtype]
        )  # as the onnxruntime backend casts
        if not self.context.set_input_shape(spec.name, a.shape):
            lo, _, hi = self.engine.get_tensor_profile_shape(spec.name, 0)
            raise InputError(
                f"input {spec.name!r} has shape {a.shape}; this engine was built for {tuple(lo)} up "
                f"to {tuple(hi)} (the batch size, usually): re-export with a larger profile"
            )
        return a

    def _buffer(self, name: str, nbytes: int) -> int:
        """Device buffer for a tensor, grown when needed and reused across calls; bound to the context."""
        ptr, size = self.buffers.get(name, (0, 0))
        if size < nbytes:
            if ptr:
                self._cuda(self.cudart.cudaFree(ptr))
            ptr, size = self._cuda(self.cudart.cudaMalloc(max(nbytes, 1))), max(nbytes, 1)
            self.buffers[name] = (ptr, size)
        self.context.set_tensor_address(name, int(ptr))
        return ptr

    def _cuda(self, result):
        err, *value = result
        if err != self.cudart.cudaError_t.cudaSuccess:
            raise BackendUnavailable(f"CUDA call failed: {getattr(err, 'name', err)}")
        return value[0] if value else None

    def close(self) -> None:
        for ptr, _ in self.buffers.values():
            self.cudart.cudaFree(ptr)
        if self.stream is not None:
            self.cudart.cudaStreamDestroy(self.stream)
        self.buffers, self.stream, self.context, self.engine, self.runtime = {}, None, None, None, None
