import shutil
from dataclasses import replace

import numpy as np
import onnxruntime as ort
import pytest
import torch
from tiny_components import randomize

from ditrt.export import export_model
from ditrt.export import folder as folder_mod
from ditrt.export.graphs import StepGraph, sample_inputs, step_io
from ditrt.export.models.dit import DiT, DiTConfig
from ditrt.export.onnx_export import export_onnx
from ditrt.export.presets import build_preset, get_preset
from ditrt.runtime.errors import ConfigError, InputError
from ditrt.runtime.manifest import load_manifest

TINY = DiTConfig(
    sample_size=8, in_channels=4, patch_size=2, hidden_size=32, depth=2, num_heads=4, num_classes=5
)
# fp32 end to end; ORT fuses and reorders reductions (LayerNorm, Gemm), so a few ulps of O(1) outputs differ
ATOL = 1e-5


def assert_engine_matches_torch(model: DiT, path, batches=(1, 3)):
    graph = StepGraph(model)
    inputs, _ = step_io(model)
    session = ort.InferenceSession(str(path))
    for B in batches:
        args = sample_inputs(inputs, {"B": B, "n": 2}, seed=B)
        args = tuple(
            torch.randint(0, model.cfg.num_classes, a.shape) if s.name == "class_labels" else a
            for s, a in zip(inputs, args)
        )
        with torch.no_grad():
            ref = graph(*args)
        out = session.run(None, {s.name: a.numpy() for s, a in zip(inputs, args)})
        for r, o in zip(ref, out):
            assert o.shape == tuple(r.shape)
            np.testing.assert_allclose(o, r.numpy(), rtol=0, atol=ATOL)


# learn-sigma is slow: test_step_graphs' DiT (learn_sigma too) makes the same engine-vs-torch check
QUIRKS = replace(TINY, learn_sigma=False, freq_shift=1, mlp_norm_eps=1e-5, prediction="flow")


@pytest.mark.parametrize(
    "cfg",
    [pytest.param(TINY, marks=pytest.mark.slow), QUIRKS, replace(TINY, patch_size=4, in_channels=1)],
    ids=["learn-sigma", "diffusers-quirks", "p4"],
)
def test_step_engine_matches_torch(cfg, tmp_path):
    model = randomize(DiT(cfg), seed=1)  # no zero-init layers: every weight must matter
    graph = StepGraph(model)
    inputs, outputs = step_io(model)
    export_onnx(graph, inputs, outputs, tmp_path / "step.onnx")
    assert_engine_matches_torch(model, tmp_path / "step.onnx")


def test_shipped_digits_engine_matches_torch(digits_engine):
    model = build_preset(get_preset("digits"))
    assert_engine_matches_torch(model, digits_engine / "denoiser" / "model.onnx", batches=(1, 5))


def test_step_graph_guidance_and_update_algebra():
    model = randomize(DiT(TINY), seed=1)
    graph = StepGraph(model)
    inputs, _ = step_io(model)
    x, x0_prev, x0_prev2, t, g, p, q, a, b, c, e, d, clip, labels = sample_inputs(inputs, {"B": 2, "n": 2})
    labels = torch.stack([torch.full_like(labels[1], 5), labels[1] % 5])  # CFG branches [null; class]
    clip = torch.tensor(0.3)  # DDIM's clip_sample range: x0 is clamped, the ε direction (d·g) is not
    with torch.no_grad():
        cond = model(x, t.expand(2), labels[1])
        uncond = model(x, t.expand(2), labels[0])
        x_next, x0 = graph(x, x0_prev, x0_prev2, t, g, p, q, a, b, c, e, d, clip, labels)
    guided = uncond[:, :4] + g * (cond[:, :4] - uncond[:, :4])
    torch.testing.assert_close(x0, (p * x + q * guided).clamp(-0.3, 0.3), atol=1e-5, rtol=1e-5)
    assert (p * x + q * guided).abs().max() > 0.3  # the clamp was exercised
    torch.testing.assert_close(
        x_next, a * x + b * x0 + c * x0_prev + e * x0_prev2 + d * guided, atol=1e-5, rtol=1e-5
    )


def test_export_folder_contents(digits_engine):
    m = load_manifest(digits_engine)
    assert sorted(
        p.relative_to(digits_engine).as_posix() for p in digits_engine.rglob("*") if p.is_file()
    ) == ["denoiser/model.onnx", "manifest.json"]
    spec = {s.name: s.shape for s in m.components["denoiser"].inputs}
    assert spec["x"] == ["B", 1, 16, 16] and spec["class_labels"] == ["n", "B"] and spec["t"] == []
    assert m.null_class == 10  # the unconditional label of the CFG branch
    assert m.family == "dit" and m.conditioning == "class" and not m.random_weights
    assert m.scheduler.prediction == "flow" and m.latent.channels == 1


def test_failed_export_leaves_nothing_behind(tmp_path, monkeypatch):
    def boom(*args, **kwargs):
        raise RuntimeError("exporter crashed")

    monkeypatch.setattr("ditrt.export.build.export_onnx", boom)
    with pytest.raises(RuntimeError, match="exporter crashed"):
        export_model("digits", tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_existing_folder_needs_force(digits_engine, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(digits_engine, out)  # an engine folder: the only kind --force replaces
    (out / "denoiser" / "model.onnx").write_bytes(b"an older engine")
    with pytest.raises(InputError, match="already exists; pass --force"):
        export_model("digits", out)
    assert (out / "denoiser" / "model.onnx").read_bytes() == b"an older engine"
    export_model("digits", out, force=True)
    assert (out / "denoiser" / "model.onnx").read_bytes() == (
        digits_engine / "denoiser" / "model.onnx"
    ).read_bytes()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temp or old folders left


def test_unknown_model_name():
    with pytest.raises(ConfigError, match="unknown model 'dit-xxl'; built-in models: digits"):
        get_preset("dit-xxl")


def test_staging_cleans_up_on_error(tmp_path):
    with pytest.raises(ValueError):
        with folder_mod.staging_folder(tmp_path / "x") as tmp:
            (tmp / "half.onnx").write_bytes(b"12")
            raise ValueError
    assert list(tmp_path.iterdir()) == []
