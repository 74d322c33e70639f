"""diffusers component folders -> (config, state dict) -> our modules. safetensors only, strict.

A component folder holds `config.json` and either one `*.safetensors` file or shards listed in a
`*.safetensors.index.json`, plain or in diffusers' variants (`variant="fp16"`: `*.fp16.safetensors`). Pickled
`.bin` files are refused.

Loading is lean: the module is built with its parameters on the meta device (`empty_parameters`), the
safetensors files are memory-mapped, each tensor is cast once to the dtype the component runs in (no copy when
it already has it) and assigned to the module (`load_state_dict(assign=True)`): no fp32 copy of bf16/fp16
weights, no random init.
"""

import json
import re
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from ditrt.runtime.errors import LoaderError

from ..precision import FLOAT_DTYPES
from ..registry import CHECKPOINTS
from .keymaps import KeyRule

WEIGHT_NAMES = ("diffusion_pytorch_model", "model")
# A weights entry: `{name}.safetensors`, or a shard index `{name}.safetensors.index.json`; a variant (`variant=`,
# e.g. fp16) as diffusers and transformers save it (`{name}.fp16.safetensors`, `{name}.safetensors.index.fp16.json`
# naming shards `{name}.fp16-00001-of-00002.safetensors`), older diffusers (`{name}.safetensors.fp16.index.json`) or
# as seen on the Hub (`{name}.fp16.safetensors.index.json`).
WEIGHT_ENTRY = re.compile(
    r"(?:diffusion_pytorch_model|model)(?:\.(?P<a>\w+))?\.safetensors"
    r"(?:(?:\.(?P<b>\w+))?\.index(?:\.(?P<c>\w+))?\.json)?"
)


def read_config(folder: Path) -> dict:
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise LoaderError(f"{str(folder)!r} has no config.json; expected a diffusers component folder")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise LoaderError(f"{str(path)!r} is not valid JSON ({e})") from None


def weight_entries(folder: Path) -> dict[str | None, Path]:
    """Every safetensors weights entry of a component folder (one file or a shard index), keyed by its variant
    (None: the plain weights); diffusers' `diffusion_pytorch_model` before transformers' `model`, a file before an
    index."""
    found = {}
    for path in sorted(Path(folder).iterdir()) if Path(folder).is_dir() else ():
        m = WEIGHT_ENTRY.fullmatch(path.name)
        variants = [v for v in m.group("a", "b", "c") if v] if m else []
        if m and path.is_file() and len(variants) <= 1:
            found.setdefault(variants[0] if variants else None, path)
    return found


def pick_variant(folder: Path, variant: str | None = None) -> tuple[str | None, str | None]:
    """The weights variant to load from a component folder -> (variant, None for the plain weights; a note for the
    manifest when it is not the one asked for, else None).

    As diffusers' pipelines choose: the variant asked for, or the plain weights of a component that has no such
    variant; asked for none, the plain weights, or the only variant there is. Anything else is refused, naming the
    weights found.
    """
    folder, found = Path(folder), weight_entries(folder)
    others = sorted(v for v in found if v is not None)
    if variant in found:
        return variant, None
    if variant is not None and None in found:
        return None, f"{folder.name}: no {variant!r} variant, loaded {found[None].name}"
    if variant is None and len(others) == 1:
        return (
            others[0],
            f"{folder.name}: no plain weights, loaded the only variant, {others[0]!r} "
            f"({found[others[0]].name})",
        )
    raise no_weights(folder, variant, found)


def no_weights(folder: Path, variant: str | None, found: dict[str | None, Path]) -> LoaderError:
    """The error for a component folder without the weights asked for, naming the weights it does hold."""
    what = "plain (non-variant)" if variant is None else f"{variant!r} variant"
    if found:
        options = " or ".join("leave out --variant" if v is None else f"--variant {v}" for v in found)
        return LoaderError(
            f"{str(folder)!r} has no {what} safetensors weights; found "
            f"{', '.join(p.name for p in found.values())}: pass {options}"
        )
    if any(folder.glob("*.bin")) or any(folder.glob("*.pt")) or any(folder.glob("*.ckpt")):
        return LoaderError(
            f"{str(folder)!r} has only pickled weights (.bin/.pt/.ckpt), which are never loaded "
            "(they can run code); convert them to safetensors first"
        )
    loose = sorted(p.name for p in folder.glob("*.safetensors"))
    return LoaderError(
        f"{str(folder)!r} has no safetensors weights (looked for {' / '.join(WEIGHT_NAMES)}"
        "[.VARIANT].safetensors and their index files)"
        + (f"; found only {', '.join(loose[:4])}, which no index file lists" if loose else "")
    )


def weight_files(folder: Path, variant: str | None = None) -> list[Path]:
    """The safetensors files of a component's weights in `variant` (None: the plain ones): one file, or the shards
    named by an index file."""
    folder, found = Path(folder), weight_entries(folder)
    if variant not in found:
        raise no_weights(folder, variant, found)
    entry = found[variant]
    if not entry.name.endswith(".json"):
        return [entry]
    try:
        shards = sorted(set(json.loads(entry.read_text())["weight_map"].values()))
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as e:
        raise LoaderError(
            f"{str(entry)!r} is not a safetensors index (no readable weight_map: {e!r})"
        ) from None
    missing = [s for s in shards if not (folder / s).is_file()]
    if missing:
        raise LoaderError(f"{str(entry)!r} lists shard {missing[0]!r}, which is missing")
    return [folder / s for s in shards]


def read_state_dict(
    folder: Path, variant: str | None = None, dtype: torch.dtype = torch.float32
) -> dict[str, torch.Tensor]:
    """A component's weights, memory-mapped, each cast once to dtype (one already in dtype is not copied)."""
    from safetensors import SafetensorError, safe_open

    state = {}
    for path in weight_files(folder, variant):
        try:
            with safe_open(str(path), "pt") as f:  # mmaps the file: tensors are views of it until cast
                for k in f.keys():
                    v = f.get_tensor(k)
                    if v.dtype not in FLOAT_DTYPES:
                        raise LoaderError(
                            f"{k!r} in {path.name!r} has dtype {v.dtype}; expected fp32, fp16 or bf16"
                        )
                    state[k] = v.to(dtype)
        except (SafetensorError, OSError) as e:
            raise LoaderError(f"cannot read {str(path)!r}: {e}") from None
    return state


@contextmanager
def empty_parameters():
    """Build modules with every parameter and persistent buffer (state-dict entries, which the weights fill) on
    the meta device: no memory, no random init. Non-persistent buffers and the tables computed in __init__ stay
    real (as accelerate's init_empty_weights, but for the persistent buffers)."""
    register, register_buffer = nn.Module.register_parameter, nn.Module.register_buffer

    def on_meta(module, name, param):
        register(module, name, param)
        if param is not None and param.device.type != "meta":
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    def buffer_on_meta(module, name, tensor, persistent=True):
        register_buffer(
            module, name, tensor.to("meta") if persistent and tensor is not None else tensor, persistent
        )

    nn.Module.register_parameter, nn.Module.register_buffer = on_meta, buffer_on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter, nn.Module.register_buffer = register, register_buffer


def remap(state: dict[str, torch.Tensor], rules: list[KeyRule]) -> dict[str, torch.Tensor]:
    """Apply the first matching rule to every key; DROP rules discard, unmatched keys are errors."""
    out, unexpected = {}, []
    for key, value in state.items():
        for rule in rules:
            m = re.fullmatch(rule.src, key)
            if m:
                out.update(rule.apply(m, value, state))
                break
        else:
            unexpected.append(key)
    if unexpected:
        raise LoaderError(f"{len(unexpected)} unexpected checkpoint key(s), e.g. {', '.join(unexpected[:4])}")
    return out


def fill(model: nn.Module, state: dict[str, torch.Tensor]) -> nn.Module:
    """Load strictly: every model tensor filled with the right shape, no checkpoint tensor left over. The
    state's tensors become the module's (assign: no copy, their dtype kept), so model may hold meta
    parameters."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    extra = [k for k in state if k not in own]
    shapes = [
        f"{k} {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in state and state[k].shape != own[k].shape
    ]
    if missing or extra or shapes:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {', '.join(missing[:4])})")
        if extra:
            parts.append(f"{len(extra)} unexpected (e.g. {', '.join(extra[:4])})")
        if shapes:
            parts.append(f"{len(shapes)} shape mismatch(es) (e.g. {'; '.join(shapes[:3])})")
        raise LoaderError(f"weights do not fit {type(model).__name__}: " + "; ".join(parts))
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()


def load_component(
    folder: str | Path,
    variant: str | None = None,
    notes: list[str] | None = None,
    dtype: torch.dtype = torch.float32,
) -> nn.Module:
    """A diffusers component folder (config.json + safetensors: a transformer or a VAE) as our module, its
    weights in dtype (the one the component runs in: precision.POLICY), cast once from the checkpoint's.

    variant: diffusers' `variant=` (e.g. "fp16"), chosen as `pick_variant` says; its note, if any, goes to notes.
    """
    folder = Path(folder)
    config = read_config(folder)
    name = config.get("_class_name")
    if name not in CHECKPOINTS:
        raise LoaderError(f"{str(folder)!r} holds a {name!r}; supported: {', '.join(sorted(CHECKPOINTS))}")
    variant, note = pick_variant(folder, variant)
    if note and notes is not None:
        notes.append(note)
    checkpoint = CHECKPOINTS[name]
    with empty_parameters():
        model = checkpoint.module(checkpoint.from_diffusers(config))
    model = fill(model, remap(read_state_dict(folder, variant, dtype), checkpoint.keys))
    return model.to(dtype)  # the buffers computed in __init__ (the parameters have dtype already: no copy)
