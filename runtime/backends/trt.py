"""TensorRT backend: runs an engine (.plan) written by `dit-export --engine tensorrt`.

Device memory, streams, events and CUDA graphs come from cuda-python (no torch). Our custom ops are compiled into
the engine as ahead-of-time plugins, so no plugin library or Python plugin code has to be loaded here.

One deserialized engine serves concurrent requests through a bounded pool of execution contexts (`Slot`s, each with
its own CUDA stream and device buffers; TensorRT 10 lets contexts share an optimization profile). A request's
sampler loop (`TrtLoop`) binds its inputs once and keeps the state on the device: a step is one host-to-device
copy of the step scalars, then the engine and the copies that carry the state (see `carry`), replayed as one CUDA
graph once captured.
"""

import ctypes
import threading
import warnings
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from ..errors import BackendUnavailable, InputError, ManifestError
from ..manifest import Component
from . import READ, ROTATION, STATE
from .ort import check_outputs

NUMPY = {"float32": np.float32, "float16": np.float16, "int64": np.int64, "int32": np.int32}
CONTEXTS = 2  # execution contexts per engine: concurrent calls and loops beyond this wait for one
ALIGN = 256  # TensorRT takes tensor addresses with at least 256-byte alignment (setTensorAddress)
# pinned scalar blocks per context: the host fills a step's block while the copies of earlier steps wait
HOST_BLOCKS = 3
# a loop's five state tensors, each in its own buffer for the whole loop
STATE_BUFFERS = (*STATE, "x_next", "x0")


def carry(address: dict[str, int]) -> list[tuple[int, int]]:
    """The device-to-device copies (destination, source) that follow each engine call, in this order, and carry
    the state to the next step: x0_prev2 ← x0_prev before x0_prev ← x0, then x ← x_next (ROTATION), between the
    five state buffers at `address` (so no input aliases an output in the engine call).

    Why copies rather than pointer swaps: a CUDA graph bakes in the tensor addresses bound when it was captured.
    Swapping buffers would take a graph per buffer arrangement (6: x alternates between two buffers, x0 rotates
    among three) captured from one execution context, which TensorRT does not document as safe; its documented
    pattern (trtexec's too) is fixed shapes and addresses, one warm-up call, capture, replay. So every tensor keeps
    its buffer and the three latent-sized copies go into the one graph: microseconds next to the model."""
    return [(address[dst], address[src]) for dst, src in ROTATION]


def scalar_layout(names: list[str]) -> tuple[dict[str, int], int]:
    """The byte offset of each 0-d float32 step scalar in one block, and the block's size: the block goes to the
    device in one copy a step, and each scalar's address (block + offset) is one TensorRT accepts."""
    return {name: i * ALIGN for i, name in enumerate(names)}, max(len(names), 1) * ALIGN


class Pool:
    """At most `size` items, each made by `make` on first need; take() blocks while all of them are out."""

    def __init__(self, size: int, make):
        self.size, self.make, self.free, self.made = size, make, [], 0
        self.cond = threading.Condition()

    def take(self):
        with self.cond:
            self.cond.wait_for(lambda: self.free or self.made < self.size)
            if self.free:
                return self.free.pop()
            self.made += 1
        try:
            return self.make()  # outside the lock: an execution context takes a while to make
        except BaseException:
            with self.cond:
                self.made -= 1
                self.cond.notify()
            raise

    def give(self, item) -> None:
        with self.cond:
            self.free.append(item)
            self.cond.notify()

    @contextmanager
    def lease(self):
        item = self.take()
        try:
            yield item
        finally:
            self.give(item)

    def drain(self) -> list:
        """The items given back so far, taken out for good (their owner closes them)."""
        with self.cond:
            items, self.free, self.made = self.free, [], 0
        return items


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

    def __init__(
        self, path: Path, component: Component, threads: int | None = None, contexts: int = CONTEXTS
    ):
        trt, self.cudart = _imports()
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
            raise BackendUnavailable(
                f"TensorRT cannot load {path.name!r} ({self.why()}); an engine runs only on the GPU "
                "model and TensorRT version that built it: re-export it on this machine"
            )
        self._check_names(path, component, trt)
        self.component, self.inputs, self.outputs = component, component.inputs, component.outputs
        self.graphs = True  # until TensorRT cannot capture this engine
        self.h2d = self.cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
        self.d2h = self.cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        self.d2d = self.cudart.cudaMemcpyKind.cudaMemcpyDeviceToDevice
        self.pool = Pool(contexts, lambda: Slot(self))

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
        cudart = self.cudart
        with self.pool.lease() as slot:
            host = slot.shapes(feeds)  # kept alive until the stream is synchronised
            for name, a in host.items():
                ptr = slot.bind(name, a.nbytes)
                self._cuda(cudart.cudaMemcpyAsync(ptr, a.ctypes.data, a.nbytes, self.h2d, slot.stream))
            out = {}
            for s in self.outputs:
                out[s.name] = np.empty(tuple(slot.context.get_tensor_shape(s.name)), dtype=NUMPY[s.dtype])
                slot.bind(s.name, out[s.name].nbytes)
            slot.execute()
            for name, a in out.items():
                ptr = slot.buffers[name][0]
                self._cuda(cudart.cudaMemcpyAsync(a.ctypes.data, ptr, a.nbytes, self.d2h, slot.stream))
            self._cuda(cudart.cudaStreamSynchronize(slot.stream))
        check_outputs(self.component, feeds, out, self._disagree)
        return out

    def loop(self, static: dict[str, np.ndarray], state: dict[str, np.ndarray]) -> "TrtLoop":
        return TrtLoop(self, static, state)

    def _input(self, context, spec, feeds: dict[str, np.ndarray]) -> np.ndarray:
        if spec.name not in feeds:
            raise InputError(
                f"input {spec.name!r} is missing; the engine needs {[s.name for s in self.inputs]}"
            )
        # cast as the onnxruntime backend casts
        a = np.ascontiguousarray(feeds[spec.name], dtype=NUMPY[spec.dtype])
        if not context.set_input_shape(spec.name, a.shape):
            lo, _, hi = self.engine.get_tensor_profile_shape(spec.name, 0)
            raise InputError(
                f"input {spec.name!r} has shape {a.shape}; this engine was built for {tuple(lo)} up "
                f"to {tuple(hi)} (the batch size, usually): re-export with a larger profile"
            )
        return a

    def why(self) -> str:
        return self.logger.errors[-1] if self.logger.errors else "no reason given"

    def _disagree(self, what: str) -> ManifestError:
        return ManifestError(
            f"engine {self.component.file!r} computes what its manifest does not describe ({what}); "
            "the folder's engines and manifest disagree — re-export it"
        )

    def _cuda(self, result):
        err, *value = result
        if err != self.cudart.cudaError_t.cudaSuccess:
            raise BackendUnavailable(f"CUDA call failed: {getattr(err, 'name', err)}")
        return value[0] if value else None

    def close(self) -> None:
        """Frees every context given back; call it after the loops are closed."""
        for slot in self.pool.drain():
            slot.close()
        self.engine, self.runtime = None, None


class Slot:
    """One execution context of the pool: its stream, its device buffers by tensor name (grown when needed, kept
    for later requests), a device block for the step scalars with pinned host blocks to fill it from, and the CUDA
    graph of a loop step, captured for the shape signature last set (the buffers being fixed)."""

    def __init__(self, backend: TrtBackend):
        b, cudart = backend, backend.cudart
        self.b, self.cudart, self.buffers, self.graph, self.sig, self.warm = b, cudart, {}, None, None, False
        self.context = b.engine.create_execution_context()
        if self.context is None:
            raise BackendUnavailable(f"TensorRT cannot create an execution context ({b.why()})")
        # not blocking on the legacy default stream, whose use by other code would break a capture on this one
        self.stream = b._cuda(cudart.cudaStreamCreateWithFlags(cudart.cudaStreamNonBlocking))
        self.block = scalar_layout([s.name for s in b.inputs if not s.shape])[1]  # room for every 0-d input
        self.scalars = b._cuda(cudart.cudaMalloc(self.block))
        self.host_ptr = b._cuda(cudart.cudaMallocHost(HOST_BLOCKS * self.block))
        pinned = (ctypes.c_float * (HOST_BLOCKS * self.block // 4)).from_address(self.host_ptr)
        self.pinned = np.ctypeslib.as_array(pinned).reshape(HOST_BLOCKS, -1)  # a view: freed with the slot
        flags = cudart.cudaEventDisableTiming
        self.events = [b._cuda(cudart.cudaEventCreateWithFlags(flags)) for _ in range(HOST_BLOCKS)]

    def shapes(self, feeds: dict[str, np.ndarray], scalars: tuple = ()) -> dict[str, np.ndarray]:
        """Sets every input's shape from `feeds` and returns them cast to the declared dtypes. A graph holds to the
        shapes and scalar addresses it was captured with, and TensorRT wants the engine run once after a shape
        change before a capture: a new signature drops the graph."""
        host = {s.name: self.b._input(self.context, s, feeds) for s in self.b.inputs}
        sig = (tuple((name, a.shape) for name, a in host.items()), scalars)
        if sig != self.sig:
            self.drop_graph()
            self.sig = sig
        return host

    def bind(self, name: str, nbytes: int, ptr: int | None = None) -> int:
        """Binds tensor `name` to `ptr`, or to its own buffer of at least `nbytes`; returns the address."""
        if ptr is None:
            ptr, size = self.buffers.get(name, (0, 0))
            if size < nbytes:
                if ptr:
                    self.b._cuda(self.cudart.cudaFree(ptr))
                self.drop_graph()  # it holds the old address
                ptr, size = self.b._cuda(self.cudart.cudaMalloc(max(nbytes, 1))), max(nbytes, 1)
                self.buffers[name] = (ptr, size)
        if not self.context.set_tensor_address(name, int(ptr)):
            raise BackendUnavailable(f"TensorRT refused the address of {name!r} ({self.b.why()})")
        return ptr

    def execute(self) -> None:
        if not self.context.execute_async_v3(int(self.stream)):
            raise BackendUnavailable(f"TensorRT failed to run the engine ({self.b.why()})")
        self.warm = True

    def capture(self, work):
        """What `work()` enqueues on the stream (it returns whether all of it went in) as an instantiated CUDA
        graph, or None where TensorRT cannot capture this engine (e.g. data-dependent shapes, loops or
        conditionals, synchronising plugins): one warning, and the engine runs directly from then on. As trtexec
        does, a refused capture is still ended and its error cleared."""
        cudart, success = self.cudart, self.cudart.cudaError_t.cudaSuccess
        mode = cudart.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal
        self.b._cuda(cudart.cudaStreamBeginCapture(self.stream, mode))
        ok = work()
        err, graph = cudart.cudaStreamEndCapture(self.stream)
        if err == success:
            if ok:
                err, exe = cudart.cudaGraphInstantiate(graph, 0)
            cudart.cudaGraphDestroy(graph)
            if ok and err == success:
                return exe
        cudart.cudaGetLastError()
        self.b.graphs = False
        why = self.b.why() if not ok else getattr(err, "name", err)
        warnings.warn(
            f"TensorRT cannot capture the engine as a CUDA graph ({why}); steps run without graphs",
            stacklevel=3,
        )
        return None

    def drop_graph(self) -> None:
        if self.graph is not None:
            self.cudart.cudaGraphExecDestroy(self.graph)
        self.graph, self.warm = None, False

    def close(self) -> None:
        cudart = self.cudart
        cudart.cudaStreamSynchronize(self.stream)
        self.drop_graph()
        self.context = None  # before the memory it was bound to
        for ptr, _ in self.buffers.values():
            cudart.cudaFree(ptr)
        for event in self.events:
            cudart.cudaEventDestroy(event)
        cudart.cudaFree(self.scalars)
        cudart.cudaFreeHost(self.host_ptr)
        cudart.cudaStreamDestroy(self.stream)
        self.buffers, self.pinned = {}, None


class TrtLoop:
    """A request's sampler loop on one execution context of the pool (taken here, blocking while all are busy).

    Set up once: the input shapes, every input bound to a buffer of the context, the static inputs (conditioning,
    guidance) and the initial state copied there, the step scalars bound into the context's scalar block. A step:
    one host-to-device copy of the scalars, then the engine and the `carry` copies (one graph launch once
    captured); nothing waits for the device until read()."""

    def __init__(self, backend: TrtBackend, static: dict[str, np.ndarray], state: dict[str, np.ndarray]):
        self.b, self.k, self.slot = backend, 0, backend.pool.take()
        try:
            self._start(static, state)
        except BaseException:
            self.close()
            raise

    def _start(self, static: dict[str, np.ndarray], state: dict[str, np.ndarray]) -> None:
        b, slot, cudart = self.b, self.slot, self.b.cudart
        # the step scalars: the 0-d float32 inputs not given here (a missing tensor input fails in shapes())
        names = [s.name for s in b.inputs if (s.dtype, s.shape) == ("float32", []) and s.name not in static]
        self.offsets, self.nbytes = scalar_layout(names)
        zeros = dict.fromkeys(names, np.zeros((), np.float32))
        # the host arrays stay alive until the stream is synchronised (close)
        self.host = slot.shapes({**static, **state, **zeros}, tuple(names))
        self.shape, self.state_bytes = self.host["x"].shape, self.host["x"].nbytes
        dtypes = {s.name: s.dtype for s in b.outputs}
        for name in ("x_next", "x0"):
            got = tuple(slot.context.get_tensor_shape(name))
            if (dtypes.get(name), got) != ("float32", self.shape):
                raise ManifestError(
                    f"output {name!r} is {dtypes.get(name)} {list(got)}; the step loop carries float32 "
                    f"{list(self.shape)} (the shape of x) from step to step: re-export the folder"
                )
        self.address = {name: slot.bind(name, self.state_bytes) for name in STATE_BUFFERS}
        for name, a in self.host.items():
            if name in self.offsets:
                slot.bind(name, 4, slot.scalars + self.offsets[name])
                continue
            ptr = self.address[name] if name in STATE else slot.bind(name, a.nbytes)
            b._cuda(cudart.cudaMemcpyAsync(ptr, a.ctypes.data, a.nbytes, b.h2d, slot.stream))

    def step(self, scalars: dict[str, np.ndarray]) -> None:
        b, slot, cudart = self.b, self.slot, self.b.cudart
        missing = sorted(set(self.offsets) - set(scalars))
        if missing:
            raise InputError(f"step scalar(s) {missing} are missing")
        r, self.k = self.k % HOST_BLOCKS, self.k + 1
        b._cuda(cudart.cudaEventSynchronize(slot.events[r]))  # the copy that last read host block r is done
        for name, offset in self.offsets.items():
            slot.pinned[r, offset // 4] = scalars[name]
        src = slot.host_ptr + r * slot.block
        b._cuda(cudart.cudaMemcpyAsync(slot.scalars, src, self.nbytes, b.h2d, slot.stream))
        b._cuda(cudart.cudaEventRecord(slot.events[r], slot.stream))
        # TensorRT: run the engine once after a shape change (warm), then capture
        if slot.graph is None and slot.warm and b.graphs:
            slot.graph = slot.capture(self._advance)
        if slot.graph is not None:
            b._cuda(cudart.cudaGraphLaunch(slot.graph, slot.stream))
        elif not self._advance():
            raise BackendUnavailable(f"TensorRT failed to run the engine ({b.why()})")
        slot.warm = True

    def _advance(self) -> bool:
        """Enqueues the engine call and the `carry` copies; False where one of them did not go in."""
        b, stream = self.b, self.slot.stream
        if not self.slot.context.execute_async_v3(int(stream)):
            return False
        for dst, src in carry(self.address):
            (err,) = b.cudart.cudaMemcpyAsync(dst, src, self.state_bytes, b.d2d, stream)
            if err != b.cudart.cudaError_t.cudaSuccess:
                return False
        return True

    def read(self) -> dict[str, np.ndarray]:
        slot, cudart = self.slot, self.b.cudart
        out = {name: np.empty(self.shape, np.float32) for name in READ}
        for name, a in out.items():
            ptr = self.address[name]
            self.b._cuda(cudart.cudaMemcpyAsync(a.ctypes.data, ptr, a.nbytes, self.b.d2h, slot.stream))
        self.b._cuda(cudart.cudaStreamSynchronize(slot.stream))
        return out

    def close(self) -> None:
        """Gives the context back to the pool once its stream is idle (nothing in flight reads this loop's host
        memory or writes its buffers); its buffers and graph stay with it for the next request."""
        if self.slot is not None:
            self.b.cudart.cudaStreamSynchronize(self.slot.stream)
            self.b.pool.give(self.slot)
            self.slot, self.host = None, None

    def __enter__(self) -> "TrtLoop":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
