"""Atomic engine-folder writer: everything goes into a hidden temp folder that is renamed when complete.

While an export runs, its staging folder `.NAME.tmp-*` (and, during a --force replace, the `.NAME.old-*` folder
holding the previous engine folder) contains OWNER_MARKER, flock-ed for the export's lifetime. The kernel drops
the lock when the process dies however it dies, so the next export to NAME can tell leftovers of dead exports from
live ones, remove them, and put back a previous folder that a replace interrupted between its two renames.
"""

import fcntl
import glob
import json
import os
import secrets
import shutil
import stat
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Iterator

from ditrt.runtime.errors import ConfigError, InputError, LoaderError
from ditrt.runtime.manifest import MANIFEST_NAME, MAX_MANIFEST_BYTES, FileEntry, Manifest, sha256_file

from .pixart_bins import manifest_bins

OWNER_MARKER = ".dit-export-owner"  # never part of an engine folder: removed once the folder is in place
NEW_MARKER = OWNER_MARKER + ".new"  # the marker while it is being made


def output_target(out: str | os.PathLike) -> Path:
    """`out` as an absolute path with a real last name (`.`, `..` resolved), its parent's symlinks resolved and its
    own kept (a link is refused, not followed); refuses the current folder, its parents and the root."""
    given = Path(out)
    if given.name in ("", ".", ".."):
        target = given.resolve()
    else:
        target = given.parent.resolve() / given.name
    cwd = Path.cwd().resolve()
    if target.resolve() == cwd or target.resolve() in cwd.parents:
        raise InputError(f"output {str(out)!r} is the current folder or one of its parents ({str(target)!r}); "
                         "write the engine folder to a new folder, e.g. -o engines/NAME")
    return target


def is_engine_folder(folder: Path) -> bool:
    """A folder dit-export wrote: a regular manifest.json (a JSON object with an integer schema_version, any
    version, and its files) that lists every file the folder holds, so that nothing of the user's is in it."""
    path = folder / MANIFEST_NAME
    try:
        info = os.lstat(path)
        if not stat.S_ISREG(info.st_mode) or info.st_size > MAX_MANIFEST_BYTES:  # not a FIFO, device or link
            return False
        manifest = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError):  # missing, unreadable, not UTF-8 or not JSON
        return False
    if not (isinstance(manifest, dict) and type(manifest.get("schema_version")) is int
            and isinstance(manifest.get("files"), dict)):
        return False
    return not unlisted_files(folder, manifest["files"])


def unlisted_files(folder: Path, listed: dict) -> list[str]:
    """Files (and links) under folder that a manifest's file list does not name, links not followed."""
    extra = []
    for root, dirs, files in os.walk(folder):
        for name in files + [d for d in dirs if os.path.islink(os.path.join(root, d))]:
            rel = Path(root, name).relative_to(folder).as_posix()
            if rel not in listed and rel not in (MANIFEST_NAME, OWNER_MARKER):
                extra.append(rel)
    return sorted(extra)


def check_replaceable(target: Path, out, force: bool) -> None:
    """An existing output may be replaced (with --force) only if it is an engine folder or an empty folder:
    anything else is the user's, and --force never deletes it."""
    if not os.path.lexists(target):
        return
    if target.is_symlink():
        raise InputError(f"output {str(out)!r} is a symbolic link; dit-export replaces only engine folders, "
                         "never a link or what it points to; choose another output")
    if not target.is_dir():
        raise InputError(f"output {str(out)!r} already exists and is a file, not an engine folder; "
                         "choose another output")
    if not is_engine_folder(target) and any(target.iterdir()):
        raise InputError(f"output folder {str(out)!r} already exists and is not an engine folder (no dit-export "
                         "manifest.json listing every file in it); choose another output: --force replaces only "
                         "engine folders")
    if not force:
        raise InputError(f"output folder {str(out)!r} already exists; pass --force to replace it")


def check_output(out: str | os.PathLike, force: bool = False, make_parent: bool = False) -> Path:
    """Check `out` before any work (after undoing what interrupted exports to it left) -> the absolute target."""
    target = output_target(out)
    if target.parent.is_dir():
        recover(target)
        check_replaceable(target, out, force)
    elif not make_parent or os.path.lexists(target.parent):
        raise InputError(f"parent folder {str(Path(out).parent)!r} does not exist; create it first")
    return target


@contextmanager
def staging_folder(out: str | os.PathLike, force: bool = False, make_parent: bool = False) -> Iterator[Path]:
    """Yield an empty temp folder beside `out`; on success it replaces `out`, on failure it is removed.
    The engine folder gets the modes a plain mkdir and file write give (umask), whatever wrote the files."""
    target = check_output(out, force, make_parent)
    made = make_parents(target.parent) if make_parent else []
    tmp, lock = claimed_folder(target, "tmp")
    done = False
    try:
        yield tmp
        normal_modes(tmp)
        commit(tmp, target, out, force)
        done = True
    finally:
        try:
            if os.path.lexists(tmp):
                remove_folder(tmp)
        finally:
            os.close(lock)
        for folder in [] if done else made:  # parents made for an export that failed go too, while empty
            with suppress(OSError):
                folder.rmdir()


def make_parents(folder: Path) -> list[Path]:
    """Create folder and its missing parents -> those created, deepest first."""
    made = []
    while not os.path.lexists(folder):
        made.append(folder)
        folder = folder.parent
    for folder in reversed(made):
        folder.mkdir(exist_ok=True)
    return made


def claimed_folder(target: Path, kind: str, **info) -> tuple[Path, int]:
    """A new `.NAME.<kind>-*` folder beside target, holding OWNER_MARKER locked by this process -> (folder, lock fd).
    os.mkdir, not tempfile.mkdtemp (always 0700): the folder becomes the engine folder, with the umask's mode."""
    while True:
        folder = target.parent / f".{target.name}.{kind}-{secrets.token_hex(4)}"
        try:
            folder.mkdir()
        except FileExistsError:
            continue
        except OSError as e:  # read-only or unwritable parent, full disk, ...
            raise InputError(f"cannot create the engine folder beside {str(target)!r}: {e.strerror or e}; "
                             "choose an output in a folder you can write") from None
        # the marker appears already locked (made under another name, then renamed), so no other export ever
        # sees it unlocked; an empty folder is a leftover to others, which may remove it: then take another
        try:
            fd = os.open(folder / NEW_MARKER, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o666)
        except FileNotFoundError:
            continue
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.write(fd, json.dumps({"pid": os.getpid(), **info}).encode())
        os.rename(folder / NEW_MARKER, folder / OWNER_MARKER)
        return folder, fd


def commit(tmp: Path, target: Path, out, force: bool) -> None:
    """Rename the complete staging folder to target. A folder --force replaces is moved aside first (into a claimed
    .old folder that names this staging folder, so that a crash between the renames can be undone), checked again
    there, and then removed; without --force nothing is ever moved or replaced."""
    check_replaceable(target, out, force)  # again, as late as possible: the output may have appeared meanwhile
    if not force or not os.path.lexists(target):
        try:
            os.rename(tmp, target)  # never over a file or a non-empty folder (an empty one goes, losing nothing)
        except OSError:
            raise InputError(f"output {str(out)!r} appeared while exporting; nothing of it was replaced, and this "
                             "export was not written: choose another output") from None
        (target / OWNER_MARKER).unlink()  # after the rename: a kill in between leaves a whole folder, and a marker
        return
    old, lock = claimed_folder(target, "old", staging=tmp.name)
    try:
        kept = old / target.name
        os.replace(target, kept)
        if not is_engine_folder(kept) and any(kept.iterdir()):  # changed since the check (a file saved in it): it is the user's, put back
            os.replace(kept, target)
            remove_folder(old)
            raise InputError(f"output folder {str(out)!r} changed while exporting and is no longer only an engine "
                             "folder; it was left as it is and this export was not written")
        try:
            os.replace(tmp, target)
        except BaseException:  # e.g. Ctrl-C between the renames: the previous folder goes back now
            os.replace(kept, target)
            raise
        (target / OWNER_MARKER).unlink()
        remove_folder(old)
    finally:
        os.close(lock)


def remove_folder(folder: Path) -> None:
    """rmtree, the owner marker last: a folder that an interrupted removal leaves is still known to be ours."""
    for child in folder.iterdir():
        if child.name in (OWNER_MARKER, NEW_MARKER):
            continue
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()
    shutil.rmtree(folder)


def normal_modes(folder: Path) -> None:
    """Modes as a plain mkdir (0o777 & ~umask) and file write (0o666 & ~umask) give, read off the folder itself
    (made by os.mkdir): some writers (mkstemp) make 0600 files. Links are left alone."""
    mode = folder.stat().st_mode & 0o777
    for root, dirs, files in os.walk(folder):
        for name in dirs:
            if not os.path.islink(os.path.join(root, name)):
                os.chmod(os.path.join(root, name), mode)
        for name in files:
            if not os.path.islink(os.path.join(root, name)):
                os.chmod(os.path.join(root, name), mode & 0o666)


def recover(target: Path) -> None:
    """Undo what interrupted exports to target left beside it: folders whose owner died are removed, and a
    previous folder moved aside by a replace that died between its two renames is put back (target absent)."""
    stale = dead_owner(target) if os.path.lexists(target / OWNER_MARKER) else None
    if stale is not None:  # a kill right after the rename left the marker in the finished folder
        (target / OWNER_MARKER).unlink()
        os.close(stale[0])
    for kind in ("old", "tmp"):  # old first: putting the previous folder back looks at its staging folder
        for folder in sorted(target.parent.glob(f".{glob.escape(target.name)}.{kind}-*")):
            owner = dead_owner(folder)
            if owner is None:
                with suppress(OSError):  # empty: made by an export that died before its marker
                    folder.rmdir()
                continue
            fd, info = owner
            try:
                if kind == "old":
                    restore(folder, target, info.get("staging"))
                remove_folder(folder)
            finally:
                os.close(fd)


def dead_owner(folder: Path) -> tuple[int, dict] | None:
    """(locked marker fd, marker contents) if folder is one of ours whose owner process is gone, else None."""
    if folder.is_symlink() or not folder.is_dir():
        return None
    for name in (OWNER_MARKER, NEW_MARKER):
        marker = folder / name
        try:
            fd = os.open(marker, os.O_RDWR | os.O_NOFOLLOW)
        except OSError:  # no marker: not a folder of ours (or one being renamed into place)
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # fails while a live export holds it
            if os.fstat(fd).st_ino != os.stat(marker).st_ino:  # its owner finished in between
                raise OSError
            info = json.loads(os.read(fd, 4096) or b"{}")
        except (OSError, ValueError):
            os.close(fd)
            return None
        return fd, info if isinstance(info, dict) else {}
    return None


def restore(old: Path, target: Path, staging) -> None:
    """Put back the previous folder a dead export moved aside, if target is absent; it is dropped only when the
    staging folder is gone, i.e. it did become target. Refused in one line where neither is safe."""
    kept = old / target.name
    ours = isinstance(staging, str) and staging.startswith(f".{target.name}.tmp-") and "/" not in staging
    staged = target.parent / staging if ours else None
    if not os.path.lexists(kept):
        return
    if os.path.lexists(target) and staged is not None and not staged.exists():
        return  # the replace was complete: kept was going to be deleted
    if os.path.lexists(target):
        raise InputError(f"an interrupted export left the previous {target.name!r} in {str(kept)!r}, and "
                         f"{str(target)!r} exists again; move one of them away by hand")
    try:
        os.replace(kept, target)
    except OSError as e:
        raise InputError(f"an interrupted export left the previous {target.name!r} in {str(kept)!r} and it "
                         f"cannot be moved back ({e.strerror}); move it back by hand") from None
    if staged is not None and staged.is_dir() and not staged.is_symlink():
        remove_folder(staged)  # the dead export's unfinished replacement


def file_entries(folder: Path) -> dict[str, FileEntry]:
    """sha256 and size of every file under folder (except the manifest and an export's owner marker), keyed by
    POSIX relative path."""
    return {p.relative_to(folder).as_posix(): FileEntry(sha256_file(p), p.stat().st_size)
            for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != MANIFEST_NAME and p.relative_to(folder).as_posix() != OWNER_MARKER}


def write_manifest(folder: Path, manifest: Manifest) -> None:
    (folder / MANIFEST_NAME).write_text(json.dumps(manifest.to_dict(), indent=2) + "\n")


def resolve_source(source: str, random_weights: bool, seed: int, variant: str | None = None):
    """A preset name or a diffusers folder -> (denoiser, Preset-like row describing it, VAE decoder or None, notes).

    variant: diffusers' weights variant (e.g. "fp16") for every component, as `loaders.diffusers.pick_variant` says."""
    from dataclasses import replace

    from .loaders.diffusers import load_component, read_config
    from .presets import FAMILIES, PRESETS, Preset, build_preset, family_defaults, get_preset

    path = Path(source)
    if source in PRESETS and PRESETS[source].folder is not None:  # a demo shipped as a diffusers folder
        preset = PRESETS[source]
        if random_weights:
            raise InputError(f"{source!r} is a trained demo; --random-weights applies to architecture-only models")
        if not (preset.folder / "model_index.json").is_file():
            raise LoaderError(f"files for {source!r} are missing at {str(preset.folder)!r}; reinstall the package")
        model, row, vae, text, notes = resolve_source(str(preset.folder), False, seed, variant)
        return model, replace(row, name=preset.name, description=preset.description, weights=preset.folder), \
            vae, text, notes
    if source in PRESETS or not path.exists():
        preset = get_preset(source)
        if variant is not None:
            raise InputError(f"--variant {variant} applies to diffusers folders, not to the built-in model {source!r}")
        return build_preset(preset, random_weights, seed), preset, None, None, []
    if random_weights:
        raise InputError("--random-weights applies to built-in architectures, not to a checkpoint folder")
    pipeline = (path / "model_index.json").is_file()
    folder = path / "transformer" if pipeline else path
    # the folder's own scheduler replaces the family's default; refused before the slow loading if unsupported
    notes: list[str] = []
    scheduler = folder_scheduler(path, notes) if pipeline and (path / "scheduler").is_dir() else None
    model = load_component(folder, variant, notes)
    family = next((f for f, cls in FAMILIES.items() if isinstance(model, cls)), None)
    if family is None:
        raise InputError(f"{str(folder)!r} holds a {type(model).__name__}, not a denoiser; pass a pipeline folder "
                         "(model_index.json) or a transformer folder")
    vae = None
    pipeline_class = read_json(path / "model_index.json").get("_class_name") if pipeline else None
    sampler, text_len = family_defaults(family, model.cfg, pipeline_class)
    text = load_text_encoder(path, family, model.cfg, text_len, notes, variant) if pipeline else None
    vae_config = path / "vae" / "config.json"
    if pipeline and vae_config.is_file():
        vae_class = read_config(path / "vae").get("_class_name")
        if vae_class in ("AutoencoderKL", "AutoencoderDC"):
            vae = load_component(path / "vae", variant, notes)
        else:
            notes.append(f"vae ({vae_class}) not exported: not supported yet")
    if scheduler is not None:
        sampler = replace(sampler, config=scheduler)
    classes = tuple(str(i) for i in range(model.cfg.num_classes)) if family == "dit" else ()
    row = Preset(path.resolve().name, str(read_config(folder).get("_class_name")), family, model.cfg, sampler,
                 text_len, (128, 128) if family == "flux" else None, class_names=classes)
    return model, row, vae, text, notes


def provenance(opset: int) -> dict:
    """With what an engine folder was built (the manifest's informational `export` fields). Nothing of the machine
    or the moment, so that the same source, options and versions give the same bytes anywhere; `created` only from
    SOURCE_DATE_EPOCH (the reproducible-builds convention) when it is set."""
    import datetime
    import platform

    import onnx
    import torch

    import ditrt.runtime as rt

    info = {"versions": {"ditrt": rt.__version__, "torch": torch.__version__, "onnx": onnx.__version__,
                         "opset": opset, "python": platform.python_version()}}
    epoch = os.environ.get("SOURCE_DATE_EPOCH", "").strip()
    if epoch:
        if not epoch.isdigit():
            raise InputError(f"SOURCE_DATE_EPOCH {epoch!r} is not a number of seconds since 1970; set an integer "
                             "or unset it")
        info["created"] = datetime.datetime.fromtimestamp(int(epoch), datetime.timezone.utc).isoformat()
    return info


def manifest_scheduler(row, model, latent_hw: tuple[int, int], packing: int):
    """The manifest's scheduler: the (folder's) diffusers config, checked to be reproducible for this pipeline's
    set_timesteps call, whose μ follows the number of image tokens the transformer sees at this size."""
    from ditrt.runtime.manifest import Scheduler
    from ditrt.runtime.schedules import check_config, prediction_of

    from .presets import FAMILY_TIMESTEP_CALL

    call = {**FAMILY_TIMESTEP_CALL.get(row.family, {}), **row.sampler.call}
    if call:
        k = packing * getattr(model.cfg, "patch_size", 1)
        call["image_seq_len"] = (latent_hw[0] // k) * (latent_hw[1] // k)
    config = check_config(row.sampler.config, call)
    return Scheduler(config, prediction_of(config), row.sampler.steps, row.sampler.guidance, call)


def read_json(path: Path) -> dict:
    """A JSON object from a diffusers folder (model_index.json, scheduler_config.json), or a one-line error."""
    try:
        value = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LoaderError(f"{str(path)!r} is not valid JSON ({e})") from None
    if not isinstance(value, dict):
        raise LoaderError(f"{str(path)!r} must hold a JSON object")
    return value


def folder_scheduler(pipeline: Path, notes: list[str]) -> dict:
    """The scheduler a pipeline folder's diffusers pipeline builds: the class model_index.json names (diffusers
    loads that one, with the scheduler_config.json options it accepts), checked to be a class and options the
    runtime reproduces (whether this pipeline can call it so is checked with the family, in manifest_scheduler)."""
    from ditrt.runtime.schedules import check_config

    path = pipeline / "scheduler" / "scheduler_config.json"
    if not path.is_file():
        raise LoaderError(f"{str(path.parent)!r} has no scheduler_config.json; a pipeline folder's scheduler/ needs one")
    config = read_json(path)
    entry = read_json(pipeline / "model_index.json").get("scheduler")
    named = entry[1] if isinstance(entry, list) and len(entry) == 2 and isinstance(entry[1], str) else None
    if named and named != config.get("_class_name"):
        notes.append(f"scheduler: model_index.json names {named}, scheduler_config.json {config.get('_class_name')}; "
                     f"{named} is used, as diffusers does")
        config = {**config, "_class_name": named}
    if not isinstance(config.get("_class_name"), str):
        raise LoaderError(f"{str(path)!r} names no scheduler class (_class_name)")
    try:
        check_config(config)
    except ConfigError as e:
        raise ConfigError(f"the folder's scheduler ({str(path)!r}) cannot be reproduced: {e}") from None
    return config


# SanaPipeline's default complex_human_instruction (diffusers pipeline_sana.py), byte for byte.
SANA_INSTRUCTION = (
    "Given a user prompt, generate an 'Enhanced prompt' that provides detailed visual descriptions suitable for image "
    "generation. Evaluate the level of detail in the user prompt:",
    "- If the prompt is simple, focus on adding specifics about colors, shapes, sizes, textures, and spatial "
    "relationships to create vivid and concrete scenes.",
    "- If the prompt is already detailed, refine and enhance the existing details slightly without overcomplicating.",
    "Here are examples of how to transform or refine prompts:",
    "- User Prompt: A cat sleeping -> Enhanced: A small, fluffy white cat curled up in a round shape, sleeping "
    "peacefully on a warm sunny windowsill, surrounded by pots of blooming red flowers.",
    "- User Prompt: A busy city street -> Enhanced: A bustling city street scene at dusk, featuring glowing street "
    "lamps, a diverse crowd of people in colorful clothing, and a double-decker bus passing by towering glass "
    "skyscrapers.",
    "Please generate only the enhanced description for the prompt below and avoid including any additional "
    "commentary or evaluations:",
    "User Prompt: ",
)


def load_text_encoder(path: Path, family: str, cfg, text_len: int | str, notes: list[str],
                      variant: str | None = None):
    """The pipeline folder's text encoders as one engine graph whose outputs are the denoiser's prompt inputs
    -> (graph, [(tokenizer subfolder, transformers tokenizer, manifest TextInput)])."""
    from ditrt.runtime.manifest import TextInput

    from .presets import T5_LENGTH
    from .text_encoders import FluxPromptGraph, MaskedPromptGraph, SD3PromptGraph

    if not (path / "text_encoder" / "config.json").is_file():
        return None
    import torch
    from transformers import AutoTokenizer, CLIPTextModel, CLIPTextModelWithProjection, T5EncoderModel

    from .loaders.diffusers import pick_variant

    def load(cls, sub):  # fp32 whatever config.json's dtype says (transformers' default dtype="auto" would follow it)
        v, note = pick_variant(path / sub, variant)
        notes.extend([note] if note else [])
        return cls.from_pretrained(path / sub, use_safetensors=True, variant=v, dtype=torch.float32).eval()

    if family == "pixart":
        tok = AutoTokenizer.from_pretrained(path / "tokenizer")
        graph = MaskedPromptGraph(load(T5EncoderModel, "text_encoder"), text_len, cfg.caption_channels)
        return graph, [("tokenizer", tok, TextInput("tokenizer/tokenizer.json", text_len, tok.pad_token_id,
                                                    lowercase=True))]
    if family == "sana":  # Gemma-2; the positive prompt gets the instruction prefix, then BOS + its last tokens
        from transformers import Gemma2Model

        tok = AutoTokenizer.from_pretrained(path / "tokenizer")
        prefix = "\n".join(SANA_INSTRUCTION)
        prefixed = len(tok.encode(prefix)) + text_len - 2  # diffusers: max_length_all
        graph = MaskedPromptGraph(load(Gemma2Model, "text_encoder"), "T", cfg.caption_channels)
        return graph, [("tokenizer", tok, TextInput("tokenizer/tokenizer.json", text_len, tok.pad_token_id,
                                                    lowercase=True, prefix=prefix, prefixed_max_length=prefixed))]
    if family == "mmdit" and (path / "text_encoder_3" / "config.json").is_file():
        graph = SD3PromptGraph(load(CLIPTextModelWithProjection, "text_encoder"),
                               load(CLIPTextModelWithProjection, "text_encoder_2"), load(T5EncoderModel, "text_encoder_3"),
                               77, text_len)
        return graph, unmasked_tokenizers(path, [("tokenizer", "clip_l", 77), ("tokenizer_2", "clip_g", 77),
                                                 ("tokenizer_3", "t5", T5_LENGTH[family])])
    if family == "flux" and (path / "text_encoder_2" / "config.json").is_file():
        graph = FluxPromptGraph(load(CLIPTextModel, "text_encoder"), load(T5EncoderModel, "text_encoder_2"), 77, text_len)
        return graph, unmasked_tokenizers(path, [("tokenizer", "clip_l", 77), ("tokenizer_2", "t5", T5_LENGTH[family])])
    notes.append(f"text encoders of this {family!r} pipeline not exported: not supported yet")
    return None


def image_to_latent(height: int | None, width: int | None, vae, multiple: int, model=None) -> tuple[int, int]:
    """--height/--width (pixels) -> latent (H, W); engines are built for one size, so it is checked here, with the
    model's own limits (e.g. a stored position table) in pixels, before the slow export."""
    if vae is None:
        raise InputError("--height/--width need a pipeline folder with a VAE (the pixel-to-latent factor comes from it)")
    if not height or not width:
        raise InputError(f"give both --height and --width (got {height!r} and {width!r})")
    step = vae.cfg.spatial_factor * multiple
    for name, v in (("height", height), ("width", width)):
        if v < step or v % step:
            raise InputError(f"{name} {v} is not allowed; use a multiple of {step} (e.g. {max(step, v // step * step)} "
                             f"or {(v // step + 1) * step})")
    f = step // multiple
    if hasattr(model, "check_latent_size"):
        model.check_latent_size(height // f, width // f, vae_factor=f)
    return height // f, width // f


def unmasked_tokenizers(path: Path, rows: list[tuple[str, str, int]]) -> list:
    """SD3/Flux tokenizers (their encoders take no mask): (subfolder, tokenizer, TextInput) per (subfolder, name, length).
    T5's length is chosen per request (max_sequence_length, up to T5_MAX); CLIP's is fixed."""
    from transformers import AutoTokenizer

    from ditrt.runtime.manifest import TextInput

    from .presets import T5_MAX

    out = []
    for sub, name, n in rows:
        tok = AutoTokenizer.from_pretrained(path / sub)
        out.append((sub, tok, TextInput(f"{sub}/tokenizer.json", n, tok.pad_token_id, input_ids=f"{name}_input_ids",
                                        attention_mask=None, length_range=[2, T5_MAX] if name == "t5" else [])))
    return out


def export_component(name: str, graph, inputs, outputs, folder: Path, lowering_name: str, opset: int,
                     external_data: bool | None):
    """Export one engine into folder/name/model.onnx and describe it for the manifest.

    external_data: None = only when the weights exceed ONNX's 2 GB protobuf limit; True/False force it.
    """
    from ditrt.runtime.manifest import Component, TensorSpec

    from .onnx_export import export_onnx
    from .precision import precision_of

    if external_data is None:  # leave room for the graph under the 2 GB protobuf limit
        external_data = sum(t.numel() * t.element_size() for t in graph.state_dict().values()) > 1.8e9
    (folder / name).mkdir()
    export_onnx(graph, inputs, outputs, folder / name / "model.onnx", lowering_name, opset, external_data)
    specs = [[TensorSpec(s.name, s.dtype, list(s.shape)) for s in ss] for ss in (inputs, outputs)]
    return Component(f"{name}/model.onnx", "onnxruntime" if lowering_name == "portable" else "tensorrt",
                     precision_of(graph), lowering_name, *specs)


def export_opset(lowering_name: str, precision: str, opset: int | None) -> int:
    """Check the lowering and the precision (before the slow export) -> the ONNX opset to export with."""
    from .onnx_export import DEFAULT_OPSET, LOWERINGS
    from .precision import MIN_OPSET, PRECISIONS

    if lowering_name not in LOWERINGS:
        raise InputError(f"unknown lowering {lowering_name!r}; choose from {', '.join(LOWERINGS)}")
    if precision not in PRECISIONS:
        raise InputError(f"unknown precision {precision!r}; choose from {', '.join(PRECISIONS)}")
    need = MIN_OPSET.get(precision, 0)
    if opset and opset < need:
        raise InputError(f"{precision} engines need ONNX opset {need} or newer (got --opset {opset}); "
                         f"use --opset {need} or leave it out")
    return opset or max(DEFAULT_OPSET, need)


def export_model(source: str, out: str | os.PathLike, *, random_weights: bool = False, seed: int = 0,
                 lowering_name: str = "portable", opset: int | None = None, external_data: bool | None = None,
                 height: int | None = None, width: int | None = None, force: bool = False, precision: str = "fp32",
                 make_parent: bool = False, command: str = "", engine: str = "onnx",
                 variant: str | None = None) -> Manifest:
    """Export a preset or a diffusers folder (denoiser step graph, and the VAE decoder where there is one)
    as an engine folder at `out`, atomically; return its manifest (engine "tensorrt": built .plan files)."""
    from ditrt.runtime.manifest import Latent

    from .graphs import DecoderGraph, StepGraph, decoder_io, default_latent_hw, step_io
    from .precision import apply_policy
    from .presets import training_info
    from .text_encoders import save_tokenizer
    from .trt.build import check_engine, engine_components

    opset = export_opset(lowering_name, precision, opset)
    check_engine(engine, lowering_name)  # e.g. TensorRT missing: say so before the slow export
    check_output(out, force, make_parent)  # before the (slow) export, not after it
    info = provenance(opset)
    model, row, vae, text, notes = resolve_source(source, random_weights, seed, variant)
    policy = apply_policy(precision, model, vae, text[0] if text is not None else None)  # engine I/O stays fp32
    packing = 2 if row.family == "flux" else 1
    hw = image_to_latent(height, width, vae, packing * getattr(model.cfg, "patch_size", 1), model) \
        if height or width else row.latent_hw or default_latent_hw(model)
    scheduler = manifest_scheduler(row, model, hw, packing)  # refuses what the runtime cannot reproduce
    step = StepGraph(model, row.text_len, hw)
    with staging_folder(out, force, make_parent) as tmp:
        components = {"denoiser": export_component("denoiser", step,
                                                   *step_io(model, row.text_len, hw), tmp, lowering_name, opset,
                                                   external_data)}
        if text is not None:
            graph, tokenizers = text
            components["text_encoder"] = export_component("text_encoder", graph, graph.inputs, graph.outputs, tmp,
                                                          lowering_name, opset, external_data)
            for sub, tokenizer, _ in tokenizers:
                save_tokenizer(tokenizer, tmp / sub)
        if vae is not None:
            components["vae_decoder"] = export_component("vae_decoder", DecoderGraph(vae), *decoder_io(vae, hw), tmp,
                                                         lowering_name, opset, external_data)
        components = engine_components(engine, tmp, components)
        vcfg = vae.cfg if vae is not None else None
        manifest = Manifest(
            model=row.name, family=row.family, conditioning="class" if row.family == "dit" else "text",
            class_names=list(row.class_names), random_weights=random_weights, resolution_bins=manifest_bins(row, vae),
            latent=Latent(model.cfg.in_channels // packing**2, hw[0], hw[1], vcfg.scaling_factor if vcfg else 1.0,
                          vcfg.shift_factor if vcfg else 0.0, packing),
            scheduler=scheduler, null_class=step.cond.null_class,
            components=components, files=file_entries(tmp), text=[t[2] for t in text[1]] if text is not None else [],
            export={"command": command, "source": source, "seed": seed if random_weights else None,
                    "text_len": row.text_len, "variant": variant, "notes": notes, "training": training_info(row),
                    "precision": policy, **info})
        write_manifest(tmp, manifest)
    return manifest
