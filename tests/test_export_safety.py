"""dit-export never deletes what is not an engine folder, cleans up after interrupted exports (however they died),
writes folders with the user's umask and the same bytes wherever it runs, and answers --help/--list without torch.
Usage errors, a missing export extra and interrupts are one line each."""

import hashlib
import json
import os
import signal
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from ditrt.export import export_model
from ditrt.export.cli import main as export_cli
from ditrt.export.exporter import provenance
from ditrt.runtime.errors import InputError
from ditrt.runtime.manifest import SCHEMA_VERSION

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = Path(sys.executable).parent


def invoke(*args: str):
    return CliRunner().invoke(export_cli, list(args))


def one_line(r, code: int, *fragments: str) -> str:
    """A CliRunner result that exited with code and wrote one stderr line holding every fragment (no traceback)."""
    assert r.exit_code == code, (r.exit_code, r.output, r.exception)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.output, r.output
    for f in fragments:
        assert f in lines[0], lines[0]
    return lines[0]


def tree(folder: Path) -> dict[str, bytes]:
    return {
        p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }


def fake_engine(folder: Path, version=1) -> dict[str, bytes]:
    """An engine folder as an older dit-export wrote it (another schema version): --force may replace it."""
    (folder / "denoiser").mkdir(parents=True)
    (folder / "denoiser" / "model.onnx").write_bytes(b"old engine")
    files = {"denoiser/model.onnx": {"sha256": "0" * 64, "bytes": 10}}
    (folder / "manifest.json").write_text(
        json.dumps({"schema_version": version, "model": "old", "files": files})
    )
    return tree(folder)


# --force replaces engine folders only


def _user_folder(path: Path) -> None:
    path.mkdir()
    (path / "thesis.tex").write_text("years of work")


def _not_our_manifest(path: Path) -> None:
    path.mkdir()
    (path / "manifest.json").write_text('{"name": "a web app manifest"}')


def _broken_manifest(path: Path) -> None:
    path.mkdir()
    (path / "manifest.json").write_text('{"schema_version": ')


def _fifo_manifest(path: Path) -> None:
    path.mkdir()
    os.mkfifo(path / "manifest.json")  # reading it would block forever


def _engine_holding_user_files(path: Path) -> None:
    fake_engine(path)
    (path / "generated.png").write_bytes(b"a user's image saved beside the engines")


def _file(path: Path) -> None:
    path.write_text("a file")


def _link_to_engine(path: Path) -> None:
    fake_engine(path.parent / "real-engine")
    path.symlink_to("real-engine")


@pytest.mark.parametrize(
    "make,fragment",
    [
        (_user_folder, "is not an engine folder"),
        (_not_our_manifest, "is not an engine folder"),
        (_broken_manifest, "is not an engine folder"),
        (_fifo_manifest, "is not an engine folder"),
        (_engine_holding_user_files, "is not an engine folder"),
        (_file, "is a file"),
        (_link_to_engine, "is a symbolic link"),
    ],
    ids=[
        "user-folder",
        "other-manifest",
        "broken-manifest",
        "fifo-manifest",
        "user-files",
        "file",
        "symlink",
    ],
)
def test_force_refuses_what_is_not_an_engine_folder(tmp_path, monkeypatch, make, fragment):
    monkeypatch.chdir(tmp_path)
    make(tmp_path / "out")
    before = {p: (p.read_bytes() if p.is_file() else None) for p in tmp_path.rglob("*")}
    for force in (["--force"], []):
        one_line(invoke("digits", "-o", "out", *force), 2, "'out'", fragment)
    assert {
        p: (p.read_bytes() if p.is_file() else None) for p in tmp_path.rglob("*")
    } == before  # no temp folder


def test_force_replaces_an_engine_folder_of_any_schema_version(tmp_path):
    out = tmp_path / "eng"
    fake_engine(out, version=1)
    export_model("digits", out, force=True)
    assert set(tree(out)) == {"denoiser/model.onnx", "manifest.json"}
    assert json.loads((out / "manifest.json").read_text())["schema_version"] == SCHEMA_VERSION
    assert [p.name for p in tmp_path.iterdir()] == ["eng"]


def test_empty_folder_is_replaced_and_modes_follow_the_umask(tmp_path):
    out = tmp_path / "eng"
    out.mkdir()  # an empty folder is harmless to replace (with --force; without it, it "already exists")
    with pytest.raises(InputError, match="already exists; pass --force"):
        export_model("digits", out)
    previous = os.umask(0o027)
    try:
        export_model("digits", out, force=True)
    finally:
        os.umask(previous)
    modes = {p.relative_to(tmp_path).as_posix(): p.stat().st_mode & 0o777 for p in [out, *out.rglob("*")]}
    assert modes == {
        "eng": 0o750,
        "eng/denoiser": 0o750,
        "eng/denoiser/model.onnx": 0o640,
        "eng/manifest.json": 0o640,
    }


@pytest.mark.parametrize("output", [".", "..", "/", "../w", "{cwd}", "sub/../.."])
def test_current_folder_and_its_parents_are_refused_up_front(tmp_path, monkeypatch, output):
    work = tmp_path / "w"
    (work / "sub").mkdir(parents=True)
    monkeypatch.chdir(work)
    output = output.format(cwd=work)
    for force in (["--force"], []):
        one_line(
            invoke("digits", "-o", output, *force),
            2,
            f"output {output!r} is the current folder or one of its parents",
        )
    assert [p.name for p in tmp_path.rglob("*")] == ["w", "sub"]


# interrupted exports

STAGE_AND_WAIT = """
import sys, time
from ditrt.export.folder import staging_folder
with staging_folder(sys.argv[1]) as tmp:
    (tmp / "half.onnx").write_bytes(b"half")
    print(tmp, flush=True)
    time.sleep(120)
"""


def test_staging_folders_of_dead_exports_are_removed_and_live_ones_kept(tmp_path):
    out = tmp_path / "eng"
    decoy = tmp_path / ".eng.tmp-mine"  # our naming, but no owner marker: not ours, kept
    decoy.mkdir()
    (decoy / "keep").write_text("x")
    child = subprocess.Popen(
        [sys.executable, "-c", STAGE_AND_WAIT, str(out)], stdout=subprocess.PIPE, text=True
    )
    try:
        staged = Path(child.stdout.readline().strip())
        assert (
            staged.parent == tmp_path
            and staged.name.startswith(".eng.tmp-")
            and (staged / "half.onnx").is_file()
        )
        export_model("digits", out)  # while that export lives, its staging folder is left alone
        assert (staged / "half.onnx").is_file()
    finally:
        child.kill()  # SIGKILL: no cleanup runs in the child
        child.wait()
        child.stdout.close()
    assert staged.is_dir()
    with pytest.raises(InputError, match="already exists"):  # the next export to eng cleans up first
        export_model("digits", out)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".eng.tmp-mine", "eng"]
    assert (decoy / "keep").read_text() == "x"


CRASH_IN_REPLACE = """
import os, signal, sys
from ditrt.export import folder

def crash(*args):
    os.kill(os.getpid(), signal.SIGKILL)

if sys.argv[2] == "between-renames":
    rename, calls = os.replace, []
    def replace(a, b):
        calls.append(a)
        if len(calls) == 2:
            crash()
        rename(a, b)
    folder.os.replace = replace
else:
    folder.remove_folder = crash
with folder.staging_folder(sys.argv[1], force=True) as tmp:
    (tmp / "manifest.json").write_text('{"schema_version": 2, "model": "new"}')
"""


@pytest.mark.parametrize("when", ["between-renames", "before-old-removed"])
def test_replace_killed_midway_is_recovered_by_the_next_export(tmp_path, when):
    out = tmp_path / "eng"
    old = fake_engine(out)
    r = subprocess.run(
        [sys.executable, "-c", CRASH_IN_REPLACE, str(out), when], capture_output=True, timeout=60
    )
    assert r.returncode == -signal.SIGKILL, r.stderr
    left = sorted(p.name.split("-")[0] for p in tmp_path.iterdir())
    assert left == ([".eng.old", ".eng.tmp"] if when == "between-renames" else [".eng.old", "eng"])
    with pytest.raises(InputError, match="already exists"):  # recovery runs before the output is checked
        export_model("digits", out)
    assert [p.name for p in tmp_path.iterdir()] == ["eng"]
    if when == "between-renames":  # the previous folder is back
        assert tree(out) == old
    else:  # the replacement had completed: only the previous folder's removal was left to do
        assert json.loads((out / "manifest.json").read_text())["model"] == "new"


def test_interrupt_is_one_line_exit_130_and_leaves_nothing(tmp_path, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("ditrt.export.build.export_onnx", interrupted)
    r = invoke("digits")  # the default output, engines/digits: the engines/ made for it goes too
    assert one_line(r, 130) == "error: interrupted; nothing was written"
    assert list(tmp_path.iterdir()) == []


def test_sigterm_during_export_cleans_up_like_ctrl_c(tmp_path):
    child = subprocess.Popen(
        [str(SCRIPTS / "dit-export"), "digits", "-o", "eng"],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 120
    while (
        not list(tmp_path.glob(".eng.tmp-*/denoiser"))
        and child.poll() is None
        and time.monotonic() < deadline
    ):
        time.sleep(0.01)  # until the export is writing its engines
    child.send_signal(signal.SIGTERM)
    out, err = child.communicate(timeout=60)
    assert child.returncode == 130 and err.strip() == "error: interrupted; nothing was written", (out, err)
    assert list(tmp_path.iterdir()) == []


def test_leftovers_of_the_narrowest_kill_windows_are_cleaned_up(tmp_path):
    """A kill between the staging folder's mkdir and its marker leaves it empty; one while the marker is being
    made leaves only that; one right after the final rename leaves the marker in the finished folder."""
    from ditrt.export.folder import NEW_MARKER, OWNER_MARKER

    out = tmp_path / "eng"
    export_model("digits", out)
    (out / OWNER_MARKER).write_text('{"pid": 1}')  # unlocked: its export is gone
    (tmp_path / ".eng.tmp-empty").mkdir()
    (tmp_path / ".eng.tmp-marking").mkdir()
    (tmp_path / ".eng.tmp-marking" / NEW_MARKER).write_text('{"pid": 1}')
    with pytest.raises(InputError, match="already exists"):  # the next export to eng cleans up first
        export_model("digits", out)
    assert [p.name for p in tmp_path.iterdir()] == ["eng"] and not (out / OWNER_MARKER).exists()


def test_interrupt_while_importing_is_one_line(tmp_path):
    child = subprocess.Popen(
        [str(SCRIPTS / "dit-export"), "digits", "-o", "eng"],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    time.sleep(1.0)  # past the CLI start (0.2-0.5 s) but inside the imports of torch and onnx (seconds)
    child.send_signal(signal.SIGINT)
    out, err = child.communicate(timeout=60)
    assert child.returncode == 130 and err.strip() == "error: interrupted; nothing was written", (out, err)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("force", [False, True])
def test_output_made_by_the_user_during_the_final_rename_is_never_replaced(tmp_path, monkeypatch, force):
    """The race a late check cannot close: the user writes into the output right after dit-export's last look."""
    from ditrt.export import folder as folder_mod

    out = tmp_path / "eng"
    if force:
        fake_engine(out)
    real_check = folder_mod.check_replaceable

    def user_writes_right_after_the_check(*args):
        real_check(*args)
        if list(tmp_path.glob(".eng.tmp-*/manifest.json")):  # the last check, just before the rename
            out.mkdir(exist_ok=True)
            (out / "thesis.tex").write_text("years of work")

    monkeypatch.setattr(folder_mod, "check_replaceable", user_writes_right_after_the_check)
    with pytest.raises(InputError, match="appeared while exporting|changed while exporting"):
        with folder_mod.staging_folder(out, force=force) as tmp:
            (tmp / "manifest.json").write_text('{"schema_version": 2, "files": {}}')
    assert (out / "thesis.tex").read_text() == "years of work"
    assert [p.name for p in tmp_path.iterdir()] == ["eng"]  # no staging or .old folder left


# a real dit-export killed at several moments: each time the target is absent or a complete, valid engine folder,
# and the next export to it leaves nothing else behind
MOMENTS = {
    "staging": ".eng.tmp-*",
    "engines": ".eng.tmp-*/denoiser/model.onnx",
    "manifest": ".eng.tmp-*/manifest.json",
}


@pytest.mark.slow
@pytest.mark.parametrize(
    "moment,sig",
    [
        ("staging", signal.SIGKILL),
        ("engines", signal.SIGKILL),
        ("manifest", signal.SIGKILL),
        ("manifest", signal.SIGTERM),
    ],
)
def test_killed_export_leaves_the_target_absent_or_valid(tmp_path, moment, sig):
    from ditrt.runtime.manifest import load_manifest

    child = subprocess.Popen(
        [str(SCRIPTS / "dit-export"), "digits", "-o", "eng"],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob(MOMENTS[moment])) and child.poll() is None and time.monotonic() < deadline:
        time.sleep(0.002)
    child.send_signal(sig)
    _, err = child.communicate(timeout=60)
    assert "Traceback" not in err, err
    out = tmp_path / "eng"
    if out.exists():  # the export finished before the signal landed: the folder must be whole
        assert load_manifest(out).model == "digits"
    export_model("digits", out, force=out.exists())  # the next export cleans up what the killed one left
    assert [p.name for p in tmp_path.iterdir()] == ["eng"] and load_manifest(out).model == "digits"


# reproducible engine folders


def test_same_export_gives_identical_bytes_anywhere(tmp_path, monkeypatch):
    digests = []
    for where in ("a", "b/deeper"):
        (tmp_path / where).mkdir(parents=True)
        monkeypatch.chdir(tmp_path / where)
        export_model("digits", "eng", command="dit-export digits -o eng")
        digests.append({k: hashlib.sha256(v).hexdigest() for k, v in tree(tmp_path / where / "eng").items()})
    assert digests[0] == digests[1] and set(digests[0]) == {"denoiser/model.onnx", "manifest.json"}
    manifest = json.loads((tmp_path / "a" / "eng" / "manifest.json").read_text())
    assert "created" not in manifest["export"] and manifest["export"]["source"] == "digits"
    onnx_bytes = (tmp_path / "a" / "eng" / "denoiser" / "model.onnx").read_bytes()
    for leak in (str(ROOT), sysconfig.get_paths()["purelib"], str(tmp_path), 'File "', "stack_trace"):
        assert leak.encode() not in onnx_bytes, leak


def test_created_comes_from_source_date_epoch_only(monkeypatch):
    monkeypatch.delenv("SOURCE_DATE_EPOCH", raising=False)
    assert "created" not in provenance(18)
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1000000000")
    assert provenance(18)["created"] == "2001-09-09T01:46:40+00:00"
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "yesterday")
    with pytest.raises(InputError, match="SOURCE_DATE_EPOCH 'yesterday' is not a number"):
        provenance(18)


# a CLI without torch for --help/--list; one-line usage errors

RUN_CLI = """
import sys
{block}
sys.argv = ["dit-export", *{args!r}]
from ditrt.export.cli import main
code = 0
try:
    main()
except SystemExit as e:
    code = e.code
heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "onnx", "onnxscript", "transformers"))
print("heavy:", heavy, file=sys.stderr)
sys.exit(code)
"""


@pytest.mark.parametrize("args", [["--help"], ["--list"]])
def test_help_and_list_import_no_torch(args):
    code = RUN_CLI.format(block="", args=args)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stderr.strip() == "heavy: []", r.stderr
    assert r.stdout.startswith("digits " if args == ["--list"] else "Usage: dit-export")


def test_export_without_the_export_extra_says_what_to_install(tmp_path):
    code = RUN_CLI.format(
        block='sys.modules["torch"] = None  # as if torch were not installed', args=["digits"]
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    assert (
        r.stderr.splitlines()[0]
        == "error: dit-export needs the export extra: pip install 'ditrt[export]' (missing module: torch)"
    )
    assert "Traceback" not in r.stderr and list(tmp_path.iterdir()) == []


def test_builtin_names_without_torch_match_the_presets():
    from ditrt.export.catalog import MODELS
    from ditrt.export.presets import PRESETS

    assert MODELS == {name: p.description for name, p in PRESETS.items()}


@pytest.mark.parametrize(
    "args,line",
    [
        (
            ["digits", "--opset", "16"],
            "error: Invalid value for '--opset': 16 is not in the range 17<=x<=23.",
        ),
        (
            ["digits", "--seed", "abc"],
            "error: Invalid value for '--seed': 'abc' is not a valid integer range.",
        ),
        (
            ["digits", "--lowering", "fast"],
            "error: Invalid value for '--lowering': 'fast' is not one of 'portable', 'plugin'.",
        ),
        (["--zzz"], "error: No such option '--zzz'."),
        (["digits", "--seed"], "error: Option '--seed' requires an argument."),
        ([], "error: missing MODEL; see `dit-export --list` for the built-in models"),
        (
            ["digits", "--seed", str(2**64)],
            f"error: Invalid value for '--seed': {2**64} is not in the range 0<=x<={2**63 - 1}.",
        ),
        (["digits", "-W", "0"], "error: Invalid value for '-W' / '--width': 0 is not in the range x>=1."),
        (
            ["digits", "-o", ""],
            "error: Invalid value for '--output': must not be empty; leave --output out for engines/MODEL",
        ),
    ],
)
def test_usage_errors_are_one_line(tmp_path, monkeypatch, args, line):
    monkeypatch.chdir(tmp_path)
    assert one_line(invoke(*args), 2) == line
    assert list(tmp_path.iterdir()) == []
