import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def exported_once(name: str, tmp_path_factory, folder: str | None = None, **options) -> Path:
    """The built-in model `name` exported once per test run: the pytest-xdist workers of a run share the
    folder (the first to ask exports it while the others wait), instead of one export per worker."""
    from filelock import FileLock  # a dependency of torch

    from ditrt.export import export_model

    base = tmp_path_factory.getbasetemp()
    run = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base  # xdist: pytest-N/, one per run
    out = run / "shared-engines" / (folder or name)
    out.parent.mkdir(exist_ok=True)
    with FileLock(f"{out}.lock"):
        if not (out / "manifest.json").is_file():
            export_model(name, out, **options)
    return out


@pytest.fixture(scope="session")
def digits_engine(tmp_path_factory) -> Path:
    """The built-in digits model exported once per test run (read-only for tests)."""
    return exported_once("digits", tmp_path_factory)


@pytest.fixture(scope="session")
def random_digits_engine(tmp_path_factory) -> Path:
    """digits with seeded random weights (dit-export digits --random-weights --seed 1), once per run."""
    return exported_once("digits", tmp_path_factory, "digits-random", random_weights=True, seed=1)


@pytest.fixture(scope="session")
def text_digits_engine(tmp_path_factory) -> Path:
    """The built-in text-digits model (a small Sana pipeline) exported once per test run (read-only)."""
    return exported_once("text-digits", tmp_path_factory)


def pytest_collection_modifyitems(config, items):
    """Under pytest -n, slow tests first (the order is kept otherwise): the longest work starts early instead
    of leaving one worker busy at the end while the other idles."""
    if hasattr(config, "workerinput"):  # an xdist worker; every worker sorts its identical collection alike
        items.sort(key=lambda item: item.get_closest_marker("slow") is None)


def pytest_addoption(parser):
    parser.addoption(
        "--fuzz-seconds",
        type=float,
        default=30.0,
        help="Wall-clock budget of the fuzz tests in tests/test_fuzz.py, shared among them (CI: 30).",
    )


@pytest.fixture(scope="session")
def digit_classifier():
    """The judge of the demo models: an SVM fitted on the real 16×16 digits (held-out accuracy checked)."""
    from sklearn.model_selection import train_test_split
    from sklearn.svm import SVC

    from ditrt.export.demos import digits_images

    x, y = digits_images()
    x = x.reshape(len(x), -1)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.25, random_state=0, stratify=y)
    held_out = SVC(gamma="scale").fit(x_tr, y_tr).score(x_te, y_te)
    assert held_out >= 0.97, f"the judge itself is weak: {held_out:.3f} on held-out real digits"
    return SVC(gamma="scale").fit(x, y)


@pytest.fixture
def engine_copy(digits_engine, tmp_path) -> Path:
    """A private copy of the digits engine folder that a test may damage."""
    dst = tmp_path / "digits"
    shutil.copytree(digits_engine, dst)
    return dst


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run a console script the way a user does, in a subprocess."""
    scripts = Path(sys.executable).parent
    env = dict(os.environ, COLUMNS="120")
    return subprocess.run(
        [str(scripts / args[0]), *args[1:]], cwd=cwd, capture_output=True, text=True, env=env, timeout=600
    )


def run_cli_here(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """The same console script called in this process (click's CliRunner, sys.argv as the script sees it),
    answered as run_cli answers, without a subprocess that imports torch again (about 4 s per dit-export)."""
    from importlib import import_module

    from click.testing import CliRunner

    module = {"dit-export": "ditrt.export.cli", "dit-run": "ditrt.runtime.cli"}[args[0]]
    old, argv = os.getcwd(), sys.argv
    os.chdir(cwd or old)
    sys.argv = list(args)  # as the script sees it (dit-export records its command line in the manifest)
    try:
        main = import_module(module).main
        r = CliRunner().invoke(main, list(args[1:]), env={"COLUMNS": "120"}, prog_name=args[0])
    finally:
        os.chdir(old)
        sys.argv = argv
    return subprocess.CompletedProcess(args, r.exit_code, r.stdout, r.stderr)


def one_line_error(r, *fragments):
    """A CLI run that failed with exit code 2 and one stderr line containing every fragment."""
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    for f in fragments:
        assert f in lines[0], lines[0]
