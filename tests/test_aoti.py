"""AOTInductor engines (dit-export --engine aoti, dit-run --backend torch) on the CPU: the demos and one tiny
diffusers pipeline per kind of transformer block compiled to .pt2 packages, each engine against ONNX Runtime
running the ONNX export of the same weights, and the packages' target (torch version, device, CPU ISA) enforced.

Kinds of block covered: DiT's adaLN-zero block (digits), the cross-attention block PixArt and Sana share, with
Sana's linear attention, Gemma-2 and DC-AE (text-digits), MMDiT's joint block with CLIP + T5 and AutoencoderKL
(SD3), Flux's double- and single-stream blocks with RoPE (Flux: its transformer folder alone, the denoiser engine;
its CLIP, T5 and AutoencoderKL are SD3's kinds). PixArt uses the cross-attention block and T5/KL already covered,
so it is left out to keep the compile time down (about 10 s per engine on 2 cores).
"""

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import tiny_components as tc
from conftest import exported_once, one_line_error, run_cli, run_cli_here

from ditrt.runtime import Pipeline
from ditrt.runtime.backends import open_backend
from ditrt.runtime.errors import BackendUnavailable, InputError
from ditrt.runtime.manifest import load_manifest

# fp32 on both sides; the engines differ in kernels and summation order only, so per-value differences stay near
# fp32 rounding of the values' magnitude (outputs here are O(1)–O(10)); 1e-4 relative to the largest value
TOLERANCE = 1e-4


def engine_pair(name: str, tmp_path_factory, pipeline=None, **options) -> tuple[Path, Path]:
    """(ONNX folder, AOTInductor folder) of one model: a built-in name, or a diffusers pipeline saved first."""
    if pipeline is None:
        return exported_once(name, tmp_path_factory), exported_once(
            name, tmp_path_factory, f"{name}-aoti", engine="aoti"
        )
    from filelock import FileLock

    base = tmp_path_factory.getbasetemp()
    run = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    source = run / "shared-engines" / f"{name}-diffusers"
    source.parent.mkdir(exist_ok=True)
    with FileLock(f"{source}.lock"):
        if not source.is_dir():
            pipeline().save_pretrained(source)
    onnx = exported_once(str(source), tmp_path_factory, f"{name}-onnx", **options)
    return onnx, exported_once(str(source), tmp_path_factory, f"{name}-aoti", engine="aoti", **options)


MODELS = {  # name: (diffusers pipeline or None for a built-in, export options, generation arguments)
    "digits": (None, {}, dict(class_label=3)),
    "text-digits": (None, {}, dict(prompt="seven")),
    "sd3": (tc.sd3_pipeline, {}, dict(prompt=tc.PROMPT)),
    "flux": (lambda: tc.flux_pipeline().transformer, {}, None),  # the denoiser alone: no generation
}


def close(got: np.ndarray, want: np.ndarray) -> float:
    """Largest difference relative to the largest magnitude (at least 1)."""
    return float(np.abs(got - want).max() / max(1.0, np.abs(want).max()))


@pytest.mark.slow
@pytest.mark.parametrize("name", list(MODELS))
def test_engines_match_onnx_runtime(name, tmp_path_factory):
    """Every component on the same inputs, and a whole generation from the same seed."""
    pipeline, options, call = MODELS[name]
    onnx, aoti = engine_pair(name, tmp_path_factory, pipeline, **options)
    manifest = load_manifest(aoti)
    assert {c.backend for c in manifest.components.values()} == {"torch"}
    assert all(c.target.device == "cpu" and c.lowering == "portable" for c in manifest.components.values())
    if call is None:  # a transformer folder: its step engine on ONNX Runtime and as a package
        ours, theirs = manifest.components["denoiser"], load_manifest(onnx).components["denoiser"]
        ref = open_backend("onnxruntime", onnx / theirs.file, theirs)
        compare_engines(
            {"denoiser": ref}, {"denoiser": open_backend("torch", aoti / ours.file, ours)}, manifest
        )
        return
    with Pipeline.load(onnx) as ref, Pipeline.load(aoti, backend="torch") as pipe:
        compare_engines(ref.engines, pipe.engines, manifest)
        a = ref(seed=5, steps=4, batch_size=2, **call)
        b = pipe(seed=5, steps=4, batch_size=2, **call)
    assert close(b.latents, a.latents) <= TOLERANCE
    assert np.abs(b.pixels - a.pixels).max() <= TOLERANCE
    assert b.parameters == a.parameters


def compare_engines(ref: dict, engines: dict, manifest) -> None:
    assert set(engines) == set(ref)
    for component, engine in engines.items():
        feeds = sample_feeds(manifest.components[component].inputs, component)
        want, got = ref[component].run(feeds), engine.run(feeds)
        for k in want:
            assert got[k].shape == want[k].shape and close(got[k], want[k]) <= TOLERANCE, (component, k)


def sample_feeds(specs, component: str) -> dict[str, np.ndarray]:
    """Inputs of one engine at batch 2 with CFG: normal floats, token ids within the vocabulary (0..9 are
    ids every tokenizer has), all-ones masks, the digit class labels."""
    rng = np.random.default_rng(0)
    sizes = {"B": 2, "n": 2, "T": 7}
    feeds = {}
    for s in specs:
        # symbolic axes: "B", "n", "T", or expressions of them such as "77+T"
        shape = [eval(d, {"__builtins__": {}}, sizes) if isinstance(d, str) else d for d in s.shape]
        if s.dtype.startswith("int"):
            high = 2 if "mask" in s.name else 10
            feeds[s.name] = rng.integers(1 if "mask" in s.name else 0, high, shape).astype(s.dtype)
        else:
            feeds[s.name] = rng.standard_normal(shape).astype(np.float32)
    if component == "denoiser":
        feeds.update(t=np.float32(0.5), clip=np.float32(1e6))
    return feeds


@pytest.mark.slow
def test_cli_round_trip_and_backend_mismatch(tmp_path_factory, tmp_path):
    """dit-export --engine aoti and dit-run --backend torch as a user runs them; the other backend is refused."""
    _, aoti = engine_pair("digits", tmp_path_factory)
    r = run_cli(
        "dit-run", str(aoti), "--backend", "torch", "--class-label", "7", "-o", str(tmp_path / "a.png")
    )
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "a.png").stat().st_size > 0
    one_line_error(
        run_cli_here("dit-run", str(aoti), "--class-label", "7"), "'torch' backend", "--backend torch"
    )


@pytest.mark.slow
def test_step_loop_matches_host_loop_and_threads(tmp_path_factory):
    """The torch backend's device loop against the host loop over many steps, and concurrent requests."""
    from concurrent.futures import ThreadPoolExecutor

    _, aoti = engine_pair("digits", tmp_path_factory)
    with Pipeline.load(aoti, backend="torch") as pipe:
        assert_loop_matches_host(pipe.engines["denoiser"], pipe.manifest)
        serial = [pipe(class_label=i, seed=i, steps=6).latents for i in range(4)]
        with ThreadPoolExecutor(4) as pool:
            parallel = list(pool.map(lambda i: pipe(class_label=i, seed=i, steps=6).latents, range(4)))
    for a, b in zip(serial, parallel):
        np.testing.assert_array_equal(a, b)


def assert_loop_matches_host(engine, manifest, steps: int = 7) -> None:
    """engine.loop(...) and HostLoop read the same state after every step of a schedule with every scalar
    non-zero (so each of x, x0_prev, x0_prev2 feeds the update)."""
    from ditrt.runtime.backends import HostLoop

    feeds = sample_feeds(manifest.components["denoiser"].inputs, "denoiser")
    state = {k: feeds.pop(k) for k in ("x", "x0_prev", "x0_prev2")}
    names = ("t", "p", "q", "a", "b", "c", "e", "d")
    scalars = {k: feeds.pop(k) for k in (*names, "clip")}
    rng = np.random.default_rng(1)
    with engine.loop(feeds, state) as device, HostLoop(engine, feeds, state) as host:
        for _ in range(steps):
            step = {**scalars, **{k: np.float32(rng.uniform(0.2, 0.6)) for k in names}}
            device.step(step)
            host.step(step)
            got, want = device.read(), host.read()
            for k in want:
                np.testing.assert_allclose(got[k], want[k], rtol=1e-6, atol=1e-6, err_msg=k)


def test_onnx_runtime_binding_loop_matches_host_loop(digits_engine):
    """ONNX Runtime's I/O-binding loop (state rotating through device buffers) against the host loop."""
    with Pipeline.load(digits_engine) as pipe:
        assert_loop_matches_host(pipe.engines["denoiser"], pipe.manifest)


def aoti_like(digits_engine: Path, tmp_path: Path, target: dict) -> Path:
    """A copy of the digits folder whose denoiser claims to be an AOTInductor package built for `target`
    (refused before the file is opened, so its bytes do not matter), with a consistent file list."""
    out = tmp_path / "engine"
    shutil.copytree(digits_engine, out)
    (out / "denoiser" / "model.onnx").rename(out / "denoiser" / "model.pt2")
    m = json.loads((out / "manifest.json").read_text())
    m["files"]["denoiser/model.pt2"] = m["files"].pop("denoiser/model.onnx")
    m["components"]["denoiser"].update(file="denoiser/model.pt2", backend="torch", target=target)
    (out / "manifest.json").write_text(json.dumps(m))
    return out


@pytest.mark.parametrize(
    "target, message",
    [
        (dict(device="cpu", arch="avx2", torch="1.0.0"), "compiled with torch 1.0.0"),
        (dict(device="cuda", arch="sm_90", torch="{torch}"), "none is visible"),
        (dict(device="cpu", arch="sve256", torch="{torch}"), "compiled for CPUs with sve256"),
    ],
)
def test_package_target_is_enforced(digits_engine, tmp_path, target, message):
    import torch

    target = {k: v.format(torch=torch.__version__) for k, v in target.items()}
    folder = aoti_like(digits_engine, tmp_path, target)
    with pytest.raises(BackendUnavailable, match=message) as e:
        Pipeline.load(folder, backend="torch")
    assert "\n" not in str(e.value)
    one_line_error(run_cli_here("dit-run", str(folder), "--backend", "torch", "--class-label", "1"), message)


def test_manifest_target_rules(digits_engine, tmp_path):
    """A torch component needs a target and only it has one; its libraries must be files of the folder."""
    from ditrt.runtime.errors import ManifestError

    folder = aoti_like(digits_engine, tmp_path, None)
    with pytest.raises(ManifestError, match="target"):
        load_manifest(folder)
    m = json.loads((folder / "manifest.json").read_text())
    m["components"]["denoiser"]["target"] = dict(device="cpu", arch="avx2", torch="2", libraries=["ops/x.so"])
    (folder / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ManifestError, match="ops/x.so"):
        load_manifest(folder)


def test_export_options_are_checked_before_exporting(tmp_path):
    import torch

    from ditrt.export import export_model

    if not torch.cuda.is_available():
        with pytest.raises(BackendUnavailable, match="--device cuda needs a CUDA GPU"):
            export_model("digits", tmp_path / "a", engine="aoti", device="cuda")
    with pytest.raises(InputError, match="--device applies to --engine aoti only"):
        export_model("digits", tmp_path / "b", device="cpu")
    with pytest.raises(InputError, match="leave --lowering out with --engine aoti"):
        export_model("digits", tmp_path / "c", engine="aoti", lowering="plugin")
    one_line_error(run_cli_here("dit-export", "digits", "--engine", "aoti", "--device", "tpu"), "tpu")
    assert not any(tmp_path.iterdir())


def test_runtime_without_torch_names_the_extra(digits_engine, tmp_path):
    """The core runtime is torch-free: --backend torch without torch says what to install, in one line."""
    import subprocess
    import sys

    folder = aoti_like(digits_engine, tmp_path, dict(device="cpu", arch="avx2", torch="2"))
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "from ditrt.runtime.cli import main\n"
        f"main([{str(folder)!r}, '--backend', 'torch', '--class-label', '1'])\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    one_line_error(r, "pip install 'ditrt[torch]'")
