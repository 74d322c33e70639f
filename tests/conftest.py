import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def digits_engine(tmp_path_factory) -> Path:
    """The built-in digits model exported once per test session (read-only for tests)."""
    from ditrt.export.folder import export_model

    out = tmp_path_factory.mktemp("engines") / "digits"
    export_model("digits", out)
    return out


@pytest.fixture(scope="session")
def text_digits_engine(tmp_path_factory) -> Path:
    """The built-in text-digits model (a small Sana pipeline) exported once per test session (read-only)."""
    from ditrt.export.folder import export_model

    out = tmp_path_factory.mktemp("engines") / "text-digits"
    export_model("text-digits", out)
    return out


def pytest_addoption(parser):
    parser.addoption("--fuzz-seconds", type=float, default=30.0,
                     help="Wall-clock budget of the fuzz tests in tests/test_fuzz.py, shared among them (CI: 30).")


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
    return subprocess.run([str(scripts / args[0]), *args[1:]], cwd=cwd, capture_output=True, text=True, env=env,
                          timeout=600)


def one_line_error(r, *fragments):
    """A CLI run that failed with exit code 2 and one stderr line containing every fragment."""
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    for f in fragments:
        assert f in lines[0], lines[0]


def randomize(model, seed: int = 0, buffers: bool = False):
    """diffusers zero-inits some layers; random values everywhere (and in stored buffers such as SD3's position
    table, with buffers=True) make every weight count."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in [*model.parameters(), *(model.buffers() if buffers else ())]:
            t.copy_(torch.randn(t.shape, generator=g) * 0.1)
    return model.eval()
