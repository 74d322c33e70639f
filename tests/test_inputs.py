"""Bad requests through the public entry points (Pipeline.load, pipe(...), Result.save, dit-run): each one is
refused with a project error naming the parameter and what is allowed, before any work and without warnings."""

import dataclasses
import errno
import json
import os
import signal
import sys
import threading
import warnings

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import run_cli
from PIL import Image

from ditrt.runtime import InputError, Pipeline
from ditrt.runtime.cli import main as dit_run
from ditrt.runtime.errors import ManifestError


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


@pytest.mark.parametrize(
    "kwargs,fragment",
    [
        (
            {"prompt": "a \udcff"},
            "prompt holds characters that are not valid Unicode (lone surrogate at index 2",
        ),
        (
            {"prompt": "\ud800"},
            "prompt holds characters that are not valid Unicode (lone surrogate at index 0",
        ),
        (
            {"prompt": b"abc"},
            "prompt b'abc' is not allowed: it must be a string (str), not bytes; decode bytes first",
        ),
        ({"prompt": 5}, "prompt 5 is not allowed: it must be a string (str), not int"),
        (
            {"prompt": "3", "negative_prompt": "x\udcff"},
            "negative_prompt holds characters that are not valid Unicode",
        ),
        (
            {"prompt": "3", "negative_prompt": 5},
            "negative_prompt 5 is not allowed: it must be a string (str), not int",
        ),
        ({"prompt": "3", "negative_prompt": b""}, "negative_prompt b'' is not allowed"),
        ({}, "model 'text-digits' needs a prompt (a string)"),
    ],
)
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
        "that are not UTF-8); give UTF-8 text"
    ], r.stderr
    r = cli(text_pipe.folder, "-p", "3", "-n", "\udcff", cwd=tmp_path)
    assert one_line(r).startswith("error: negative_prompt holds characters that are not valid Unicode")
    assert list(tmp_path.iterdir()) == []


# --- class labels (2) ---


@pytest.mark.parametrize("label", ["²", "٣", "\udcff", "+1", "1.0", ""])
def test_cli_class_labels_that_are_not_ascii_integers(digits_engine, tmp_path, label):
    line = one_line(cli(digits_engine, "-c", label, cwd=tmp_path))
    assert line.startswith(f"error: class label {label!r} is out of range") and "has classes 0..9" in line


# --- Pipeline.load (3, 8) ---


@pytest.mark.parametrize(
    "kwargs,fragment",
    [
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
    ],
)
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
    assert (
        one_line(cli(digits_engine, "-c", "1", "--threads", "-1", cwd=tmp_path))
        == "error: threads -1 is not allowed; use an integer in 1..1024"
    )
    assert list(tmp_path.iterdir()) == []


# --- numbers (4) and other argument types ---


def test_numpy_scalars_mean_their_numbers(pipe):
    as_numpy = pipe(
        class_label=np.int64(7),
        guidance=np.float32(3),
        steps=np.int64(2),
        seed=np.int64(5),
        batch_size=np.int32(2),
        width=np.int64(16),
        height=np.uint16(16),
        shift=np.float32(2),
    )
    plain = pipe(class_label=7, guidance=3.0, steps=2, seed=5, batch_size=2, width=16, height=16, shift=2.0)
    np.testing.assert_array_equal(as_numpy.pixels, plain.pixels)
    assert as_numpy.parameters == plain.parameters and as_numpy.seeds == [5, 6]
    assert all(type(s) is int for s in as_numpy.seeds)
    assert (
        0 <= pipe(class_label=1, steps=1, seed=np.int64(-1)).seeds[0] < 2**31
    )  # negative: random, as for int


@pytest.mark.parametrize(
    "kwargs,fragment",
    [
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
        ({"output_type": "np"}, "output_type 'np' is not allowed; use uint8, float or latent"),
        ({"output_type": None}, "output_type None is not allowed; use uint8, float or latent"),
        ({"output_type": ["latent"]}, "output_type ['latent'] is not allowed"),
        ({"latents": [0.0]}, "latents of list are not allowed"),
        (
            {"max_sequence_length": np.int64(5)},
            "max_sequence_length 5 cannot be chosen for this engine folder",
        ),
        (
            {"class_label": True},
            "class label True is not an integer or a class name; model 'digits' has classes 0..9",
        ),
        ({"class_label": 7.0}, "class label 7.0 is not an integer or a class name"),
        ({"class_label": [7]}, "class label [7] is not an integer or a class name"),
        ({"class_label": np.int64(10)}, "class label 10 is out of range; model 'digits' has classes 0..9"),
        (
            {"class_label": None, "prompt": "a 7"},
            "is class-conditional: give a class label, not a prompt (prompt was",
        ),
        ({"class_label": None, "negative_prompt": ""}, "not a prompt (negative_prompt was given)"),
    ],
)
def test_bad_arguments(pipe, kwargs, fragment):
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        with pytest.raises(InputError) as e:
            pipe(**{"class_label": 1, "steps": 1, **kwargs})
    assert fragment in str(e.value)
    no_runtime_warnings(record)


# --- non-finite values (5) ---


@pytest.mark.parametrize(
    "magnitude,stage",
    [
        (1e30, None),  # finite all the way, even at the largest guidance
        (
            1e37,
            "the VAE decoder (from finite latents) produced non-finite values",
        ),  # finite latents the VAE overflows
        (3e38, "the denoiser produced non-finite values"),  # refused before the VAE sees it
    ],
)
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


def test_latent_output_never_runs_the_vae(text_pipe):
    """Latents the VAE overflows on (1e37 above): output_type="latent" returns them, skipping the decoder."""
    latents = np.full((1, 8, 4, 4), 1e37, np.float32)
    with pytest.raises(InputError, match=r"^the VAE decoder \(from finite latents\) produced non-finite"):
        text_pipe(prompt="a 3", latents=latents, guidance=100, steps=2, output_type="float")
    r = text_pipe(prompt="a 3", latents=latents, guidance=100, steps=2, output_type="latent")
    assert r.images is None and r.pixels is None
    assert r.latents.shape == (1, 8, 4, 4) and np.isfinite(r.latents).all()


def test_largest_guidance_without_warnings(pipe):
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        for latents in (
            None,
            np.full((1, 1, 16, 16), 1e30, np.float32),
            np.full((1, 1, 16, 16), -3e38, np.float32),
        ):
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
    assert "output 'b-0001.png' is a folder" in one_line(
        cli(digits_engine, "-c", "1", "-b", "2", "-o", "b.png", "--force", cwd=tmp_path)
    )
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
    assert (
        one_line(cli(digits_engine, "-c", "1", "-o", "f/x.png", cwd=tmp_path))
        == "error: output folder 'f' is a file, not a folder"
    )


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


def temp_files(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


class RacedImages(list):
    """A batch's images; once save() has read them all (after its checks), another writer creates `path`: the
    race of two overlapping runs, made deterministic."""

    def __init__(self, images, path):
        super().__init__(images)
        self.path = path

    def __iter__(self):
        yield from super().__iter__()
        self.path.write_bytes(b"theirs")


def test_temp_files_never_follow_or_replace_an_existing_entry(pipe, tmp_path):
    """Temporary names are random and created exclusively: a symlink or a user's file under the name an older
    version used (.NAME.tmp) is left alone, and the PNG gets the umask's mode, as a plain write gives."""
    r = pipe(class_label=1, steps=1)
    victim = tmp_path / "victim"
    victim.write_bytes(b"victim")
    out = tmp_path / "out"
    out.mkdir()
    (out / ".z.png.tmp").symlink_to(victim)
    (out / ".y.png.tmp").write_bytes(b"mine")
    assert r.save(out / "z.png") == [out / "z.png"] and r.save(out / "y.png") == [out / "y.png"]
    assert victim.read_bytes() == b"victim" and (out / ".y.png.tmp").read_bytes() == b"mine"
    for name in ("z.png", "y.png"):
        assert not (out / name).is_symlink() and np.array_equal(
            np.asarray(Image.open(out / name)), r.images[0]
        )
    umask = os.umask(0o022)
    os.umask(umask)
    assert (out / "z.png").stat().st_mode & 0o777 == 0o666 & ~umask
    assert temp_files(out) == [".y.png.tmp", ".z.png.tmp"]


def test_output_that_appears_while_saving_is_not_overwritten(pipe, tmp_path):
    """Without overwrite, a file another run wrote after the checks is kept and the save fails; for a batch,
    the outputs this call had already written are removed again (all or nothing)."""
    r = pipe(class_label=2, steps=1, batch_size=2)
    with pytest.raises(InputError, match=r"output '.*x-0001.png' already exists; choose another path"):
        dataclasses.replace(r, images=RacedImages(r.images, tmp_path / "x-0001.png")).save(tmp_path / "x.png")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x-0001.png"]
    assert (tmp_path / "x-0001.png").read_bytes() == b"theirs"
    one = dataclasses.replace(
        r, images=RacedImages(r.images[:1], tmp_path / "y.png"), parameters=r.parameters[:1]
    )
    with pytest.raises(InputError, match="y.png' already exists"):
        one.save(tmp_path / "y.png")
    assert (tmp_path / "y.png").read_bytes() == b"theirs" and temp_files(tmp_path) == []
    # with overwrite the newer file is replaced, as asked
    assert one.save(tmp_path / "z.png", overwrite=True) == [tmp_path / "z.png"]
    assert np.array_equal(np.asarray(Image.open(tmp_path / "z.png")), r.images[0])


def test_concurrent_saves_to_one_path_write_it_once(pipe, tmp_path):
    r = pipe(class_label=3, steps=1)
    barrier, outcomes = threading.Barrier(8), []

    def save():
        barrier.wait()
        try:
            outcomes.append(r.save(tmp_path / "same.png"))
        except InputError as e:
            outcomes.append(str(e))

    threads = [threading.Thread(target=save) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert outcomes.count([tmp_path / "same.png"]) == 1, outcomes
    assert all("already exists" in o for o in outcomes if isinstance(o, str))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["same.png"]


def test_without_hard_links_outputs_are_copied_and_never_overwritten(pipe, tmp_path, monkeypatch):
    """A filesystem without hard links (link() fails with EPERM, as on FAT): outputs are created exclusively
    and filled with a copy, with the same guarantees."""

    def no_links(src, dst, **kwargs):
        raise PermissionError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_links)
    r = pipe(class_label=4, steps=1, batch_size=2)
    paths = r.save(tmp_path / "a.png")
    assert [np.asarray(Image.open(p)).tolist() for p in paths] == [img.tolist() for img in r.images]
    with pytest.raises(InputError, match="b-0001.png' already exists"):
        dataclasses.replace(r, images=RacedImages(r.images, tmp_path / "b-0001.png")).save(tmp_path / "b.png")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-0000.png", "a-0001.png", "b-0001.png"]
    assert (tmp_path / "b-0001.png").read_bytes() == b"theirs"


@pytest.mark.skipif(sys.platform == "win32", reason="symlinks")
def test_dangling_symlink_at_the_output_is_taken(pipe, tmp_path):
    r = pipe(class_label=5, steps=1)
    (tmp_path / "dang.png").symlink_to(tmp_path / "nowhere.png")
    with pytest.raises(
        InputError, match="dang.png' already exists; choose another path or allow overwriting"
    ):
        r.save(tmp_path / "dang.png")
    assert os.readlink(tmp_path / "dang.png") == str(tmp_path / "nowhere.png")
    r.save(tmp_path / "dang.png", overwrite=True)  # replaces the link itself, never what it points to
    assert not (tmp_path / "dang.png").is_symlink() and not (tmp_path / "nowhere.png").exists()


def test_output_names_up_to_the_folders_limit(pipe, tmp_path):
    limit = os.pathconf(tmp_path, "PC_NAME_MAX")
    r = pipe(class_label=6, steps=1)
    longest = "a" * (limit - 4) + ".png"
    assert r.save(tmp_path / longest) == [tmp_path / longest]
    with pytest.raises(
        InputError, match=f"is {limit + 1} bytes; this folder allows file names of at most {limit}"
    ):
        r.save(tmp_path / ("b" * (limit - 3) + ".png"))
    two = pipe(class_label=6, steps=1, batch_size=2)
    with pytest.raises(InputError, match=rf"\(with the batch index suffix\) is {limit + 1} bytes"):
        two.save(tmp_path / ("c" * (limit - 8) + ".png"))
    assert [p.name for p in tmp_path.iterdir()] == [longest]


@pytest.mark.parametrize(
    "output,message",
    [
        ("x.png/", "output 'x.png/' names a folder; give a file name ending in .png"),
        ("x.png/.", "output 'x.png/.' names a folder"),
        (
            "a\nb.png",
            "output 'a\\nb.png' holds control characters (a newline, tab, escape...); choose a name",
        ),
        ("a\tb.png", "output 'a\\tb.png' holds control characters"),
        ("a\x1b[31m.png", "output 'a\\x1b[31m.png' holds control characters"),
        ("a\x7f.png", "output 'a\\x7f.png' holds control characters"),
        ("a\u2028b.png", "output 'a\\u2028b.png' holds control characters"),
    ],
)
def test_cli_outputs_that_cannot_be_one_file_name(digits_engine, tmp_path, output, message):
    line = one_line(cli(digits_engine, "-c", "1", "--steps", "1", "-o", output, cwd=tmp_path))
    assert line.startswith(f"error: {message}"), line
    assert list(tmp_path.iterdir()) == []


# --- random weights (9) ---


def test_random_weights_are_reported(random_digits_engine, tmp_path):
    expected = (
        "model 'digits' has random weights (exported with --random-weights): its images are noise, "
        "for benchmarking only"
    )
    with Pipeline.load(random_digits_engine) as p:
        assert p(class_label=1, steps=1).warnings == (expected,)
    r = cli(random_digits_engine, "-c", "1", "--steps", "1", "--json", cwd=tmp_path)
    assert r.exit_code == 0 and r.stderr.strip() == f"warning: {expected}", r.output
    assert json.loads(r.stdout)["warnings"] == [expected]


def test_trained_weights_are_not_reported(pipe):
    assert pipe(class_label=1, steps=1).warnings == ()


# --- usage errors (10) ---


@pytest.mark.parametrize(
    "args,fragments",
    [  # click's own wording, which varies a little between versions
        (["--steps", "abc"], ["Invalid value for '--steps'", "'abc' is not a valid integer"]),
        (["-g", "x"], ["Invalid value for '-g' / '--guidance' / '--cfg-scale'", "'x' is not a valid float"]),
        (["--bogus"], ["No such option", "--bogus"]),
        (["-c"], ["Option '-c' requires an argument"]),
    ],
)
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


def test_sigterm_is_one_line_and_leaves_nothing(digits_engine, tmp_path):
    """SIGTERM (a service manager stopping dit-run) acts as Ctrl-C: one line, exit 130, no temporary PNGs."""
    import subprocess
    import time

    dit_run_script = os.path.join(os.path.dirname(sys.executable), "dit-run")
    child = subprocess.Popen(
        [dit_run_script, str(digits_engine), "-c", "1", "-b", "64", "--steps", "1000", "-o", "x.png"],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    time.sleep(5)  # loaded and denoising (1000 steps of 64 images take ~30 s), even on a loaded machine
    child.send_signal(signal.SIGTERM)
    out, err = child.communicate(timeout=60)
    assert child.returncode == 130 and err.strip() == "error: interrupted", (out, err)
    assert list(tmp_path.iterdir()) == []


# --- engines that disagree with their manifest at run time ---


def replace_denoiser(folder, nodes, initializers=()):
    """Put a tiny ONNX in place of folder's denoiser: the manifest's inputs and declared outputs (x_next, x0 as
    [B, 1, 16, 16]), computing whatever `nodes` compute; the manifest's hash and size updated to match."""
    import onnx
    from onnx import TensorProto, helper

    from ditrt.runtime.manifest import sha256_file

    manifest = json.loads((folder / "manifest.json").read_text())
    types = {"float32": TensorProto.FLOAT, "int64": TensorProto.INT64}
    inputs = [
        helper.make_tensor_value_info(s["name"], types[s["dtype"]], s["shape"])
        for s in manifest["components"]["denoiser"]["inputs"]
    ]
    outputs = [
        helper.make_tensor_value_info(n, TensorProto.FLOAT, ["B", 1, 16, 16]) for n in ("x_next", "x0")
    ]
    graph = helper.make_graph(nodes, "fake", inputs, outputs, list(initializers))
    rel = manifest["components"]["denoiser"]["file"]
    onnx.save(
        helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), folder / rel
    )
    manifest["files"][rel] = {"sha256": sha256_file(folder / rel), "bytes": (folder / rel).stat().st_size}
    (folder / "manifest.json").write_text(json.dumps(manifest))


def test_engine_output_shape_other_than_declared(engine_copy, tmp_path):
    """An engine that declares [B, 1, 16, 16] but returns twice the batch: refused at its first run, not fed on
    to grow the batch at every step."""
    from onnx import helper

    replace_denoiser(
        engine_copy,
        [
            helper.make_node("Concat", ["x", "x"], ["x_next"], axis=0),
            helper.make_node("Identity", ["x"], ["x0"]),
        ],
    )
    expected = (
        "engine 'denoiser/model.onnx' failed on inputs its manifest describes (output 'x_next' has shape "
        "[2, 1, 16, 16], declared [B=1, 1, 16, 16]); the folder's engines and manifest disagree — "
        "re-export it"
    )
    with Pipeline.load(engine_copy) as p, pytest.raises(ManifestError) as e:
        p(class_label=1, steps=2)
    assert str(e.value) == expected
    work = tmp_path / "work"
    work.mkdir()
    assert one_line(cli(engine_copy, "-c", "1", "--steps", "2", cwd=work)) == f"error: {expected}"
    assert list(work.iterdir()) == []


def test_engine_failing_at_run_time_is_one_manifest_error(engine_copy, tmp_path, capfd):
    """A lookup table smaller than the labels the manifest allows (as a tokenizer whose ids exceed the text
    encoder's vocabulary): ORT's InvalidArgument becomes one line, and ORT prints no log line of its own."""
    from onnx import TensorProto, helper

    table = helper.make_tensor("table", TensorProto.FLOAT, [2], [0.0, 0.0])
    replace_denoiser(
        engine_copy,
        [
            helper.make_node("Gather", ["table", "class_labels"], ["g"]),
            helper.make_node("ReduceSum", ["g"], ["s"], keepdims=0),
            helper.make_node("Add", ["x", "s"], ["x_next"]),
            helper.make_node("Identity", ["x"], ["x0"]),
        ],
        [table],
    )
    capfd.readouterr()
    with Pipeline.load(engine_copy) as p, pytest.raises(ManifestError) as e:
        p(class_label=1, steps=1)
    message = str(e.value)
    assert message.startswith(
        "engine 'denoiser/model.onnx' failed on inputs its manifest describes (Non-zero status code returned "
        "while running Gather node"
    )
    assert "indices element out of data bounds" in message and message.endswith("disagree — re-export it")
    assert "\n" not in message and "\x1b" not in message
    assert capfd.readouterr().err == ""
    work = tmp_path / "work"
    work.mkdir()
    assert one_line(cli(engine_copy, "-c", "1", "--steps", "1", cwd=work)).startswith(
        "error: engine 'denoiser/model.onnx' failed"
    )
    assert list(work.iterdir()) == []
    assert capfd.readouterr().err == ""


def test_tokenizer_that_cannot_encode_is_a_manifest_error(tmp_path):
    """A tokenizer file that loads but fails on some prompts (here: a WordLevel vocabulary without its [UNK])."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    from ditrt.runtime.tokenizer import TextTokenizer, TokenizerConfig

    tok = Tokenizer(models.WordLevel({"<pad>": 0, "a": 1}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "tokenizer.json"))
    encode = TextTokenizer(tmp_path / "tokenizer.json", TokenizerConfig(max_length=4, pad_id=0))
    assert encode("a a").input_ids.tolist() == [[1, 1, 0, 0]]
    with pytest.raises(ManifestError, match="tokenizer cannot encode the prompt .*Missing \\[UNK\\]"):
        encode("a word it never saw")
