"""Backends share one small interface: `inputs`/`outputs` specs, `run(feeds) -> outputs`, `close()`."""

from pathlib import Path
from typing import Protocol

import numpy as np

from ..errors import BackendUnavailable
from ..manifest import Component


class Backend(Protocol):
    name: str

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...

    def close(self) -> None: ...


BACKENDS = ("onnxruntime", "tensorrt")


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
    from .ort import OrtBackend

    return OrtBackend(path, component, threads=threads)
