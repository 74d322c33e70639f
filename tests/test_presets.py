"""Built-in architectures: true sizes (counted on the meta device), random-weight exports, diffusers folders."""

import json

import pytest
import torch
from conftest import run_cli, run_cli_here

from ditrt.export import export_model
from ditrt.export.presets import PRESETS, build_preset, get_preset
from ditrt.runtime import Pipeline
from ditrt.runtime.errors import ConfigError, ManifestError
from ditrt.runtime.manifest import load_manifest

# reference/architectures.md §8, in millions: (parameters, buffers counted there). DiT's frozen pos_embed and
# SD3's checkpoint position table are buffers here, as in diffusers; the reference lists them beside the weights.
REFERENCE_M = {
    "dit-xl-2-256": (675.1 - 0.295, 0.295),
    "pixart-sigma-1024": (610.86, 0.0),
    "sana-600m-1024": (591.75, 0.0),
    "sana-1600m-1024": (1604.46, 0.0),
    "sd3-medium": (2028.3, 56.6),
    "sd35-medium": (2243.2, 226.5),
    "sd35-large": (8056.6, 89.7),
    "flux-dev": (11901.4, 0.0),
    "flux-schnell": (11891.2, 0.0),
}


@pytest.mark.parametrize("name", REFERENCE_M)
def test_preset_sizes_match_reference(name):
    p = get_preset(name)
    with torch.device("meta"):
        model = p.family.module(p.config)
    params = sum(t.numel() for t in model.parameters()) / 1e6
    buffers = sum(t.numel() for n, t in model.named_buffers() if n == "pos_embed") / 1e6
    want_params, want_buffers = REFERENCE_M[name]
    assert params == pytest.approx(want_params, abs=0.05), params
    assert buffers == pytest.approx(want_buffers, abs=0.05), buffers


def test_every_preset_is_covered():
    assert set(PRESETS) - set(REFERENCE_M) == {"digits", "text-digits"}  # the trained demos


def test_architecture_only_preset_needs_random_weights(tmp_path):
    with pytest.raises(ConfigError, match="'sana-600m-1024' ships no weights; pass --random-weights"):
        build_preset(get_preset("sana-600m-1024"))
    r = run_cli_here("dit-export", "flux-dev", cwd=tmp_path)
    assert r.returncode == 2 and "pass --random-weights" in r.stderr and "Traceback" not in r.stderr
    assert list(tmp_path.iterdir()) == []


def test_random_weights_are_seeded_and_recorded(random_digits_engine):
    a = build_preset(get_preset("digits"), random_weights=True, seed=1)
    b = build_preset(get_preset("digits"), random_weights=True, seed=1)
    trained = build_preset(get_preset("digits"))
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert not torch.equal(a.blocks[0].adaLN.weight, trained.blocks[0].adaLN.weight)
    m = load_manifest(random_digits_engine)  # export_model("digits", ..., random_weights=True, seed=1)
    assert m.random_weights and m.export["seed"] == 1


def test_forced_external_data(tmp_path):
    m = export_model("digits", tmp_path / "ext", external_data=True)
    files = sorted(m.files)
    assert files[0] == "denoiser/model.onnx" and len(files) == 2, files
    assert m.files[files[1]].bytes > m.files[files[0]].bytes  # the weights moved out of the graph file
    r = Pipeline.load(tmp_path / "ext")(class_label=4, seed=0, steps=3)
    with Pipeline.load(tmp_path / "ext") as pipe:
        assert (pipe(class_label=4, seed=0, steps=3).images[0] == r.images[0]).all()
    data = tmp_path / "ext" / files[1]
    data.write_bytes(data.read_bytes()[:-4])  # a damaged data file is caught like the graph file
    with pytest.raises(ManifestError, match="truncated"):
        Pipeline.load(tmp_path / "ext")


def diffusers_pixart_pipeline_folder(root):
    from diffusers import PixArtTransformer2DModel

    model = PixArtTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=4,
        out_channels=8,
        num_layers=1,
        cross_attention_dim=16,
        caption_channels=12,
        sample_size=8,
        norm_type="ada_norm_single",
        norm_elementwise_affine=False,
        norm_eps=1e-6,
        use_additional_conditions=False,
    )
    model.save_pretrained(root / "transformer")
    (root / "model_index.json").write_text(
        json.dumps(
            {"_class_name": "PixArtSigmaPipeline", "transformer": ["diffusers", "PixArtTransformer2DModel"]}
        )
    )
    return root


def test_export_diffusers_pipeline_folder_cli(tmp_path):
    src = diffusers_pixart_pipeline_folder(tmp_path / "pixart-tiny")
    r = run_cli_here("dit-export", str(src), "-o", "eng", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    m = load_manifest(tmp_path / "eng")
    assert (m.family, m.conditioning, m.random_weights) == ("pixart", "text", False)
    assert (m.scheduler.config["_class_name"], m.scheduler.default_steps, m.scheduler.default_guidance) == (
        "DPMSolverMultistepScheduler",
        20,
        4.5,
    )
    names = [s.name for s in m.components["denoiser"].inputs]
    assert {"prompt_embeds", "prompt_attention_mask"} <= set(names)
    # the runtime says plainly what it cannot do yet, instead of failing later
    r = run_cli("dit-run", "eng", "-c", "1", cwd=tmp_path)
    assert r.returncode == 2 and "needs text encoders and a VAE decoder" in r.stderr


def test_class_conditional_latents_without_decoder_are_refused(tmp_path):
    from diffusers import DiTTransformer2DModel

    DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, num_layers=1, sample_size=8, num_embeds_ada_norm=10
    ).save_pretrained(tmp_path / "dit")
    m = export_model(str(tmp_path / "dit"), tmp_path / "eng")
    assert m.family == "dit" and m.latent.channels == 4 and m.class_names == [str(i) for i in range(10)]
    with pytest.raises(ManifestError, match="4-channel latents and no decoder"):
        Pipeline.load(tmp_path / "eng")
