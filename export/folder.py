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

from ditrt.runtime.errors import InputError
from ditrt.runtime.manifest import MANIFEST_NAME, MAX_MANIFEST_BYTES, FileEntry, Manifest, sha256_file

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
        raise InputError(
            f"output {str(out)!r} is the current folder or one of its parents ({str(target)!r}); "
            "write the engine folder to a new folder, e.g. -o engines/NAME"
        )
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
    if not (
        isinstance(manifest, dict)
        and type(manifest.get("schema_version")) is int
        and isinstance(manifest.get("files"), dict)
    ):
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
        raise InputError(
            f"output {str(out)!r} is a symbolic link; dit-export replaces only engine folders, "
            "never a link or what it points to; choose another output"
        )
    if not target.is_dir():
        raise InputError(
            f"output {str(out)!r} already exists and is a file, not an engine folder; choose another output"
        )
    if not is_engine_folder(target) and any(target.iterdir()):
        raise InputError(
            f"output folder {str(out)!r} already exists and is not an engine folder (no dit-export "
            "manifest.json listing every file in it); choose another output: --force replaces only "
            "engine folders"
        )
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
            raise InputError(
                f"cannot create the engine folder beside {str(target)!r}: {e.strerror or e}; "
                "choose an output in a folder you can write"
            ) from None
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
    check_replaceable(
        target, out, force
    )  # again, as late as possible: the output may have appeared meanwhile
    if not force or not os.path.lexists(target):
        try:
            os.rename(
                tmp, target
            )  # never over a file or a non-empty folder (an empty one goes, losing nothing)
        except OSError:
            raise InputError(
                f"output {str(out)!r} appeared while exporting; nothing of it was replaced, and this "
                "export was not written: choose another output"
            ) from None
        (
            target / OWNER_MARKER
        ).unlink()  # after the rename: a kill in between leaves a whole folder, and a marker
        return
    old, lock = claimed_folder(target, "old", staging=tmp.name)
    try:
        kept = old / target.name
        os.replace(target, kept)
        if not is_engine_folder(kept) and any(
            kept.iterdir()
        ):  # changed since the check (a file saved in it): it is the user's, put back
            os.replace(kept, target)
            remove_folder(old)
            raise InputError(
                f"output folder {str(out)!r} changed while exporting and is no longer only an engine "
                "folder; it was left as it is and this export was not written"
            )
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
        raise InputError(
            f"an interrupted export left the previous {target.name!r} in {str(kept)!r}, and "
            f"{str(target)!r} exists again; move one of them away by hand"
        )
    try:
        os.replace(kept, target)
    except OSError as e:
        raise InputError(
            f"an interrupted export left the previous {target.name!r} in {str(kept)!r} and it "
            f"cannot be moved back ({e.strerror}); move it back by hand"
        ) from None
    if staged is not None and staged.is_dir() and not staged.is_symlink():
        remove_folder(staged)  # the dead export's unfinished replacement


def file_entries(folder: Path) -> dict[str, FileEntry]:
    """sha256 and size of every file under folder (except the manifest and an export's owner marker), keyed by
    POSIX relative path."""
    return {
        p.relative_to(folder).as_posix(): FileEntry(sha256_file(p), p.stat().st_size)
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != MANIFEST_NAME and p.relative_to(folder).as_posix() != OWNER_MARKER
    }


def write_manifest(folder: Path, manifest: Manifest) -> None:
    (folder / MANIFEST_NAME).write_text(json.dumps(manifest.to_dict(), indent=2) + "\n")
