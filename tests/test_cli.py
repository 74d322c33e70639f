import json
import shutil

import pytest
from conftest import one_line_error, run_cli, run_cli_here
from PIL import Image


def test_export_then_run_end_to_end(tmp_path):
    r = run_cli("dit-export", "digits", "-o", "eng", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "eng" and (tmp_path / "eng" / "manifest.json").is_file()
    r = run_cli(
        "dit-run",
        "eng",
        "--class-label",
        "7",
        "--seed",
        "3",
        "--steps",
        "10",
        "-b",
        "2",
        "-o",
        "seven.png",
        "--json",
        cwd=tmp_path,
    )
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["outputs"] == ["seven-0000.png", "seven-0001.png"] and out["seeds"] == [3, 4]
    assert out["steps"] == 10 and out["model"] == "digits" and out["timings_ms"]["total"] > 0
    img = Image.open(tmp_path / "seven-0001.png")
    assert img.size == (16, 16) and "Seed: 4," in img.text["parameters"]
    manifest = json.loads((tmp_path / "eng" / "manifest.json").read_text())
    assert manifest["export"]["command"] == "dit-export digits -o eng"


def test_plain_output_lists_paths(digits_engine, tmp_path):
    r = run_cli("dit-run", str(digits_engine), "-c", "1", "-s", "5", "--steps", "3", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == ["output.png"] and "seed 5" in r.stderr


def test_list_and_help():
    r = run_cli("dit-export", "--list")
    assert r.returncode == 0 and r.stdout.startswith("digits ")
    for script in ("dit-export", "dit-run"):
        r = run_cli(script, "--help")
        assert r.returncode == 0 and "Usage:" in r.stdout


@pytest.mark.parametrize(
    "args,fragments",
    [
        (["-c", "10"], ["class label 10 is out of range", "0..9"]),
        (["-c", "3", "--steps", "0"], ["steps 0 is not allowed"]),
        (["-c", "3", "--guidance", "-1"], ["guidance -1.0 is not allowed"]),
        (["-c", "3", "-b", "0"], ["batch_size 0 is not allowed"]),
        (["-c", "3", "-o", "out.jpg"], ["must end in .png"]),
        (["-c", "3", "--guidance", "250"], ["guidance 250.0 is not allowed", "0..100"]),
        (["-c", "3", "--sampler", "lms"], ["unknown sampler 'lms'", "euler, euler-karras, ddim, dpm++1"]),
        (["-c", "3", "--sampler", "ddim"], ["'ddim' (DDIMScheduler) needs an epsilon/v-prediction model"]),
        (["-c", "3", "--shift", "0"], ["shift 0.0 is not allowed"]),
    ],
)
def test_run_errors(digits_engine, tmp_path, args, fragments):
    r = run_cli("dit-run", str(digits_engine), *args, cwd=tmp_path)
    one_line_error(r, *fragments)
    assert list(tmp_path.iterdir()) == []  # no partial output


def test_run_error_on_missing_folder(tmp_path):
    one_line_error(run_cli("dit-run", "nowhere", "-c", "1", cwd=tmp_path), "'nowhere' does not exist")


def test_run_error_on_damaged_folder(engine_copy, tmp_path):
    onnx_file = engine_copy / "denoiser" / "model.onnx"
    onnx_file.write_bytes(onnx_file.read_bytes()[:-10])
    work = tmp_path / "work"
    work.mkdir()
    one_line_error(run_cli("dit-run", str(engine_copy), "-c", "1", cwd=work), "truncated")
    assert list(work.iterdir()) == []


def test_run_refuses_to_overwrite(digits_engine, tmp_path):
    (tmp_path / "output.png").write_bytes(b"mine")
    one_line_error(run_cli("dit-run", str(digits_engine), "-c", "1", cwd=tmp_path), "already exists")
    assert (tmp_path / "output.png").read_bytes() == b"mine"
    r = run_cli("dit-run", str(digits_engine), "-c", "1", "--steps", "2", "--force", cwd=tmp_path)
    assert r.returncode == 0 and (tmp_path / "output.png").read_bytes() != b"mine"


def test_export_errors(tmp_path):
    # in this process: a dit-export subprocess spends 4 s importing torch before these errors (the usage error
    # below and test_export_then_run_end_to_end run the script itself)
    one_line_error(run_cli_here("dit-export", "dit-xxl", cwd=tmp_path), "unknown model 'dit-xxl'", "digits")
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "taken").mkdir()
    one_line_error(run_cli_here("dit-export", "digits", "-o", "taken", cwd=tmp_path), "already exists")
    r = run_cli("dit-export", cwd=tmp_path)
    assert r.returncode == 2 and "missing MODEL" in r.stderr


def test_minimal_example_runs(digits_engine, tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    example = Path(__file__).resolve().parent.parent / "examples" / "minimal.py"
    shutil.copy(example, tmp_path)
    r = subprocess.run(
        [sys.executable, "minimal.py", str(digits_engine)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "digit-7.png").is_file() and "digit-7.png" in r.stdout


def test_run_size_must_match_the_engines(digits_engine, tmp_path):
    one_line_error(
        run_cli("dit-run", str(digits_engine), "-c", "1", "-W", "32", "-H", "16", cwd=tmp_path),
        "size 32x16 is not available",
        "generates 16x16 images",
    )
    r = run_cli(
        "dit-run", str(digits_engine), "-c", "1", "-W", "16", "-H", "16", "--steps", "2", cwd=tmp_path
    )
    assert r.returncode == 0, r.stderr


def test_manifest_naming_a_missing_output(engine_copy, tmp_path):
    manifest = engine_copy / "manifest.json"
    d = json.loads(manifest.read_text())
    d["components"]["denoiser"]["outputs"].append(
        dict(d["components"]["denoiser"]["outputs"][0], name="renamed")
    )
    manifest.write_text(json.dumps(d))
    one_line_error(
        run_cli("dit-run", str(engine_copy), "-c", "1", "--no-verify", cwd=tmp_path),
        "has no output(s) ['renamed']",
    )


@pytest.mark.parametrize("script", ["run", "export"])
def test_unexpected_failure_is_one_line_without_traceback(digits_engine, tmp_path, monkeypatch, script):
    from click.testing import CliRunner

    from ditrt.export import cli as export_cli
    from ditrt.runtime import cli as run_cli_module
    from ditrt.runtime.pipeline import Pipeline

    def boom(*args, **kwargs):
        raise RuntimeError("device lost\nmore detail")

    monkeypatch.chdir(tmp_path)
    if script == "run":
        monkeypatch.setattr(Pipeline, "load", boom)
        main, args = run_cli_module.main, [str(digits_engine), "-c", "1"]
    else:
        monkeypatch.setattr("ditrt.export.exporter.export_model", boom)
        main, args = export_cli.main, ["digits", "-o", "x"]
    r = CliRunner().invoke(main, args)
    assert (
        r.exit_code == 1
        and r.output.strip()
        == "error: internal error (RuntimeError: device lost); rerun with --debug for the traceback"
    )
    r = CliRunner().invoke(main, args + ["--debug"])
    assert r.exit_code == 1 and isinstance(r.exception, RuntimeError)


def test_invalid_model_config_is_a_one_line_error(tmp_path):
    """Every family's config checks raise the project's ConfigError: exit 2, not an internal error."""
    from diffusers import DiTTransformer2DModel

    DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, num_layers=1, sample_size=9, num_embeds_ada_norm=10
    ).save_pretrained(tmp_path / "dit")
    one_line_error(
        run_cli_here("dit-export", str(tmp_path / "dit"), "-o", "eng", cwd=tmp_path),
        "DiTConfig.sample_size=9 is not a multiple of patch_size=2",
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dit"]
