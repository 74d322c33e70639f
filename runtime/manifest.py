"""The engine-folder contract: `manifest.json` <-> dataclasses, strict in both directions.

The runtime trusts nothing in a folder it did not check: unknown schema versions and keys are refused,
every file path must stay inside the folder, and every file's size and sha256 must match.
"""

import hashlib
import json
import os
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from .errors import ManifestError

SCHEMA_VERSION = 2
MANIFEST_NAME = "manifest.json"
DTYPES = ("float32", "float16", "bfloat16", "int64", "int32")


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str
    shape: list  # ints for fixed axes, strings ("B") for symbolic ones; [] for a scalar


@dataclass(frozen=True)
class Component:
    file: str  # relative to the folder
    backend: str  # "onnxruntime" | "tensorrt"
    precision: str  # "fp32" | "fp16" | "bf16": the narrowest dtype it computes in; its I/O is as the specs say
    lowering: str  # custom ops: "portable" (standard ONNX) | "plugin" (TensorRT plugin nodes)
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]


@dataclass(frozen=True)
class Latent:
    channels: int
    height: int
    width: int
    scaling_factor: float = 1.0  # VAE input = latent / scaling_factor + shift_factor (inside the vae_decoder engine)
    shift_factor: float = 0.0
    packing: int = 1  # Flux: the denoiser sees 2×2 patches packed into channels (B, H/2·W/2, 4·C)


@dataclass(frozen=True)
class Scheduler:
    # the diffusers scheduler config the pipeline runs: "_class_name" and every option, defaults filled in
    config: dict
    prediction: str  # what the model predicts: "flow" (v = noise − x0) | "epsilon" | "v_prediction" | "sample"
    default_steps: int = 20
    default_guidance: float = 4.0
    # how the diffusers pipeline calls set_timesteps beyond the step count (runtime/schedules.timestep_args):
    # custom_sigmas ("linspace"), mu ("always" | "dynamic"), image_seq_len, mu_defaults
    call: dict = field(default_factory=dict)


@dataclass(frozen=True)
class TextInput:
    """One tokenizer feeding the text_encoder engine (whose outputs are the denoiser's prompt inputs)."""
    tokenizer: str  # tokenizer.json, relative to the folder
    max_length: int
    pad_id: int
    padding_side: str = "right"
    input_ids: str = "input_ids"  # text_encoder input names fed from this tokenizer
    attention_mask: str | None = "attention_mask"
    lowercase: bool = False  # PixArt/Sana pipelines lower-case and strip the prompt first
    prefix: str = ""  # Sana: an instruction prepended to the positive prompt only...
    prefixed_max_length: int = 0  # ...tokenized to this length, of which BOS + the last max_length−1 are kept
    # [lo, hi]: the engines take any length in this range, chosen per request (SD3/Flux T5's max_sequence_length;
    # max_length is then the pipeline's default); empty: the length is fixed at max_length
    length_range: list[int] = field(default_factory=list)


@dataclass(frozen=True)
class FileEntry:
    sha256: str
    bytes: int


@dataclass(frozen=True)
class Manifest:
    model: str
    family: str
    conditioning: str  # "class" (class labels) | "text"
    class_names: list[str]
    random_weights: bool
    latent: Latent
    scheduler: Scheduler
    components: dict[str, Component]
    files: dict[str, FileEntry]
    export: dict[str, Any] = field(default_factory=dict)  # command, versions, created: informational
    text: list[TextInput] = field(default_factory=list)  # text-conditioned models: tokenizers, in encoder order
    # PixArt's resolution bins: aspect ratio -> (height, width) px; a requested size whose bin is the engines'
    # size is generated at that size, then resized and centre-cropped as the pipeline does
    resolution_bins: dict[str, list[int]] = field(default_factory=dict)
    null_class: int | None = None  # class-conditional: the label of the unconditional (negative) CFG branch
    schema_version: int = SCHEMA_VERSION

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Any) -> "Manifest":
        if not isinstance(d, dict):
            raise ManifestError("manifest.json must hold a JSON object")
        version = d.get("schema_version")
        if version != SCHEMA_VERSION:
            raise ManifestError(f"manifest schema_version {version!r} is not supported (this runtime reads "
                                f"version {SCHEMA_VERSION}); re-export the folder with this version's dit-export")
        d = _checked(cls, d, "manifest")
        comps = {}
        for name, c in _mapping(d["components"], "components").items():
            c = _checked(Component, c, f"components.{name}")
            c["inputs"] = [TensorSpec(**_checked(TensorSpec, s, f"components.{name}.inputs")) for s in c["inputs"]]
            c["outputs"] = [TensorSpec(**_checked(TensorSpec, s, f"components.{name}.outputs")) for s in c["outputs"]]
            comps[name] = Component(**c)
        d["components"] = comps
        d["files"] = {k: FileEntry(**_checked(FileEntry, v, f"files.{k}")) for k, v in _mapping(d["files"], "files").items()}
        d["latent"] = Latent(**_checked(Latent, d["latent"], "latent"))
        d["text"] = [TextInput(**_checked(TextInput, t, "text")) for t in d.get("text", [])]
        d["scheduler"] = Scheduler(**_checked(Scheduler, d["scheduler"], "scheduler"))
        return cls(**d)


def _mapping(v: Any, where: str) -> dict:
    if not isinstance(v, dict):
        raise ManifestError(f"manifest field {where!r} must be an object")
    return v


def _checked(cls, d: Any, where: str) -> dict:
    """A copy of d with exactly cls's fields (defaults may be omitted); unknown or missing keys raise."""
    d = dict(_mapping(d, where))
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ManifestError(f"unknown key(s) {', '.join(map(repr, unknown))} in manifest {where}; "
                            "this folder was written by a newer dit-export")
    required = {f.name for f in fields(cls) if f.default is f.default_factory is MISSING}
    missing = sorted(required - set(d))
    if missing:
        raise ManifestError(f"manifest {where} lacks {', '.join(map(repr, missing))}")
    return d


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def resolve_inside(folder: Path, rel: str) -> Path:
    """folder/rel, refusing absolute paths, '..' and symlinks that leave the folder."""
    root = folder.resolve()
    path = (root / rel).resolve()
    if os.path.isabs(rel) or not path.is_relative_to(root):
        raise ManifestError(f"manifest path {rel!r} points outside the engine folder {str(folder)!r}; refusing it")
    return path


def load_manifest(folder: str | os.PathLike, verify: bool = True) -> Manifest:
    """Read and check `folder/manifest.json`; with verify, check every file's size and sha256."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ManifestError(f"engine folder {str(folder)!r} does not exist; create one with `dit-export`")
    path = folder / MANIFEST_NAME
    if not path.is_file():
        raise ManifestError(f"{str(folder)!r} has no {MANIFEST_NAME}; is it an engine folder written by dit-export?")
    try:
        manifest = Manifest.from_dict(json.loads(path.read_text()))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ManifestError(f"{str(path)!r} is not valid JSON ({e})") from None
    except TypeError as e:  # wrong value types inside a known structure
        raise ManifestError(f"{str(path)!r} is malformed ({e})") from None
    for name, comp in manifest.components.items():
        if comp.file not in manifest.files:
            raise ManifestError(f"component {name!r} names {comp.file!r}, which the manifest's file list lacks")
    for rel, entry in manifest.files.items():
        file = resolve_inside(folder, rel)
        if not file.is_file():
            raise ManifestError(f"engine file {rel!r} is missing from {str(folder)!r}; re-export the folder")
        if verify:
            size = file.stat().st_size
            if size != entry.bytes:
                raise ManifestError(f"engine file {rel!r} has {size} bytes, the manifest says {entry.bytes} "
                                    "(truncated or replaced); re-export the folder")
            if sha256_file(file) != entry.sha256:
                raise ManifestError(f"engine file {rel!r} does not match its sha256 in the manifest "
                                    "(corrupted or modified); re-export the folder")
    return manifest
