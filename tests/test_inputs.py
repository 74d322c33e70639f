"""Bad requests through the public entry points (Pipeline.load, pipe(...), Result.save, dit-run): each one is
refused with a project error naming the parameter and what is allowed, before any work and without warnings."""

import json
import os
import signal
import sys
import warnings

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from conftest import run_cli
from ditrt.runtime import InputError, Pipeline
from ditrt.runtime.errors import ManifestError
from ditrt.runtime.cli import main as dit_run


@pytest.fixture(scope="module")
def pipe(digits_engine):
    with Pipeline.load(digits_engine) as p:
        yield p


@pytest.fixture(scope="module")
def text_pipe(text_digits_engine):
    """The text-conditioned demo (text encoder, denoiser, VAE decoder)."""
    with Pipeline.load(text_digits_engine) as p:
        yield p


def cli(*args, cwd):
    """dit-run in-process, as a user calls it; returns click's Result (exit_code, stdout, stderr)."""
    old = os.getcwd()
    os.chdir(cwd)
    try:
        return CliRunner().invoke(dit_run, [str(a) for a in args])
    finally:
        os.chdir(old)


def one_line(r, code=2):
    """The only stderr line of a dit-run that exited with `code`."""
    lines = r.stderr.strip().splitlines()
    assert r.exit_code == code and len(lines) == 1 and "Traceback" not in r.output, (r.exit_code, r.output)
    return lines[0]


def no_runtime_warnings(record):
    bad = [str(w.message) for w in record if issubclass(w.category, RuntimeWarning)]
    assert not bad, bad


# --- prompts (1, 7) ---

@pytest.mark.parametrize("kwargs,fragment", [
    ({"prompt": "a \udcff"}, "prompt holds characters that are not valid Unicode (lone surrogate at index 2"),
    ({"prompt": "\ud800"}, "prompt holds characters that are not valid Unicode (lone surrogate at index 0"),
    ({"prompt": b"abc"}, "prompt b'abc' is not allowed: it must be a string (str), not bytes; decode bytes first"),
    ({"prompt": 5}, "prompt 5 is not allowed: it must be a string (str), not int"),
    ({"prompt": "3", "negative_prompt": "x\udcff"}, "negative_prompt holds characters that are not valid Unicode"),
    ({"prompt": "3", "negative_prompt": 5}, "negative_prompt 5 is not allowed: it must be a string (str), not int"),
    ({"prompt": "3", "negative_prompt": b""}, "negative_prompt b'' is not allowed"),
    ({}, "model 'text-digits' needs a prompt (a string)"),
])
def test_bad_prompts(text_pipe, kwargs, fragment):
    with pytest.raises(InputError) as e:
        text_pipe(steps=1, **kwargs)
    assert fragment in str(e.value)


def test_control_characters_in_prompts_are_text(text_pipe, tmp_path):
    """As diffusers: NUL, escapes and emoji are tokenized like any text, and the PNG keeps them."""
    r = text_pipe(prompt="a\x00 3\x1b[31m 🐱", negative_prompt="\x07", steps=1, seed=0)
    (path,) = r.save(tmp_path / "x.png")
    assert Image.open(path).text["parameters"].startswith("a\x00 3\x1b[31m 🐱\nNegative prompt: \x07\n")


def test_cli_prompt_from_undecodable_argv_bytes(text_pipe, tmp_path):
    """A prompt byte that is not UTF-8 reaches Python as a lone surrogate (surrogateescape)."""
    r = run_cli("dit-run", str(text_pipe.folder), "-p", "a \udcff", "--steps", "1", cwd=tmp_path)
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        "error: prompt holds characters that are not valid Unicode (lone surrogate at index 2, e.g. from bytes "
        "that are not UTF-8); give UTF-8 text"], r.stderr
    r = cli(text_pipe.folder, "-p", "3", "-n", "\udcff", cwd=tmp_path)
    assert one_line(r).startswith("error: negative_prompt holds characters that are not valid Unicode")
    assert list(tmp_path.iterdir()) == []


# --- class labels (2) ---

@pytest.mark.parametrize("label", ["²", "٣", "\udcff", "+1", "1.0", ""])
def test_cli_class_labels_that_are_not_ascii_integers(digits_engine, tmp_path, label):
    line = one_line(cli(digits_engine, "-c", label, cwd=tmp_path))
    assert line.startswith(f"error: class label {label!r} is out of range") and "has classes 0..9" in line


# --- Pipeline.load (3, 8) ---

@pytest.mark.parametrize("kwargs,fragment", [
    ({"folder": None}, "engine folder None is not a path; give a str or os.PathLike"),
    ({"folder": 5}, "engine folder 5 is not a path"),
    ({"folder": b"engines"}, "engine folder b'engines' is not a path"),
    ({"folder": "a\x00b"}, "engine folder 'a\\x00b' is not a usable path"),
    ({"folder": ""}, "engine folder '' is not a usable path"),
    ({"threads": "2"}, "threads '2' is not allowed; use an integer in 1..1024"),
    ({"threads": -1}, "threads -1 is not allowed"),
    ({"threads": 0}, "threads 0 is not allowed"),
    ({"threads": 1.5}, "threads 1.5 is not allowed"),
    ({"threads": True}, "threads True is not allowed"),
    ({"threads": 10**6}, "threads 1000000 is not allowed"),
    ({"backend": "cuda"}, "unknown backend 'cuda'; choose from onnxruntime, tensorrt"),
    ({"backend": 5}, "unknown backend 5"),
    ({"verify": "yes"}, "verify 'yes' is not allowed; use True or False"),
    ({"verify": None}, "verify None is not allowed"),
])
def test_bad_load_arguments(digits_engine, kwargs, fragment):
    kwargs = {"folder": digits_engine, **kwargs}
    with pytest.raises(InputError) as e:
        Pipeline.load(kwargs.pop("folder"), **kwargs)
    assert fragment in str(e.value)


def test_load_accepts_numpy_threads(digits_engine):
    with Pipeline.load(digits_engine, threads=np.int64(1), verify=np.bool_(False)) as p:
        assert p(class_label=1, steps=1).images[0].shape == (16, 16)


def test_engine_path_that_is_a_file(digits_engine, tmp_path):
    path = digits_engine / "manifest.json"
    expected = f"engine folder {str(path)!r} is a file, not a folder; give the folder dit-export wrote"
    with pytest.raises(ManifestError) as e:
        Pipeline.load(path)
    assert str(e.value) == expected
    assert one_line(cli(path, "-c", "1", cwd=tmp_path)) == f"error: {expected}"


def test_cli_threads(digits_engine, tmp_path):
    assert one_line(cli(digits_engine, "-c", "1", "--threads", "-1", cwd=tmp_path)) == \
        "error: threads -1 is not allowed; use an integer in 1..1024"
    assert list(tmp_path.iterdir()) == []


# --- numbers (4) and other argument types ---

def test_numpy_scalars_mean_their_numbers(pipe):
    as_numpy = pipe(class_label=np.int64(7), guidance=np.float32(3), steps=np.int64(2), seed=np.int64(5),
                    batch_size=np.int32(2), width=np.int64(16), height=np.uint16(16), shift=np.float32(2))
    plain = pipe(class_label=7, guidance=3.0, steps=2, seed=5, batch_size=2, width=16, height=16, shift=2.0)
    np.testing.assert_array_equal(as_numpy.pixels, plain.pixels)
    assert as_numpy.parameters == plain.parameters and as_numpy.seeds == [5, 6]
    assert all(type(s) is int for s in as_numpy.seeds)
    assert 0 <= pipe(class_label=1, steps=1, seed=np.int64(-1)).seeds[0] < 2**31  # negative: random, as for int


@pytest.mark.parametrize("kwargs,fragment", [
    ({"steps": "5"}, "steps '5' is not allowed; use an integer in 1..1000"),
    ({"steps": True}, "steps True is not allowed"),
    ({"steps": np.float64(2)}, "steps 2.0 is not allowed"),
    ({"seed": 1.5}, "seed 1.5 is not allowed; use an integer in"),
    ({"seed": "3"}, "seed '3' is not allowed"),
    ({"seed": np.True_}, "seed True is not allowed"),
    ({"seed": 2**64}, "seed 18446744073709551616 is not allowed"),
    ({"width": "64"}, "width '64' is not allowed; use an integer in 1..16384"),
    ({"width": 16.0}, "width 16.0 is not allowed"),
    ({"height": False}, "height False is not allowed"),
    ({"batch_size": 0}, "batch_size 0 is not allowed; use an integer in 1..64"),
    ({"batch_size": "2"}, "batch_size '2' is not allowed"),
    ({"batch_size": np.int64(65)}, "batch_size 65 is not allowed"),
    ({"guidance": True}, "guidance True is not allowed; use a finite number in 0..100"),
    ({"guidance": "3"}, "guidance '3' is not allowed"),
    ({"guidance": 10**400}, "guidance 1000000000"),  # compared exactly: no OverflowError from float()
    ({"guidance": 1e6}, "guidance 1000000.0 is not allowed"),
    ({"guidance": np.float32("inf")}, "guidance inf is not allowed"),
    ({"shift": 0}, "shift 0 is not allowed; use a finite number in 0.001..1000"),
    ({"shift": 1e-300}, "shift 1e-300 is not allowed"),  # a schedule of zeros
    ({"shift": 1e300}, "shift 1e+300 is not allowed"),
    ({"shift": float("nan")}, "shift nan is not allowed"),
    ({"shift": True}, "shift True is not allowed"),
    ({"shift": "3"}, "shift '3' is not allowed"),
    ({"sampler": 5}, "sampler 5 is not allowed; give a name: euler,"),
    ({"sampler": ["euler"]}, "sampler ['euler'] is not allowed"),
    ({"on_step": "x"}, "on_step 'x' is not callable; give a function f(step, steps) or None"),
    ({"latents": [0.0]}, "latents of list are not allowed"),
    ({"max_sequence_length": np.int64(5)}, "max_sequence_length 5 cannot be chosen for this engine folder"),
    ({"class_label": True}, "class label True is not an integer or a class name; model 'digits' has classes 0..9"),
    ({"class_label": 7.0}, "class label 7.0 is not an integer or a class name"),
    ({"class_label": [7]}, "class label [7] is not an integer or a class name"),
    ({"class_label": np.int64(10)}, "class label 10 is out of range; model 'digits' has classes 0..9"),
    ({"class_label": None, "prompt": "a 7"}, "is class-conditional: give a class label, not a prompt (prompt was"),
    ({"class_label": None, "negative_prompt": ""}, "not a prompt (negative_prompt was given)"),
])
def test_bad_arguments(pipe, kwargs, fragment):
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        with pytest.raises(InputError) as e:
            pipe(**{"class_label": 1, "steps": 1, **kwargs})
    assert fragment in str(e.value)
    no_runtime_warnings(record)


# --- non-finite values (5) ---

@pytest.mark.parametrize("magnitude,stage", [
    (1e30, None),  # finite all the way, even at the largest guidance
    (1e37, "the VAE decoder (from finite latents) produced non-finite values"),  # finite latents the VAE overflows
    (3e38, "the denoiser produced non-finite values"),  # refused before the VAE sees it
])
def test_huge_latents_give_a_finite_image_or_one_error(text_pipe, magnitude, stage):
    latents = np.full((1, 8, 4, 4), magnitude, np.float32)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        try:
            r = text_pipe(prompt="a 3", latents=latents, guidance=100, steps=2)
            assert stage is None and np.isfinite(r.pixels).all()
        except InputError as e:
            assert stage is not None and str(e).startswith(stage), str(e)
            assert "guidance 100, 2 steps" in str(e) and "initial latents of ordinary magnitude" in str(e)
    no_runtime_warnings(record)


def test_largest_guidance_without_warnings(pipe):
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        for latents in (None, np.full((1, 1, 16, 16), 1e30, np.float32), np.full((1, 1, 16, 16), -3e38, np.float32)):
            try:
                assert np.isfinite(pipe(class_label=3, guidance=100, steps=3, latents=latents).pixels).all()
            except InputError as e:
                assert "non-finite values" in str(e)
    no_runtime_warnings(record)


# --- output paths (6) ---

def test_output_that_is_a_folder_is_refused_before_generating(digits_engine, tmp_path):
    (tmp_path / "out.png").mkdir()
    line = one_line(cli(digits_engine, "-c", "1", "-o", "out.png", "--force", cwd=tmp_path))
    assert line == "error: output 'out.png' is a folder; give a file name ending in .png"
    (tmp_path / "b-0001.png").mkdir()
    assert "output 'b-0001.png' is a folder" in one_line(cli(digits_engine, "-c", "1", "-b", "2", "-o", "b.png",
                                                             "--force", cwd=tmp_path))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b-0001.png", "out.png"]


def test_output_folder_that_cannot_be_written(pipe, tmp_path):
    r = pipe(class_label=1, steps=1)
    (tmp_path / "somefile.txt").write_text("x")
    with pytest.raises(InputError, match="output folder '.*somefile.txt' is a file, not a folder"):
        r.save(tmp_path / "somefile.txt" / "x.png")
    if os.path.isdir("/proc"):
        with pytest.raises(InputError, match="output folder '/proc' is not writable"):
            r.save("/proc/x.png")
    if os.geteuid() != 0:  # root writes into a read-only folder anyway
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        with pytest.raises(InputError, match="output folder '.*locked' is not writable .Permission denied"):
            r.save(locked / "x.png")
    for bad, fragment in ((None, "output None is not a path"), ("a\x00.png", "is not a usable path")):
        with pytest.raises(InputError, match=fragment):
            r.save(bad)


def test_cli_unwritable_output_fails_before_loading(digits_engine, tmp_path):
    (tmp_path / "f").write_text("x")
    assert one_line(cli(digits_engine, "-c", "1", "-o", "f/x.png", cwd=tmp_path)) == \
        "error: output folder 'f' is a file, not a folder"


@pytest.mark.skipif(sys.platform == "win32", reason="RLIMIT_FSIZE")
def test_write_failure_is_an_input_error_and_leaves_nothing(pipe, tmp_path):
    """A real OSError while writing (EFBIG: a file-size limit below a PNG's size) after the checks passed."""
    import resource

    r = pipe(class_label=2, steps=1, batch_size=2)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # else the kernel kills the process
    resource.setrlimit(resource.RLIMIT_FSIZE, (20, hard))
    try:
        with pytest.raises(InputError, match=r"cannot write '.*x-0000.png' \(File too large\)"):
            r.save(tmp_path / "x.png")
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, handler)
    assert list(tmp_path.iterdir()) == []


# --- random weights (9) ---

def test_random_weights_are_reported(tmp_path):
    from ditrt.export.folder import export_model

    export_model("digits", tmp_path / "rand", random_weights=True)
    expected = ("model 'digits' has random weights (exported with --random-weights): its images are noise, "
                "for benchmarking only")
    with Pipeline.load(tmp_path / "rand") as p:
        assert p(class_label=1, steps=1).warnings == (expected,)
    r = cli(tmp_path / "rand", "-c", "1", "--steps", "1", "--json", cwd=tmp_path)
    assert r.exit_code == 0 and r.stderr.strip() == f"warning: {expected}", r.output
    assert json.loads(r.stdout)["warnings"] == [expected]


def test_trained_weights_are_not_reported(pipe):
    assert pipe(class_label=1, steps=1).warnings == ()


# --- usage errors (10) ---

@pytest.mark.parametrize("args,fragments", [  # click's own wording, which varies a little between versions
    (["--steps", "abc"], ["Invalid value for '--steps'", "'abc' is not a valid integer"]),
    (["-g", "x"], ["Invalid value for '-g' / '--guidance' / '--cfg-scale'", "'x' is not a valid float"]),
    (["--bogus"], ["No such option", "--bogus"]),
    (["-c"], ["Option '-c' requires an argument"]),
])
def test_usage_errors_are_one_line(digits_engine, tmp_path, args, fragments):
    line = one_line(cli(digits_engine, *args, cwd=tmp_path))
    assert line.startswith("error: ") and all(f in line for f in fragments), line


def test_usage_error_without_arguments_and_help(tmp_path):
    assert one_line(cli(cwd=tmp_path)) == "error: Missing argument 'ENGINES'."
    r = cli("--help", cwd=tmp_path)
    assert r.exit_code == 0 and r.stdout.startswith("Usage:") and not r.stderr


def test_interrupt_is_one_line(digits_engine, tmp_path, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(Pipeline, "load", interrupted)
    assert one_line(cli(digits_engine, "-c", "1", cwd=tmp_path), code=130) == "error: interrupted"
    assert list(tmp_path.iterdir()) == []
