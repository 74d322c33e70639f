"""torch backend: runs AOTInductor packages (.pt2) written by `dit-export --engine aoti`.

torch is an optional extra here (`pip install 'ditrt[torch]'`), imported when this backend opens. A package is
compiled machine code for one device kind, GPU architecture (or CPU instruction set) and torch version: its
manifest Target says which, and anything else is refused before loading. The dit ops inside a CUDA package are C++
torch ops whose library the folder ships (Target.libraries), loaded first.

Step loops keep every tensor on the device. On CUDA each loop runs on a context from a bounded pool (its own
stream, static buffers and CUDA graphs per input-shape signature): the step — the package call and the state
copies x0_prev2 ← x0_prev, x0_prev ← x0, x ← x_next — is captured once as a CUDA graph and replayed, so a step is
one small host-to-device copy of the scalars and one graph launch. The package is loaded single-threaded (its
own locking would synchronise, which capture forbids), so direct calls and captures take one lock; replays of
captured graphs need none.
"""

import queue
import threading
import warnings
from pathlib import Path

import numpy as np

from ..errors import BackendUnavailable, ManifestError
from ..manifest import Component, Target
from . import READ
from .ort import check_outputs

CONTEXTS = 2  # concurrent step loops per engine on a GPU; more requests wait for one
GRAPHS = (
    4  # captured steps kept per context, one per input-shape signature (batch size, CFG on/off, text length)
)


def _import_torch():
    try:
        import torch
    except ImportError:
        raise BackendUnavailable(
            "the torch backend needs PyTorch: pip install 'ditrt[torch]' (the version the engines were "
            "compiled with), or use --backend onnxruntime with an ONNX engine folder"
        ) from None
    return torch


def check_target(target: Target, torch, name: str) -> None:
    """A package runs only where it was compiled: refuse another torch, device kind or architecture."""
    if target.torch != torch.__version__:
        raise BackendUnavailable(
            f"{name!r} was compiled with torch {target.torch}, this is torch {torch.__version__}; "
            "AOTInductor packages run only with the torch that built them: re-export the folder here"
        )
    if target.device == "cuda":
        if not torch.cuda.is_available():
            raise BackendUnavailable(
                f"{name!r} was compiled for a CUDA GPU ({target.arch}) and none is visible"
            )
        major, minor = torch.cuda.get_device_capability()
        if f"sm_{major}{minor}" != target.arch:
            raise BackendUnavailable(
                f"{name!r} was compiled for {target.arch} GPUs, this one is sm_{major}{minor}; "
                "re-export the folder on this GPU"
            )
        return
    from torch._inductor.cpu_vec_isa import valid_vec_isa_list

    isas = [str(isa) for isa in valid_vec_isa_list()] or ["default"]
    if target.arch not in isas and target.arch != "default":
        raise BackendUnavailable(
            f"{name!r} was compiled for CPUs with {target.arch}; this CPU has {', '.join(isas)}: "
            "re-export the folder on this machine"
        )


class TorchBackend:
    name = "torch"

    def __init__(self, path: Path, component: Component, threads: int | None = None):
        self.torch = torch = _import_torch()
        if component.target is None or path.suffix != ".pt2":
            raise ManifestError(f"{path.name!r} is not an AOTInductor package; export with --engine aoti")
        target = component.target
        check_target(target, torch, path.name)
        root = path.parents[len(Path(component.file).parts) - 1]  # the engine folder
        for lib in target.libraries:  # checked at manifest load to lie inside the folder, hashed
            try:
                torch.ops.load_library(str(root / lib))
            except OSError as e:
                raise BackendUnavailable(f"cannot load the op library {lib!r}: {_first_line(e)}") from None
        if threads:
            torch.set_num_threads(threads)
        self.device = torch.device(target.device)
        self.cuda = target.device == "cuda"
        from torch._inductor.package import load_package

        try:
            # CPU: runners of the package's own pool run concurrent calls; CUDA: see the module docstring
            self.package = load_package(
                str(path), run_single_threaded=self.cuda, num_runners=1 if self.cuda else CONTEXTS
            )
        except Exception as e:
            raise ManifestError(f"torch cannot load {str(path)!r}: {_first_line(e)}") from None
        self.component, self.lock = component, threading.Lock()
        self.output_names = [s.name for s in component.outputs]
        self.dtypes = {s.name: s.dtype for s in component.inputs}
        self.pool: queue.Queue = queue.Queue()
        for _ in range(CONTEXTS if self.cuda else 0):
            self.pool.put(Context(self))

    def tensor(self, name: str, value: np.ndarray):
        """A feed as a tensor on the engine's device in its declared dtype (numpy casts first, as ORT's does;
        numpy has no bfloat16, so those go through float32)."""
        dtype = self.dtypes[name]
        a = np.ascontiguousarray(value, dtype=np.float32 if dtype == "bfloat16" else dtype)
        return self.torch.from_numpy(a).to(self.device, getattr(self.torch, dtype))

    def call(self, args: list) -> list:
        """One package call on device tensors, in the declared input order -> outputs in the declared order."""
        try:
            if self.cuda:
                with self.lock:
                    out = self.package(*args)
            else:
                out = self.package(*args)
        except Exception as e:  # the package's own runtime checks: the folder's engines and manifest disagree
            raise ManifestError(
                f"engine {self.component.file!r} failed on inputs its manifest describes ({_first_line(e)}); "
                "re-export the folder"
            ) from None
        return list(out) if isinstance(out, (list, tuple)) else [out]

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        with self.torch.inference_mode():
            args = [self.tensor(s.name, feeds[s.name]) for s in self.component.inputs]
            out = {n: _numpy(t) for n, t in zip(self.output_names, self.call(args))}
        check_outputs(self.component, feeds, out, self._disagree)
        return out

    def _disagree(self, what: str) -> ManifestError:
        return ManifestError(f"engine {self.component.file!r} {what}; re-export the folder")

    def loop(self, static: dict[str, np.ndarray], state: dict[str, np.ndarray]):
        if self.cuda:
            return GraphLoop(self, static, state)
        return TensorLoop(self, static, state)

    def close(self) -> None:
        self.package, self.pool = None, queue.Queue()


class TensorLoop:
    """A step loop with the state as tensors on the engine's device, swapped between steps (no copies)."""

    def __init__(self, backend: TorchBackend, static: dict[str, np.ndarray], state: dict[str, np.ndarray]):
        self.backend = backend
        with backend.torch.inference_mode():
            self.tensors = {k: backend.tensor(k, v) for k, v in {**static, **state}.items()}

    def step(self, scalars: dict[str, np.ndarray]) -> None:
        b = self.backend
        with b.torch.inference_mode():
            feeds = {**self.tensors, **{k: b.tensor(k, v) for k, v in scalars.items()}}
            x_next, x0 = b.call([feeds[s.name] for s in b.component.inputs])[:2]
        t = self.tensors
        t["x0_prev2"], t["x0_prev"], t["x"] = t["x0_prev"], x0, x_next

    def read(self) -> dict[str, np.ndarray]:
        return {k: _numpy(self.tensors[k]) for k in READ}

    def close(self) -> None:
        self.tensors = {}

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class Captured:
    """A context's step for one input-shape signature: every input in a fixed device buffer (the scalars as views
    of one block), and the step captured as a CUDA graph (None where capture failed: then called directly)."""

    def __init__(self, backend: TorchBackend, stream, shapes: dict[str, tuple], scalar_names: list[str]):
        torch, inputs = backend.torch, backend.component.inputs
        self.block = torch.zeros(len(scalar_names), dtype=torch.float32, device=backend.device)
        views = {k: self.block[i] for i, k in enumerate(scalar_names)}  # 0-d views: one copy sets them all
        self.buffers = {
            s.name: views[s.name]
            if s.name in views
            else torch.zeros(shapes[s.name], dtype=getattr(torch, s.dtype), device=backend.device)
            for s in inputs
        }
        self.args, self.scalar_names, self.graph = [self.buffers[s.name] for s in inputs], scalar_names, None
        with torch.cuda.stream(stream):
            backend.call(self.args)  # warm-up: allocations and lazy initialisation happen outside the capture
            stream.synchronize()
        graph = torch.cuda.CUDAGraph()
        try:
            with backend.lock, torch.cuda.graph(graph, stream=stream, capture_error_mode="thread_local"):
                self.rotate(*backend.package(*self.args)[:2])
            self.graph = graph
        except Exception as e:  # e.g. an op that synchronises; the step is then called directly
            warnings.warn(
                f"CUDA graph capture failed, steps run without it: {_first_line(e)}", RuntimeWarning
            )

    def rotate(self, x_next, x0) -> None:
        b = self.buffers
        b["x0_prev2"].copy_(b["x0_prev"])
        b["x0_prev"].copy_(x0)
        b["x"].copy_(x_next)

    def step(self, backend: TorchBackend) -> None:
        if self.graph is not None:
            self.graph.replay()
        else:
            self.rotate(*backend.call(self.args)[:2])


class Context:
    """One concurrent step loop's share of the GPU: a stream and its captured steps by input-shape signature."""

    def __init__(self, backend: TorchBackend):
        self.stream = backend.torch.cuda.Stream(backend.device)
        self.captured: dict[tuple, Captured] = {}


class GraphLoop:
    """A step loop on a pooled context: inputs copied into its buffers once, then per step one scalar copy and
    one graph replay on its stream; read() is the only synchronisation."""

    def __init__(self, backend: TorchBackend, static: dict[str, np.ndarray], state: dict[str, np.ndarray]):
        self.backend, torch = backend, backend.torch
        feeds = {k: np.asarray(v) for k, v in {**static, **state}.items()}
        self.scalar_names = [s.name for s in backend.component.inputs if s.name not in feeds]
        self.context = backend.pool.get()  # waits while every context runs a loop
        try:
            signature = tuple(sorted((k, v.shape) for k, v in feeds.items()))
            with torch.inference_mode():
                cache = self.context.captured
                captured = cache.pop(signature, None)  # re-inserted last: the cache is in order of use
                if captured is None:
                    if (
                        len(cache) >= GRAPHS
                    ):  # the least recently used shapes give their graph and buffers back
                        del cache[next(iter(cache))]
                    captured = Captured(backend, self.context.stream, dict(signature), self.scalar_names)
                cache[signature] = captured
                with torch.cuda.stream(self.context.stream):
                    for k, v in feeds.items():
                        captured.buffers[k].copy_(torch.from_numpy(np.ascontiguousarray(v)))
            self.captured = captured
        except BaseException:
            backend.pool.put(self.context)
            raise

    def step(self, scalars: dict[str, np.ndarray]) -> None:
        torch = self.backend.torch
        values = torch.tensor([float(scalars[k]) for k in self.scalar_names], dtype=torch.float32)
        with torch.inference_mode(), torch.cuda.stream(self.context.stream):
            # pinned by the caching host allocator, which keeps the block until this copy has run
            self.captured.block.copy_(values.pin_memory(), non_blocking=True)
            self.captured.step(self.backend)

    def read(self) -> dict[str, np.ndarray]:
        self.context.stream.synchronize()
        return {k: _numpy(self.captured.buffers[k]) for k in READ}

    def close(self) -> None:
        if self.context is not None:
            self.backend.pool.put(self.context)
            self.context = None

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _numpy(t) -> np.ndarray:
    """A tensor as a host array; bfloat16 (which numpy lacks) as float32."""
    return (t.float() if str(t.dtype) == "torch.bfloat16" else t).cpu().numpy()


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return (text.splitlines()[0] if text else type(e).__name__)[:300]
