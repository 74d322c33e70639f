"""The engine-folder contract: `manifest.json` <-> dataclasses, strict in both directions.

The dataclasses below are the manifest's schema: each field's type and `rule(...)` (range, choices, length) are
checked at load, then `_check_consistency` checks what the runtime relies on across fields (the denoiser's
inputs are all fed, the latent matches the engines, every file read is hashed). The runtime trusts nothing in
a folder it did not check: unknown schema versions and keys are refused, every file path must stay inside the
folder, and every file's size and sha256 must match. Every failure is one ManifestError naming the field.
"""

import hashlib
import json
import math
import os
import re
import types
import typing
from dataclasses import MISSING, asdict, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

from .errors import ConfigError, ManifestError
from .schedules import STEP_SCALARS, full_config

SCHEMA_VERSION = 3  # 3: constant conditioning (Flux ids, PixArt-α micro-conditions) lives in the step engine
MANIFEST_NAME = "manifest.json"
DTYPES = ("float32", "float16", "bfloat16", "int64", "int32")
COMPONENTS = ("denoiser", "text_encoder", "vae_decoder")
MAX_MANIFEST_BYTES = 16 << 20  # real manifests are a few kB; a larger one is not ours
MAX_DEPTH = 16  # nesting of free-form objects (scheduler config, export info)
MAX_INT = 2**53  # integers JSON readers agree on
MAX_DIM = 1 << 20  # one tensor axis; latents and images are far smaller
STATE_INPUTS = ("x", "x0_prev", "x0_prev2", "guidance", *STEP_SCALARS)  # the step engine's per-step inputs
RUNTIME_INPUTS = ("class_labels",)  # filled by the runtime from the request
NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.:/-]{0,127}")  # tensor names
AXIS = re.compile(r"[A-Za-z0-9_+*/() -]{1,64}")  # symbolic axes: "B", "T", "77+T"


def rule(default: Any = MISSING, *, factory: Any = MISSING, **checks) -> Any:
    """A dataclass field with load-time checks: lo/hi (a number's range; a string's, list's or object's size),
    one_of, pattern; item / key: the checks of a list's or object's values / keys."""
    return field(default=default, default_factory=factory, metadata=checks)


@dataclass(frozen=True)
class TensorSpec:
    name: str = rule(pattern=NAME)
    dtype: str = rule(one_of=DTYPES)
    # ints for fixed axes, strings ("B") for symbolic ones; [] for a scalar
    shape: list[int | str] = rule(hi=8, item=dict(lo=1, hi=MAX_DIM, pattern=AXIS))

    def __post_init__(self):  # a tuple given in code is the same spec as the list a manifest holds
        object.__setattr__(self, "shape", list(self.shape))


@dataclass(frozen=True)
class Target:
    """Where an AOTInductor package (.pt2: compiled machine code) runs: it was compiled for this device, this GPU
    architecture or CPU instruction set, and this torch version, and runs nowhere else."""

    device: str = rule(one_of=("cpu", "cuda"))
    arch: str = rule(lo=1, hi=64)  # "sm_90" (CUDA compute capability) | the CPU vector ISA, e.g. "avx2"
    torch: str = rule(lo=1, hi=64)  # torch.__version__ that compiled it
    # torch op libraries the package calls (the dit ops compiled in C++), loaded before it; in the file list
    libraries: list[str] = rule(factory=list, hi=8, item=dict(hi=1024))


@dataclass(frozen=True)
class Component:
    file: str = rule(hi=1024)  # relative to the folder
    backend: str = rule(one_of=("onnxruntime", "tensorrt", "torch"))
    # the narrowest dtype it computes in; its I/O is as the specs say
    precision: str = rule(one_of=("fp32", "fp16", "bf16"))
    # custom ops: "portable" (standard ops) | "plugin" (TensorRT plugin nodes) | "kernels" (the dit ops as C++
    # torch ops inside an AOTInductor package)
    lowering: str = rule(one_of=("portable", "plugin", "kernels"))
    inputs: list[TensorSpec] = rule(lo=1, hi=64)
    outputs: list[TensorSpec] = rule(lo=1, hi=64)
    target: Target | None = None  # AOTInductor packages (backend "torch") only


@dataclass(frozen=True)
class Latent:
    channels: int = rule(lo=1, hi=1024)
    height: int = rule(lo=1, hi=16384)
    width: int = rule(lo=1, hi=16384)
    # VAE input = latent / scaling_factor + shift_factor (inside the vae_decoder engine)
    scaling_factor: float = rule(1.0, lo=1e-6, hi=1e6)
    shift_factor: float = rule(0.0, lo=-1e6, hi=1e6)
    packing: int = rule(1, one_of=(1, 2))  # Flux: 2×2 latent patches packed into channels (B, H/2·W/2, 4·C)


@dataclass(frozen=True)
class Scheduler:
    # the diffusers scheduler config the pipeline runs: "_class_name" and every option, defaults filled in
    config: dict
    # what the model predicts: "flow" (v = noise − x0) | "epsilon" | "v_prediction" | "sample"
    prediction: str = rule(one_of=("flow", "epsilon", "v_prediction", "sample"))
    default_steps: int = rule(20, lo=1, hi=1000)
    default_guidance: float = rule(4.0, lo=0.0, hi=100.0)
    # how the diffusers pipeline calls set_timesteps beyond the step count (runtime/schedules.timestep_args):
    # custom_sigmas ("linspace"), mu ("always" | "dynamic"), image_seq_len, mu_defaults
    call: dict = rule(factory=dict)


@dataclass(frozen=True)
class TextInput:
    """One tokenizer feeding the text_encoder engine (whose outputs are the denoiser's prompt inputs)."""

    tokenizer: str = rule(hi=1024)  # tokenizer.json, relative to the folder
    max_length: int = rule(lo=1, hi=8192)
    pad_id: int = rule(lo=0, hi=2**31 - 1)
    padding_side: str = rule("right", one_of=("right", "left"))
    input_ids: str = rule("input_ids", pattern=NAME)  # text_encoder input names fed from this tokenizer
    attention_mask: str | None = rule("attention_mask", pattern=NAME)
    lowercase: bool = False  # PixArt/Sana pipelines lower-case and strip the prompt first
    prefix: str = rule("", hi=1 << 16)  # Sana: an instruction prepended to the positive prompt only...
    # ...tokenized to this length, of which BOS + the last max_length−1 are kept
    prefixed_max_length: int = rule(0, lo=0, hi=8192)
    # [lo, hi]: the engines take any length in this range, chosen per request (SD3/Flux T5's max_sequence_length;
    # max_length is then the pipeline's default); empty: the length is fixed at max_length
    length_range: list[int] = rule(factory=list, hi=2, item=dict(lo=1, hi=8192))


@dataclass(frozen=True)
class FileEntry:
    sha256: str = rule(pattern=re.compile(r"[0-9a-f]{64}"))
    bytes: int = rule(lo=0, hi=MAX_INT)


@dataclass(frozen=True)
class Manifest:
    model: str = rule(lo=1, hi=256)
    family: str = rule(lo=1, hi=64)
    conditioning: str = rule(one_of=("class", "text"))  # class labels | prompts
    class_names: list[str] = rule(hi=100_000, item=dict(hi=256))
    random_weights: bool
    latent: Latent
    scheduler: Scheduler
    components: dict[str, Component] = rule(lo=1, key=dict(one_of=COMPONENTS))
    files: dict[str, FileEntry] = rule(lo=1, hi=100_000, key=dict(hi=1024))
    # command, source, versions (and created, with SOURCE_DATE_EPOCH): informational
    export: dict[str, Any] = rule(factory=dict)
    text: list[TextInput] = rule(factory=list, hi=4)  # text-conditioned models: tokenizers, in encoder order
    # PixArt's resolution bins: aspect ratio -> (height, width) px; a requested size whose bin is the engines'
    # size is generated at that size, then resized and centre-cropped as the pipeline does
    resolution_bins: dict[str, list[int]] = rule(
        factory=dict, hi=1000, item=dict(lo=2, hi=2, item=dict(lo=1, hi=16384))
    )
    null_class: int | None = rule(
        None, lo=0, hi=100_000
    )  # class models: the unconditional (negative) CFG label
    schema_version: int = SCHEMA_VERSION

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Any) -> "Manifest":
        if not isinstance(d, dict):
            raise ManifestError("manifest.json must hold a JSON object")
        version = d.get("schema_version")
        if "schema_version" not in d:
            raise ManifestError("the manifest has no schema_version; it was not written by dit-export")
        if type(version) is not int or version != SCHEMA_VERSION:
            raise ManifestError(
                f"manifest schema_version {_show(version)} is not supported (this runtime reads "
                f"version {SCHEMA_VERSION}); re-export the folder with this version's dit-export"
            )
        manifest = _parse(cls, d, "", {})
        _check_consistency(manifest)
        return manifest


def _show(v: Any) -> str:
    text = repr(v)
    return text if len(text) <= 60 else text[:57] + "..."


def _bad(where: str, wanted: str, v: Any) -> ManifestError:
    return ManifestError(f"manifest field {where!r} must be {wanted}; got {_show(v)}. Re-export the folder")


def _parse(tp: Any, v: Any, where: str, checks: dict) -> Any:
    """v (parsed JSON) as type tp, or a ManifestError naming `where` and what it must be."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if is_dataclass(tp):
        return _parse_object(tp, v, where)
    if origin in (typing.Union, types.UnionType):
        if v is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        for option in options:  # by the JSON type: no union here has two options of one JSON type
            if _json_type(option) is type(v) or (_json_type(option) is float and type(v) is int):
                return _parse(option, v, where, checks)
        return _parse(options[0], v, where, checks)
    if origin is list:
        if type(v) is not list:
            raise _bad(where, "a list", v)
        _check_size(where, v, checks, "items")
        return [_parse(args[0], item, f"{where}[{i}]", checks.get("item", {})) for i, item in enumerate(v)]
    if origin is dict and args[1] is not Any:
        if type(v) is not dict:
            raise _bad(where, "an object", v)
        _check_size(where, v, checks, "entries")
        for key in v:
            _parse(str, key, f"{where} key", checks.get("key", {}))
        return {k: _parse(args[1], item, f"{where}.{k}", checks.get("item", {})) for k, item in v.items()}
    if tp is dict or origin is dict:  # free-form (checked where it is used); only its depth is bounded here
        if type(v) is not dict:
            raise _bad(where, "an object", v)
        if _depth(v) > MAX_DEPTH:
            raise _bad(where, f"nested at most {MAX_DEPTH} deep", "…")
        return v
    return _parse_scalar(tp, v, where, checks)


def _json_type(tp: Any) -> type:
    origin = typing.get_origin(tp) or tp
    return dict if is_dataclass(tp) else origin


def _parse_scalar(tp: type, v: Any, where: str, checks: dict) -> Any:
    lo, hi = checks.get("lo"), checks.get("hi")
    if tp is bool:
        if type(v) is not bool:
            raise _bad(where, "true or false", v)
    elif tp is int or tp is float:
        kind = "an integer" if tp is int else "a finite number"
        if type(v) not in ((int,) if tp is int else (int, float)) or not math.isfinite(v):
            raise _bad(where, kind, v)
        lo, hi = (-MAX_INT if lo is None else lo), (MAX_INT if hi is None else hi)
        if not lo <= v <= hi:
            raise _bad(where, f"{kind} in {lo:g}..{hi:g}" if tp is float else f"{kind} in {lo}..{hi}", v)
        v = tp(v)
    elif tp is str:
        if type(v) is not str:
            raise _bad(where, "a string", v)
        _check_size(where, v, {"lo": lo, "hi": 1 << 16 if hi is None else hi}, "characters")
        if "\0" in v or any(0xD800 <= ord(ch) <= 0xDFFF for ch in v):
            raise _bad(where, "text without NUL or lone surrogate characters", v)
        pattern = checks.get("pattern")
        if pattern is not None and not pattern.fullmatch(v):
            raise _bad(where, f"a name matching {pattern.pattern}", v)
    else:
        raise TypeError(f"manifest schema has no rule for {tp!r}")  # a bug in the schema above
    if "one_of" in checks and v not in checks["one_of"]:
        raise _bad(where, f"one of {', '.join(map(repr, checks['one_of']))}", v)
    return v


def _check_size(where: str, v: Any, checks: dict, unit: str) -> None:
    lo, hi = checks.get("lo") or 0, checks.get("hi")
    if len(v) < lo or (hi is not None and len(v) > hi):
        raise ManifestError(
            f"manifest field {where!r} has {len(v)} {unit}; allowed: {lo}.."
            f"{'' if hi is None else hi}. Re-export the folder"
        )


def _depth(v: Any) -> int:
    """Nesting depth of a JSON value, without recursion."""
    deepest, stack = 0, [(v, 1)]
    while stack:
        item, d = stack.pop()
        deepest = max(deepest, d)
        if d <= MAX_DEPTH:
            children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else ()
            stack.extend((c, d + 1) for c in children if isinstance(c, (dict, list)))
    return deepest


def _parse_object(cls: type, v: Any, where: str) -> Any:
    """A cls built from exactly cls's fields (defaulted ones may be omitted); unknown or missing keys raise."""
    what = f"manifest field {where!r}" if where else "the manifest"
    if type(v) is not dict:
        raise _bad(where, "an object", v) if where else ManifestError("manifest.json must hold a JSON object")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(v) - names)
    if unknown:
        raise ManifestError(
            f"{what} has unknown key(s) {', '.join(_show(k) for k in unknown[:5])}; this folder was "
            "written by a newer dit-export"
        )
    missing = [f.name for f in fields(cls) if f.default is f.default_factory is MISSING and f.name not in v]
    if missing:
        raise ManifestError(f"{what} lacks {', '.join(map(repr, missing))}; re-export the folder")
    return cls(
        **{
            f.name: _parse(hints[f.name], v[f.name], f"{where}.{f.name}".lstrip("."), dict(f.metadata))
            for f in fields(cls)
            if f.name in v
        }
    )


def _check_consistency(m: Manifest) -> None:
    """What the runtime relies on across fields: every file it reads hashed, every engine input fed, the latent
    the engines were built for."""

    def bad(where: str, message: str) -> ManifestError:
        return ManifestError(f"manifest field {where!r} {message}; re-export the folder")

    for name, comp in m.components.items():
        if comp.file not in m.files:
            raise bad(f"components.{name}.file", f"names {comp.file!r}, which the manifest's file list lacks")
        if (comp.backend == "torch") != (comp.target is not None):
            raise bad(f"components.{name}.target", "must be given for backend 'torch' and only for it")
        for lib in comp.target.libraries if comp.target else ():
            if lib not in m.files:
                raise bad(f"components.{name}.target.libraries", f"names {lib!r}, which the file list lacks")
        for side in ("inputs", "outputs"):
            seen = [s.name for s in getattr(comp, side)]
            if len(set(seen)) != len(seen):
                raise bad(f"components.{name}.{side}", "names a tensor twice")
    for i, t in enumerate(m.text):
        if t.tokenizer not in m.files:
            raise bad(
                f"text[{i}].tokenizer",
                f"names {t.tokenizer!r}, which the manifest's file list (the files checked at load) lacks",
            )
        if t.length_range and not (
            len(t.length_range) == 2 and t.length_range[0] <= t.max_length <= t.length_range[1]
        ):
            raise bad(
                f"text[{i}].length_range",
                f"{t.length_range} must be [lo, hi] around max_length {t.max_length}",
            )
        if t.prefix and t.prefixed_max_length < t.max_length:
            raise bad(
                f"text[{i}].prefixed_max_length",
                f"{t.prefixed_max_length} must be >= max_length {t.max_length} when a prefix is set",
            )
    try:
        full = full_config(m.scheduler.config)
    except ConfigError as e:
        raise bad("scheduler.config", f"cannot be run by this runtime: {e}") from None
    changed = [
        k for k in {**full, **m.scheduler.config} if m.scheduler.config.get(k, "(missing)") != full.get(k)
    ]
    if changed:  # dit-export writes every option; a left-out option has its default (diffusers' from_config)
        raise bad(
            f"scheduler.config.{changed[0]}",
            f"is {_show(m.scheduler.config.get(changed[0], '(missing)'))}, "
            f"not {_show(full.get(changed[0], '(absent)'))} as the complete config dit-export writes has it",
        )
    for key, hw in m.resolution_bins.items():
        if not _positive_number(key):
            raise bad(f"resolution_bins.{key}", "must be keyed by an aspect ratio (a positive number)")
    if m.conditioning == "class":
        if not m.class_names:
            raise bad("class_names", "is empty, but the model is class-conditional")
        if m.null_class is not None and m.null_class > len(m.class_names):
            raise bad(
                "null_class", f"{m.null_class} is past the {len(m.class_names)} classes and their null label"
            )
    _check_engines(m, bad)


def _check_text_engine(m: Manifest, denoiser_inputs: dict, bad) -> None:
    """The tokenizers feed exactly the text encoder's inputs; with one tokenizer of a fixed length, the prompt
    inputs of the denoiser have that length where the encoder's outputs have T."""
    encoder = m.components["text_encoder"]
    takes = {s.name for s in encoder.inputs}
    given = []
    for i, t in enumerate(m.text):
        for key in ("input_ids", "attention_mask"):
            if getattr(t, key) is not None and getattr(t, key) not in takes:
                raise bad(f"text[{i}].{key}", f"{getattr(t, key)!r} is not an input of the text encoder")
        given += [name for name in (t.input_ids, t.attention_mask) if name is not None]
    if sorted(given) != sorted(takes):
        raise bad("text", f"feeds {sorted(given)}, but the text encoder takes {sorted(takes)}")
    if len(m.text) != 1 or m.text[0].length_range:
        return
    length = m.text[0].max_length
    for out in encoder.outputs:
        want = [length if axis == "T" else axis for axis in out.shape[1:]]
        if out.name in denoiser_inputs and denoiser_inputs[out.name].shape[-len(want) :] != want:
            raise bad(
                "text[0].max_length",
                f"{length} does not fit the denoiser's {out.name!r} of shape "
                f"{denoiser_inputs[out.name].shape}",
            )


def _positive_number(text: str) -> bool:
    try:
        return math.isfinite(float(text)) and float(text) > 0
    except ValueError:
        return False


def _check_engines(m: Manifest, bad) -> None:
    """The step engine's inputs are the sampler state, the conditioning the runtime builds and the text
    encoder's outputs; its state and the VAE's latents have the manifest's latent shape."""
    if "denoiser" not in m.components:
        raise bad("components", "lacks the denoiser")
    den, lat = m.components["denoiser"], m.latent
    if lat.height % lat.packing or lat.width % lat.packing:
        raise bad(
            "latent", f"{lat.height}x{lat.width} cannot be packed in {lat.packing}x{lat.packing} patches"
        )
    p = lat.packing
    state = (
        [lat.channels, lat.height, lat.width]
        if p == 1
        else [lat.height * lat.width // p // p, lat.channels * p * p]
    )
    fed = {*STATE_INPUTS, *RUNTIME_INPUTS}
    inputs = {s.name: s for s in den.inputs}
    if "text_encoder" in m.components:
        fed |= {s.name for s in m.components["text_encoder"].outputs}
        _check_text_engine(m, inputs, bad)
    for name in STATE_INPUTS:
        if name not in inputs:
            raise bad("components.denoiser.inputs", f"lacks the step input {name!r}")
        if inputs[name].dtype != "float32" or len(inputs[name].shape) != (
            0 if name not in STATE_INPUTS[:3] else len(state) + 1
        ):
            raise bad(f"components.denoiser.inputs.{name}", "has the wrong dtype or rank for a step input")
    for name in STATE_INPUTS[:3]:
        if inputs[name].shape[1:] != state:
            raise bad(
                f"components.denoiser.inputs.{name}",
                f"shape {inputs[name].shape} does not hold the "
                f"manifest's latent {lat.channels}x{lat.height}x{lat.width} (packing {p})",
            )
    unfed = sorted(set(inputs) - fed)
    if unfed and (
        m.conditioning == "class" or "text_encoder" in m.components
    ):  # else: a denoiser-only export
        raise bad("components.denoiser.inputs", f"has input(s) {unfed} that nothing feeds")
    outputs = {s.name: s for s in den.outputs}
    if [outputs.get(k) and outputs[k].shape[1:] for k in ("x_next", "x0")] != [state, state]:
        raise bad("components.denoiser.outputs", f"must hold x_next and x0 of the latent shape {state}")
    if "vae_decoder" in m.components:
        vae = m.components["vae_decoder"]
        if [s.name for s in vae.inputs] != ["latents"] or vae.inputs[0].shape[1:] != [
            lat.channels,
            lat.height,
            lat.width,
        ]:
            raise bad("components.vae_decoder.inputs", "must be latents of the manifest's latent shape")
        shape = vae.outputs[0].shape
        if (
            vae.outputs[0].name != "image"
            or len(shape) != 4
            or not all(type(d) is int for d in shape[1:])
            or shape[1] not in (1, 3)
        ):
            raise bad(
                "components.vae_decoder.outputs", f"must start with image (B, 1 or 3, H, W); got {shape}"
            )


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
    if os.path.isabs(rel) or not path.is_relative_to(root) or path == root:
        raise ManifestError(
            f"manifest path {rel!r} points outside the engine folder {str(folder)!r}; refusing it"
        )
    return path


def _constant(name: str) -> float:
    if name == "NaN":  # ±Infinity is how diffusers writes e.g. lambda_min_clipped; NaN is never meant
        raise ValueError("NaN is not allowed")
    return float(name)


def _object(pairs: list) -> dict:
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):  # json.loads would keep the last silently
        raise ValueError(
            f"key {_show(next(k for k in keys if keys.count(k) > 1))} appears twice in one object"
        )
    return dict(pairs)


def read_manifest_json(path: Path) -> Any:
    """The parsed JSON of a manifest file: ±Infinity allowed (diffusers writes it in scheduler configs), NaN not;
    bounded in size and nesting."""
    if path.stat().st_size > MAX_MANIFEST_BYTES:
        raise ManifestError(
            f"{str(path)!r} is larger than {MAX_MANIFEST_BYTES >> 20} MiB; it is not a manifest "
            "dit-export wrote"
        )
    try:
        return json.loads(
            path.read_bytes().decode("utf-8"), parse_constant=_constant, object_pairs_hook=_object
        )
    except (
        ValueError,
        RecursionError,
    ) as e:  # JSON syntax, NaN, 4300+ digit integers, bad UTF-8, deep nesting
        reason = "nested too deeply" if isinstance(e, RecursionError) else str(e).splitlines()[0][:120]
        raise ManifestError(f"{str(path)!r} is not valid JSON ({reason})") from None


def load_manifest(folder: str | os.PathLike, verify: bool = True) -> Manifest:
    """Read and check `folder/manifest.json`; with verify, check every file's size and sha256."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise ManifestError(
            f"engine folder {str(folder)!r} is a file, not a folder; give the folder dit-export wrote"
        )
    if not folder.is_dir():
        raise ManifestError(f"engine folder {str(folder)!r} does not exist; create one with `dit-export`")
    path = folder / MANIFEST_NAME
    if not path.is_file():
        raise ManifestError(
            f"{str(folder)!r} has no {MANIFEST_NAME}; is it an engine folder written by dit-export?"
        )
    path = resolve_inside(folder, MANIFEST_NAME)  # a link to a manifest elsewhere is not this folder's
    manifest = Manifest.from_dict(read_manifest_json(path))
    for rel, entry in manifest.files.items():
        file = resolve_inside(folder, rel)
        if not file.is_file():
            raise ManifestError(f"engine file {rel!r} is missing from {str(folder)!r}; re-export the folder")
        if verify:
            size = file.stat().st_size
            if size != entry.bytes:
                raise ManifestError(
                    f"engine file {rel!r} has {size} bytes, the manifest says {entry.bytes} "
                    "(truncated or replaced); re-export the folder"
                )
            if sha256_file(file) != entry.sha256:
                raise ManifestError(
                    f"engine file {rel!r} does not match its sha256 in the manifest "
                    "(corrupted or modified); re-export the folder"
                )
    return manifest
