"""The built-in text-to-image demo: a real diffusers SanaPipeline folder, exported through the same path as a
released checkpoint, whose samples show the digit the prompt asks for."""

import json

import numpy as np
import pytest
import torch

from conftest import run_cli
from ditrt.export.demos import TEXT_DIGITS_FOLDER
from ditrt.export.demos.train_text_digits import WORDS
from ditrt.runtime import Pipeline

PER_PROMPT = 10
# three of the training phrasings and one the model never saw ("a seven")
PHRASINGS = ("a handwritten {w}", "the digit {n}", "the number {w}", "a {w}")


@pytest.fixture(scope="module")
def text_digits(tmp_path_factory):
    from ditrt.export.folder import export_model

    out = tmp_path_factory.mktemp("engines") / "text-digits"
    return out, export_model("text-digits", out)


def test_shipped_folder_is_small_and_safetensors_only():
    files = [p for p in TEXT_DIGITS_FOLDER.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) < 10e6
    assert {p.suffix for p in files} <= {".json", ".safetensors"}  # nothing pickled
    index = json.loads((TEXT_DIGITS_FOLDER / "model_index.json").read_text())
    assert index["_class_name"] == "SanaPipeline" and index["vae"] == ["diffusers", "AutoencoderDC"]


def test_the_folder_preset_is_not_built_as_a_bare_denoiser():
    from ditrt.export.presets import build_preset, get_preset
    from ditrt.runtime.errors import ConfigError

    with pytest.raises(ConfigError, match="'text-digits' is a shipped pipeline folder"):
        build_preset(get_preset("text-digits"))


def test_exports_every_component(text_digits):
    _, m = text_digits
    assert m.model == "text-digits" and m.family == "sana" and not m.random_weights
    assert set(m.components) == {"text_encoder", "denoiser", "vae_decoder"}
    assert (m.latent.channels, m.latent.height, m.latent.width) == (8, 4, 4)
    # the folder's scheduler (flow_shift 1.0), not Sana's family default of 3.0
    assert m.scheduler.name == "flow_dpmsolver++" and m.scheduler.shift == 1.0
    assert m.export["training"]["seconds"] < 20 * 60 and m.export["training"]["seed"] == 0


def test_matches_sana_pipeline_on_the_shipped_folder(text_digits):
    from diffusers import SanaPipeline

    engine, _ = text_digits
    ref = SanaPipeline.from_pretrained(TEXT_DIGITS_FOLDER, torch_dtype=torch.float32)
    ref.check_inputs = lambda *args, **kwargs: None  # it insists on multiples of 32 px (DC-AE f32); this VAE is f4
    latents = torch.randn(2, 8, 4, 4, generator=torch.Generator().manual_seed(0))
    prompt = "the digit 3"
    want = ref(prompt, negative_prompt="", num_inference_steps=10, guidance_scale=4.5, height=16, width=16,
               num_images_per_prompt=2, latents=latents.clone(), clean_caption=False,
               use_resolution_binning=False, output_type="np").images
    pipe = Pipeline.load(engine)
    cond, _, _ = pipe._conditioning(prompt, "", None, 2)
    got = pipe._decode(pipe._denoise(latents.numpy(), cond, 10, 4.5, None, {})).transpose(0, 2, 3, 1)
    # fp32 end to end (weights stored in fp16, both sides load them into fp32): rounding only
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-3)


@pytest.mark.slow
def test_samples_show_the_requested_digit(text_digits, digit_classifier):
    engine, _ = text_digits
    pipe = Pipeline.load(engine)
    per_digit, per_phrasing, spreads = {}, {p: [] for p in PHRASINGS}, {}
    for digit in range(10):
        hits = []
        for i, phrasing in enumerate(PHRASINGS):
            prompt = phrasing.format(w=WORDS[digit], n=digit)
            r = pipe(prompt=prompt, seed=20_000 + 100 * digit + 10 * i, batch_size=PER_PROMPT)  # model defaults
            x = np.stack(r.images).astype(np.float32).reshape(PER_PROMPT, -1) / 127.5 - 1
            ok = digit_classifier.predict(x) == digit
            hits += list(ok)
            per_phrasing[phrasing] += list(ok)
            spreads[(digit, i)] = float(np.mean(np.abs(x[:, None] - x[None]).mean(-1)))
        per_digit[digit] = float(np.mean(hits))
    overall = float(np.mean(list(per_digit.values())))
    print("accuracy per digit:", {k: round(v, 2) for k, v in per_digit.items()}, "overall", round(overall, 3),
          "per phrasing:", {k: round(float(np.mean(v)), 2) for k, v in per_phrasing.items()})
    assert overall >= 0.90, per_digit
    assert min(per_digit.values()) >= 0.7, per_digit
    assert min(np.mean(v) for v in per_phrasing.values()) >= 0.85, per_phrasing
    assert min(spreads.values()) > 0.05, spreads  # no collapse onto one template per prompt


def test_cli_generates_from_a_prompt(text_digits, tmp_path):
    engine, _ = text_digits
    r = run_cli("dit-run", str(engine), "-p", "a handwritten seven", "-s", "3", "-o", str(tmp_path / "seven.png"))
    assert r.returncode == 0, r.stderr
    from PIL import Image

    image = Image.open(tmp_path / "seven.png")
    assert image.size == (16, 16) and "a handwritten seven" in image.info["parameters"]
    r = run_cli("dit-run", str(engine), "-c", "7", "-o", str(tmp_path / "x.png"))
    assert r.returncode == 2 and "Traceback" not in r.stderr and "prompt" in r.stderr
