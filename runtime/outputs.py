"""PNG outputs: every name checked before any work, every file written whole and never over another's.

Images go to new temporary files (random names, O_EXCL: never an existing entry, never through a symlink), then
to their names: with a hard link (or an O_EXCL copy) when nothing may be overwritten, so a file that appears while
a request runs is never replaced; with os.replace when overwriting was asked for.
"""

import os
import re
import secrets
from pathlib import Path

import numpy as np

from .errors import InputError

# a file that must not exist yet: O_EXCL never opens an existing entry nor follows a symlink
NEW_FILE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)


def write_pngs(
    images: list[np.ndarray], parameters: list[str | None], paths: list[Path], overwrite: bool
) -> None:
    """Each image as a PNG at its path (parameters: the PNG text chunk, None for none); all or nothing where the
    outputs are new: if one cannot be written, the others this call created are removed again."""
    staged, created = [], []  # created: (path, inode) this call made, undone on failure
    out = paths[0] if paths else None
    try:  # every image to its temporary file first, so a failure (disk full...) leaves no output changed
        for img, params, out in zip(images, parameters, paths):
            staged.append(_write_png(out.parent, img, params))
        for out, (tmp, inode) in zip(paths, list(staged)):
            if overwrite:
                os.replace(tmp, out)
            else:
                created.append((out, _publish_new(tmp, out, inode)))
                tmp.unlink()
            staged.remove((tmp, inode))
    except BaseException as e:
        for done, inode in created:
            _remove_if_same(done, inode)
        if isinstance(e, FileExistsError):  # another writer got there after output_paths' check
            raise InputError(
                f"output {str(out)!r} already exists; choose another path or allow overwriting (--force)"
            ) from None
        if isinstance(e, OSError):
            raise InputError(
                f"cannot write {str(out)!r} ({e.strerror or e}); free some space or choose "
                "another output path"
            ) from None
        raise
    finally:
        for tmp, _ in staged:
            tmp.unlink(missing_ok=True)


def _new_temp(folder: Path) -> tuple[int, Path]:
    """A new file under a random name in folder, opened for writing. O_EXCL: never an existing entry, never
    through a symlink. Mode 0o666 & ~umask (not mkstemp's 0600), as a plain write would give the PNG."""
    while True:
        tmp = folder / f".dit-run-{secrets.token_hex(8)}.png.tmp"
        try:
            return os.open(tmp, NEW_FILE, 0o666), tmp
        except FileExistsError:
            continue


def _write_png(folder: Path, image: np.ndarray, parameters: str | None) -> tuple[Path, tuple[int, int]]:
    """The PNG in a new temporary file in folder -> (its path, its (device, inode)); nothing left on failure."""
    from PIL import Image, PngImagePlugin

    info = PngImagePlugin.PngInfo()
    if parameters is not None:
        info.add_text("parameters", parameters)
    fd, tmp = _new_temp(folder)
    try:
        with os.fdopen(fd, "wb") as f:
            Image.fromarray(image).save(f, format="PNG", pnginfo=info)
            st = os.fstat(f.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp, (st.st_dev, st.st_ino)


def _publish_new(tmp: Path, out: Path, inode: tuple[int, int]) -> tuple[int, int]:
    """tmp's bytes at out, which must not exist yet (FileExistsError otherwise, a dangling symlink included)
    -> the (device, inode) now at out. A hard link where the filesystem has them, else a copy into a file
    created with O_EXCL: never os.replace, which would overwrite a file that appeared since output_paths."""
    try:
        os.link(tmp, out)
    except FileExistsError:
        raise
    except OSError:  # EPERM, ENOTSUP...: no hard links here; a real failure (no space...) recurs in the copy
        inode = _copy_new(tmp, out)
    return inode


def _copy_new(src: Path, out: Path) -> tuple[int, int]:
    fd = os.open(out, NEW_FILE, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(src.read_bytes())
            st = os.fstat(f.fileno())
    except BaseException:
        out.unlink(missing_ok=True)  # ours: created above with O_EXCL
        raise
    return st.st_dev, st.st_ino


def _remove_if_same(path: Path, inode: tuple[int, int]) -> None:
    """Undo an output this call created, unless something else has replaced it since."""
    try:
        st = os.lstat(path)
        if (st.st_dev, st.st_ino) == inode:
            path.unlink()
    except OSError:
        pass


def output_paths(path: str | os.PathLike, n: int, overwrite: bool = False) -> list[Path]:
    """The files `n` images go to, checked before any work: PNG names in a writable folder, none a folder."""
    out = as_path("output", path)
    _check_output_text(os.fspath(path))  # the text as given: Path("x.png/") drops the slash
    if out.suffix.lower() != ".png":
        raise InputError(f"output {str(out)!r} must end in .png")
    if not out.parent.is_dir():
        exists = "is a file, not a folder" if out.parent.exists() else "does not exist; create it first"
        raise InputError(f"output folder {str(out.parent)!r} {exists}")
    try:  # what save() does, so an unwritable folder fails now rather than after generating
        fd, probe = _new_temp(out.parent)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise InputError(
            f"output folder {str(out.parent)!r} is not writable ({e.strerror or e}); "
            "choose another output path"
        ) from None
    paths = [out] if n == 1 else [out.with_name(f"{out.stem}-{i:04d}{out.suffix}") for i in range(n)]
    if paths:  # the last name is the longest
        _check_name_length(out.parent, paths[-1].name, n)
    folders = [str(p) for p in paths if p.is_dir()]
    if folders:
        raise InputError(f"output {folders[0]!r} is a folder; give a file name ending in .png")
    if (
        not overwrite
    ):  # lexists: a dangling symlink is taken too (writing would replace it or go where it points)
        taken = [str(p) for p in paths if os.path.lexists(p)]
        if taken:
            raise InputError(
                f"output {taken[0]!r} already exists; choose another path or allow overwriting (--force)"
            )
    return paths


def _check_output_text(text: str) -> None:
    """Refuse what a PNG file name cannot be: a folder ("x.png/"), and control characters, which would break the
    one-path-per-line listing of outputs (dit-run's stdout)."""
    if re.search(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]", text):  # C0, C1 and the Unicode line separators
        raise InputError(
            f"output {text!r:.80} holds control characters (a newline, tab, escape...); choose a name "
            "without them"
        )
    last = text
    for sep in {os.sep, os.altsep} - {None}:
        last = last.rsplit(sep, 1)[-1]
    if last in ("", "."):
        raise InputError(f"output {text!r:.80} names a folder; give a file name ending in .png")


def _check_name_length(folder: Path, name: str, n: int) -> None:
    """The longest output name against the folder's file name limit (in bytes), before any work."""
    try:
        limit = os.pathconf(folder, "PC_NAME_MAX")
    except (AttributeError, ValueError, OSError):  # no pathconf (Windows) or no answer for this folder
        limit = 255
    size = len(os.fsencode(name))
    if 0 < limit < size:
        shown = name if len(name) <= 60 else f"{name[:40]}...{name[-12:]}"
        also = " (with the batch index suffix)" if n > 1 else ""
        raise InputError(
            f"output name {shown!r}{also} is {size} bytes; this folder allows file names of at most "
            f"{limit} bytes; choose a shorter name"
        )


def as_path(name: str, value) -> Path:
    """A path the OS can take: str or os.PathLike, without NUL bytes or characters that cannot be encoded."""
    text = os.fspath(value) if isinstance(value, (str, os.PathLike)) else None
    if not isinstance(text, str):
        raise InputError(f"{name} {repr(value)[:60]} is not a path; give a str or os.PathLike")
    try:
        if "\x00" in text or not text:
            raise ValueError
        os.fsencode(text)  # lone surrogates that did not come from undecodable bytes fail here
    except ValueError:
        raise InputError(
            f"{name} {text!r:.80} is not a usable path (empty, a NUL byte, or characters that are not "
            "valid Unicode)"
        ) from None
    return Path(text)
