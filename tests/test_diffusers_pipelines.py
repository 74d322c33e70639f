"""Whole-pipeline parity at configurations we did not design: diffusers' own pipeline-test dummy components
(tests/pipelines/<family>/test_*.py get_dummy_components, built locally by tiny_components) with THEIR schedulers
and VAEs, saved with save_pretrained, exported with `export_model`, generated with `Pipeline` from the same initial
noise as the diffusers pipeline; plus an odd-head / odd-grid variant per family. Slow (the exports take 10–40 s
each on 2 cores): all but DiT, which runs in the fast lane -m "not slow"; each other family has a pipeline folder
against its diffusers pipeline there too (PixArt, SD3 and Flux in test_text_pipeline, Sana as the shipped
text-digits folder in test_text_demo).

Bound: max |runtime − diffusers| ≤ 1e-3 on [0, 1] pixels. fp32 end to end (text encoders, denoiser, scheduler
arithmetic, VAE); ONNX Runtime and torch sum in different orders, so the difference is rounding (measured ≤ 1e-5
here). Each family also checks that another prompt (or class) moves the image by far more than the bound, so a
text/conditioning path error could not hide under it.

Calls follow each test's get_dummy_inputs (prompt, steps, guidance, size) plus cases at guidance ≤ 1, where the
diffusers pipelines run the conditional branch alone. What the runtime does not take per call is left at the
diffusers `__call__` default on both sides: clean_caption=False (PixArt/Sana clean only with bs4+ftfy, not
installed here, and the runtime never cleans) and Sana's default complex_human_instruction and 300 tokens (its test
passes None and 16). Flux runs at the dummy test's T5 max_sequence_length of 48.
"""

import numpy as np
import pytest
import tiny_components as tc
import torch

from ditrt.export import export_model
from ditrt.runtime import Pipeline

pytestmark = pytest.mark.xdist_group("diffusers_pipelines")  # one worker exports each folder (pytest -n)

PROMPT = "A painting of a squirrel eating a burger"  # every dummy test's prompt
OTHER = "a cat"
ATOL = 1e-3
B = 2  # images per call (num_images_per_prompt / batch_size)


def exported(ref, tmp_path_factory, name: str, **size):
    root = tmp_path_factory.mktemp(name)
    ref.save_pretrained(root / "folder")
    manifest = export_model(str(root / "folder"), root / "engine", **size)
    return ref, Pipeline.load(root / "engine"), manifest


def noise(*shape, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def compare(got: np.ndarray, want: np.ndarray, label: str):
    assert got.shape == want.shape and got.dtype == np.float32, (got.shape, want.shape, got.dtype)
    diff = float(np.abs(got - want).max())
    print(f"{label}: max abs pixel diff {diff:.2e} (image range {want.min():.2f}..{want.max():.2f})")
    assert np.ptp(want) > 0.1, "a flat image would prove nothing"
    assert diff <= ATOL, f"{label}: {diff:.3e} > {ATOL}"


def matters(a: np.ndarray, b: np.ndarray, what: str):
    diff = float(np.abs(a - b).max())
    print(f"  {what} moves the image by {diff:.2e}")
    assert diff > 10 * ATOL, (
        f"{what} moves the image by only {diff:.1e}: the {ATOL} bound could not see it lost"
    )


# ---------------------------------------------------------------- text pipelines, one generic runner
def run_text(fam, steps, guidance, negative, prompt=PROMPT, t5_len=None, **call):
    """diffusers and the runtime from the same (B, C, H, W) noise; returns (runtime, diffusers) pixels.
    t5_len: SD3/Flux max_sequence_length on both sides (default: the pipeline's)."""
    ref, pipe, m = fam
    lat = m.latent
    shape = (B, lat.channels, lat.height, lat.width)
    x = noise(*shape)
    h, w = pipe.image_size[1], pipe.image_size[0]
    if lat.packing == 2:  # Flux: diffusers takes the packed latents
        from diffusers import FluxPipeline

        call = dict(call, latents=FluxPipeline._pack_latents(x, *shape), max_sequence_length=t5_len or 512)
    else:
        call = dict(
            call, latents=x.clone(), negative_prompt=negative or ""
        )  # PixArt's default is "", not None
    want = ref(
        prompt,
        num_inference_steps=steps,
        guidance_scale=guidance,
        height=h,
        width=w,
        num_images_per_prompt=B,
        output_type="np",
        **call,
    ).images
    got = pipe(
        prompt=prompt,
        negative_prompt=negative,
        steps=steps,
        guidance=guidance,
        latents=x.numpy(),
        batch_size=B,
        max_sequence_length=t5_len,
    ).pixels
    return got, want


PIXART_CALL = dict(use_resolution_binning=False, clean_caption=False)
# (steps, guidance, negative prompt): the dummy test's call first, then CFG off (guidance <= 1) and more steps
TEXT_CASES = [(2, 5.0, None), (8, 4.5, "blurry, low quality"), (8, 1.0, "blurry"), (6, 0.0, None)]


@pytest.fixture(scope="module")
def pixart_sigma(tmp_path_factory):
    return exported(tc.pixart_pipeline(sigma=True), tmp_path_factory, "pixart-sigma")


@pytest.mark.slow
@pytest.mark.parametrize("steps,guidance,negative", TEXT_CASES)
def test_pixart_sigma(pixart_sigma, steps, guidance, negative):
    """tests/pipelines/pixart_sigma/test_pixart.py: DDIMScheduler() (clip_sample=True), AutoencoderKL(), T5."""
    assert pixart_sigma[2].scheduler.config["_class_name"] == "DDIMScheduler"
    got, want = run_text(pixart_sigma, steps, guidance, negative, **PIXART_CALL)
    compare(got, want, f"PixArt-Σ {steps} steps, guidance {guidance}")


@pytest.fixture(scope="module")
def sana(tmp_path_factory):
    return exported(
        tc.sana_pipeline(), tmp_path_factory, "sana", height=32, width=32
    )  # the dummy test's size


@pytest.mark.slow
@pytest.mark.parametrize(
    "steps,guidance,negative,prompt",
    [(2, 6.0, "", ""), (2, 6.0, "", PROMPT), (6, 4.5, "blurry", PROMPT), (6, 0.0, None, PROMPT)],
)
def test_sana(sana, steps, guidance, negative, prompt):
    """tests/pipelines/sana/test_sana.py: FlowMatchEulerDiscreteScheduler(shift=7.0), 2-block DC-AE, Gemma-2;
    its call encodes the empty prompt at guidance 6."""
    assert sana[2].scheduler.config["shift"] == 7.0
    got, want = run_text(sana, steps, guidance, negative, prompt=prompt, **PIXART_CALL)
    compare(got, want, f"Sana {steps} steps, guidance {guidance}, prompt {prompt!r}")


@pytest.fixture(scope="module")
def sd3(tmp_path_factory):
    return exported(tc.sd3_pipeline(), tmp_path_factory, "sd3")


@pytest.mark.slow
@pytest.mark.parametrize("steps,guidance,negative", [(2, 5.0, None), (6, 7.0, "blurry"), (6, 0.0, None)])
def test_sd3(sd3, steps, guidance, negative):
    """tests/pipelines/stable_diffusion_3/test_pipeline_stable_diffusion_3.py: FlowMatchEulerDiscreteScheduler()
    (shift 1), two CLIPs whose 64 joint channels the pipeline cuts to T5's 32, a factor-1 VAE, 32×32 images."""
    assert [t.max_length for t in sd3[2].text][:2] == [77, 77]
    got, want = run_text(sd3, steps, guidance, negative)
    compare(got, want, f"SD3 {steps} steps, guidance {guidance}")


@pytest.fixture(scope="module")
def flux(tmp_path_factory):
    return exported(tc.flux_pipeline(), tmp_path_factory, "flux", height=8, width=8)  # the dummy test's size


@pytest.mark.slow
@pytest.mark.parametrize("steps,guidance", [(2, 5.0), (6, 1.0)])
def test_flux(flux, steps, guidance):
    """tests/pipelines/flux/test_pipeline_flux.py: FlowMatchEulerDiscreteScheduler() (shift 1, no dynamic
    shifting), a 1-channel factor-1 VAE (8×8 images = 4×4 packed tokens), no guidance embedding."""
    assert flux[2].scheduler.config["use_dynamic_shifting"] is False
    got, want = run_text(flux, steps, guidance, None, t5_len=48)  # the dummy test's max_sequence_length
    compare(got, want, f"Flux {steps} steps, guidance {guidance}")


@pytest.mark.slow
@pytest.mark.parametrize("family", ["pixart_sigma", "sana", "sd3", "flux"])
def test_prompt_moves_the_image(request, family):
    """Another prompt (and, with CFG, another negative prompt) changes the image by far more than the bound."""
    _, pipe, m = request.getfixturevalue(family)
    x = noise(1, m.latent.channels, m.latent.height, m.latent.width).numpy()

    def run(**kw):
        return pipe(steps=4, guidance=4.5, latents=x, **kw).pixels

    a = run(prompt=PROMPT)
    matters(a, run(prompt=OTHER), f"{family}: the prompt")
    if family != "flux":  # Flux.1 has no negative prompt
        matters(a, run(prompt=PROMPT, negative_prompt=OTHER), f"{family}: the negative prompt")


# ---------------------------------------------------------------- DiT (class-conditional)
@pytest.fixture(scope="module")
def dit(tmp_path_factory):
    return exported(tc.dit_pipeline(), tmp_path_factory, "dit")


def run_dit(fam, steps, guidance, label=1):
    """DiTPipeline has no latents argument: it draws (B, C, s, s) from the generator, so the runtime gets the same."""
    ref, pipe, m = fam
    want = ref(
        class_labels=[label] * B,
        guidance_scale=guidance,
        num_inference_steps=steps,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    ).images
    x = noise(B, m.latent.channels, m.latent.height, m.latent.width).numpy()
    return pipe(class_label=label, steps=steps, guidance=guidance, latents=x, batch_size=B).pixels, want


@pytest.mark.parametrize("steps,guidance", [(2, 4.0), (10, 1.5), (10, 1.0)])
def test_dit(dit, steps, guidance):
    """tests/pipelines/dit/test_dit.py: DDIMScheduler() (clip_sample=True, leading spacing), AutoencoderKL(), a
    patch-4 DiT at 16×16 (block embedders tied, see tiny_components.dit_pipeline)."""
    assert dit[2].scheduler.config["clip_sample"] is True
    got, want = run_dit(dit, steps, guidance)
    compare(got, want, f"DiT {steps} steps, guidance {guidance}")
    if steps == 2:
        matters(got, run_dit(dit, steps, guidance, label=7)[0], "DiT: the class label")


# ---------------------------------------------------------------- odd heads / odd grids (one per family, slow)
@pytest.fixture(scope="module")
def dit_odd(tmp_path_factory):
    """3 heads and a 5×5 token grid (sample_size 20, patch 4); diffusers' DiT is square-only."""
    return exported(tc.dit_pipeline(num_attention_heads=3, sample_size=20), tmp_path_factory, "dit-odd")


@pytest.mark.slow
@pytest.mark.parametrize("steps,guidance", [(4, 4.0), (6, 1.0)])
def test_dit_odd(dit_odd, steps, guidance):
    got, want = run_dit(dit_odd, steps, guidance)
    compare(got, want, f"DiT odd {steps} steps, guidance {guidance}")


@pytest.fixture(scope="module")
def pixart_alpha_odd(tmp_path_factory):
    """tests/pipelines/pixart_alpha/test_pixart.py's components (the Σ test's, in a PixArtAlphaPipeline) with 5
    heads, at 8×24 pixels (PixArt checks height/width % 8): a non-square 4×12 token grid."""
    return exported(
        tc.pixart_pipeline(sigma=False, num_attention_heads=5, cross_attention_dim=40),
        tmp_path_factory,
        "pixart-alpha-odd",
        height=8,
        width=24,
    )


@pytest.mark.slow
@pytest.mark.parametrize("steps,guidance,negative", TEXT_CASES[:3])
def test_pixart_alpha_odd(pixart_alpha_odd, steps, guidance, negative):
    got, want = run_text(pixart_alpha_odd, steps, guidance, negative, **PIXART_CALL)
    compare(got, want, f"PixArt-α 5 heads 8x24, {steps} steps, guidance {guidance}")


@pytest.mark.slow
def test_pixart_alpha_long_prompt_is_cut_where_diffusers_cuts_it(pixart_alpha_odd):
    long = "a photo of a cat sitting on a red sofa, a painting of a dog on the beach at sunset " * 12
    assert len(pixart_alpha_odd[0].tokenizer(long).input_ids) > 300
    got, want = run_text(pixart_alpha_odd, 4, 4.5, None, prompt=long, **PIXART_CALL)
    compare(got, want, "PixArt-α long prompt")


ODD_TEXT = {  # name: (builder, export size)
    # Sana checks % 32: 32×64 pixels = a non-square 16×32 latent; 3 self- and 3 cross-attention heads
    "sana-3-heads-32x64": (
        lambda: tc.sana_pipeline(num_attention_heads=3, num_cross_attention_heads=3, cross_attention_dim=12),
        dict(height=32, width=64),
    ),
    # SD3.5 (dual attention in block 0, RMS qk norm: the SD35 model test's switches) on the SD3 dummy, 3 heads;
    # a factor-1 VAE and patch 1 take any size: a 5×9 latent cropped from the 96×96 position table
    "sd35-3-heads-5x9": (
        lambda: tc.sd3_pipeline(
            num_attention_heads=3,
            caption_projection_dim=24,
            num_layers=2,
            qk_norm="rms_norm",
            dual_attention_layers=(0,),
        ),
        dict(height=5, width=9),
    ),
    # Flux-dev (guidance embedding) on the Flux dummy, 3 heads: 6×10 pixels = a 3×5 packed grid
    "flux-dev-3-heads-6x10": (
        lambda: tc.flux_pipeline(num_attention_heads=3, guidance_embeds=True),
        dict(height=6, width=10),
    ),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", ODD_TEXT)
def test_odd_variant(tmp_path_factory, name):
    build, size = ODD_TEXT[name]
    fam = exported(build(), tmp_path_factory, name, **size)
    assert fam[1].image_size == (size["width"], size["height"])
    call = PIXART_CALL if name.startswith("sana") else {}
    for steps, guidance, negative in [(4, 4.5, "blurry"), (5, 1.0, None)]:
        got, want = run_text(fam, steps, guidance, negative, **call)
        compare(got, want, f"{name} {steps} steps, guidance {guidance}")
