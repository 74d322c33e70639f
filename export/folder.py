"""Atomic engine-folder writer: everything goes into a hidden temp folder that is renamed when complete."""

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from ditrt.runtime.errors import InputError
from ditrt.runtime.manifest import MANIFEST_NAME, FileEntry, Manifest, sha256_file


@contextmanager
def staging_folder(out: Path, force: bool = False) -> Iterator[Path]:
    """Yield an empty temp folder beside `out`; on success it replaces `out`, on failure it is removed."""
    out = Path(out)
    if out.exists() and not force:
        raise InputError(f"output folder {str(out)!r} already exists; pass --force to replace it")
    if not out.parent.is_dir():
        raise InputError(f"parent folder {str(out.parent)!r} does not exist; create it first")
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        if out.exists():  # --force: swap in the new folder, then drop the old one
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, old / out.name)
            os.replace(tmp, out)
            shutil.rmtree(old)
        else:
            os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def file_entries(folder: Path) -> dict[str, FileEntry]:
    """sha256 and size of every file under folder (except the manifest), keyed by POSIX relative path."""
    return {p.relative_to(folder).as_posix(): FileEntry(sha256_file(p), p.stat().st_size)
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != MANIFEST_NAME}


def write_manifest(folder: Path, manifest: Manifest) -> None:
    (folder / MANIFEST_NAME).write_text(json.dumps(manifest.to_dict(), indent=2) + "\n")


def export_builtin(name: str, out: str | os.PathLike, lowering_name: str = "portable", opset: int | None = None,
                   force: bool = False, command: str = "") -> Manifest:
    """Export built-in model `name` as an engine folder at `out` (atomically); return its manifest."""
    import datetime
    import platform

    import onnx
    import torch

    import ditrt.runtime as rt
    from ditrt.runtime.manifest import Component, Latent, Scheduler, TensorSpec

    from .graphs import ClassStepGraph, class_step_io
    from .onnx_export import DEFAULT_OPSET, LOWERINGS, export_onnx
    from .presets import get_builtin, load_builtin, training_info

    b = get_builtin(name)
    if lowering_name not in LOWERINGS:
        raise InputError(f"unknown lowering {lowering_name!r}; choose from {', '.join(LOWERINGS)}")
    model = load_builtin(b)
    graph = ClassStepGraph(model)
    inputs, outputs = class_step_io(model)
    with staging_folder(Path(out), force) as tmp:
        (tmp / "denoiser").mkdir()
        export_onnx(graph, inputs, outputs, tmp / "denoiser" / "model.onnx", lowering_name, opset or DEFAULT_OPSET)
        specs = lambda ss: [TensorSpec(s.name, s.dtype, list(s.shape)) for s in ss]  # noqa: E731
        cfg = b.config
        manifest = Manifest(
            model=b.name, family="dit", conditioning="class", class_names=list(b.class_names), random_weights=False,
            latent=Latent(cfg.in_channels, cfg.sample_size, cfg.sample_size),
            scheduler=Scheduler(b.scheduler, cfg.prediction, shift=b.shift, default_steps=b.default_steps,
                                default_guidance=b.default_guidance),
            components={"denoiser": Component("denoiser/model.onnx", "onnxruntime" if lowering_name == "portable"
                                              else "tensorrt", "fp32", lowering_name, specs(inputs), specs(outputs))},
            files=file_entries(tmp),
            export={"command": command, "created": datetime.datetime.now(datetime.timezone.utc).isoformat(),
                    "training": training_info(b), "versions": {
                        "ditrt": rt.__version__, "torch": torch.__version__, "onnx": onnx.__version__,
                        "opset": opset or DEFAULT_OPSET, "python": platform.python_version()}})
        write_manifest(tmp, manifest)
    return manifest
