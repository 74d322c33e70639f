"""Backends share one small interface: `run(feeds) -> outputs` for one engine call, `loop(static, state)` for a
request's whole sampler loop kept on the engine's device, and `close()`.

A step loop (see graphs.StepGraph on the export side) binds the request's conditioning once, takes only the step
scalars per step, and carries the sampler state between steps where the engine computes: after each step
    x ← x_next,  x0_prev2 ← x0_prev,  x0_prev ← x0
(on a device: pointer swaps between buffers, no copies to the host). `read()` is the one synchronisation, at the
end of the loop (and wherever a caller wants a preview). Loops of concurrent requests are independent.
"""

from pathlib import Path
from typing import Protocol

import numpy as np

from ..errors import BackendUnavailable
from ..manifest import Component

BACKENDS = ("onnxruntime", "tensorrt", "torch")
STATE = ("x", "x0_prev", "x0_prev2")  # the step engine's state inputs...
ROTATION = (("x0_prev2", "x0_prev"), ("x0_prev", "x0"), ("x", "x_next"))  # ...and what each becomes, in order
READ = ("x", "x0_prev")  # what a loop gives back: the current sample and the latest x0 prediction


class StepLoop(Protocol):
    def step(self, scalars: dict[str, np.ndarray]) -> None:
        """One sampler step with these per-step scalar inputs (0-d float32 arrays); asynchronous on a device."""

    def read(self) -> dict[str, np.ndarray]:
        """{"x", "x0_prev"}: the current sample and the latest x0 prediction as float32 host arrays, copies
        (waits for the device)."""

    def close(self) -> None:
        """Release the loop's buffers and its execution context (back to the backend's pool)."""

    def __enter__(self) -> "StepLoop": ...

    def __exit__(self, *exc) -> None: ...


class Backend(Protocol):
    name: str

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...

    def loop(self, static: dict[str, np.ndarray], state: dict[str, np.ndarray]) -> StepLoop:
        """A step loop over this (denoiser step) engine: `static` are the inputs fixed for the request (the
        conditioning, guidance), `state` the initial x, x0_prev, x0_prev2."""

    def close(self) -> None: ...


class HostLoop:
    """A step loop through `run`, the state carried in host memory: for backends without device binding, and the
    reference the device loops are tested against."""

    def __init__(self, backend: Backend, static: dict[str, np.ndarray], state: dict[str, np.ndarray]):
        self.backend, self.feeds = backend, {**static, **{k: state[k] for k in STATE}}

    def step(self, scalars: dict[str, np.ndarray]) -> None:
        out = self.backend.run({**self.feeds, **scalars})
        # the sampler state stays fp32 on the host whatever the engine's output dtype
        self.feeds["x0_prev2"] = self.feeds["x0_prev"]
        self.feeds["x0_prev"] = out["x0"].astype(np.float32, copy=False)
        self.feeds["x"] = out["x_next"].astype(np.float32, copy=False)

    def read(self) -> dict[str, np.ndarray]:
        return {k: self.feeds[k].copy() for k in READ}

    def close(self) -> None:
        self.feeds = {}

    def __enter__(self) -> "HostLoop":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_backend(name: str, path: Path, component: Component, threads: int | None = None) -> Backend:
    if name not in BACKENDS:
        raise BackendUnavailable(f"unknown backend {name!r}; available here: {', '.join(BACKENDS)}")
    if component.backend != name:
        raise BackendUnavailable(
            f"{path.name!r} was exported for the {component.backend!r} backend, not {name!r}; "
            f"use --backend {component.backend} or re-export for {name}"
        )
    if name == "tensorrt":
        from .trt import TrtBackend

        return TrtBackend(path, component, threads=threads)
    if name == "torch":
        from .torch_aoti import TorchBackend

        return TorchBackend(path, component, threads=threads)
    from .ort import OrtBackend

    return OrtBackend(path, component, threads=threads)
