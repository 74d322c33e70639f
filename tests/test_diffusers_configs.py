"""Denoiser parity at configurations we did not design: diffusers' own test-suite transformer configs (model tests
and the transformers inside the pipelines' get_dummy_components, see tiny_components), with their default
initialisation and input shapes, plus an odd-head / odd-grid / odd-text-length variant per family.

Our loader (`load_component` on the saved folder) against the diffusers model, fp32, same inputs.
Bound: max |ours − diffusers| ≤ 1e-4 · max |diffusers| (at least 1e-4 absolute). Both sides are fp32 on CPU and
compute the same maths in another order (fused LayerNorm+modulate, joint-attention token order, RoPE angles from
fp32 rather than fp64 frequencies), so the difference is rounding, which grows with the size of the activations:
hence a bound relative to the output's magnitude. Each case also checks that the inputs that could be mishandled
(text, timestep) move the output by far more than the bound, so a dropped input cannot pass.
"""

import pytest
import tiny_components as tc
import torch
from tiny_components import randomize

from ditrt.export.loaders.diffusers import load_component
from ditrt.runtime.errors import LoaderError

REL = 1e-4


@pytest.fixture(params=["diffusers-init", "random"])
def weights(request):
    return request.param


def saved(cls, config: dict, tmp_path, weights: str, prepare=None):
    """diffusers' model, saved and loaded by our loader. Weights: diffusers' own initialisation (seeded as its tests
    do), or every saved tensor (parameters and persistent buffers such as SD3's position table; not the sin-cos
    tables diffusers recomputes) drawn from N(0, 0.1²). With diffusers' init some inputs hardly matter (SD3's text
    moves the output of its pipeline dummy by 7e-4, 4× the bound), so the `moves` checks run on the random weights."""
    torch.manual_seed(0)
    ref = cls(**config).eval()
    if weights == "random":
        randomize(ref, seed=0, buffers="saved")
    if prepare is not None:
        prepare(ref)
    ref.save_pretrained(tmp_path / "transformer")
    return ref, load_component(tmp_path / "transformer").eval()


def check(got: torch.Tensor, want: torch.Tensor, label: str) -> float:
    assert got.shape == want.shape, (got.shape, want.shape)
    diff = (got - want).abs().max().item()
    bound = REL * max(1.0, want.abs().max().item())
    print(f"{label}: max abs diff {diff:.2e} (bound {bound:.1e}, max |out| {want.abs().max().item():.2f})")
    assert diff <= bound, f"{label}: {diff:.3e} > {bound:.1e}"
    return bound


def moves(a: torch.Tensor, b: torch.Tensor, bound: float, what: str, weights: str):
    """Changing `what` changes the output by 10× the parity bound or more (so the test would see it lost)."""
    print(f"  {what} moves the output by {(a - b).abs().max().item():.2e}")
    if weights == "random":
        assert (a - b).abs().max().item() > 10 * bound, f"{what} barely changes the output"


def rand(*shape, g):
    return torch.randn(*shape, generator=g)


# ---------------------------------------------------------------- DiT
DIT_CASES = {  # name: (config, latent side, class count for labels incl. the null class)
    "model-test": tc.DIT_MODEL,  # tests/models/transformers/test_models_dit_transformer2d.py
    "pipeline-dummy": tc.DIT_PIPE,  # tests/pipelines/dit/test_dit.py (2 layers, embedders tied below)
    "odd": dict(
        tc.DIT_MODEL, num_attention_heads=3, in_channels=3, out_channels=6, sample_size=10, num_layers=2
    ),
}  # odd: 3 heads, 3 channels, a 5×5 token grid (diffusers' DiT unpatchify is square-only)


@pytest.mark.parametrize("case", DIT_CASES)
def test_dit(tmp_path, case, weights):
    from diffusers import DiTTransformer2DModel

    cfg = DIT_CASES[case]
    ref, ours = saved(DiTTransformer2DModel, cfg, tmp_path, weights, prepare=tc.tie_dit_embedders)
    g = torch.Generator().manual_seed(1)
    s, n = cfg["sample_size"], cfg["num_embeds_ada_norm"]
    x = rand(4, cfg["in_channels"], s, s, g=g)
    t = torch.tensor([999, 0, 500, 37])
    y = torch.tensor([0, n - 1, n, 1])  # n: the null (unconditional) class
    with torch.no_grad():
        want = ref(x, timestep=t, class_labels=y).sample
        got = ours(x, t.float(), y)
        bound = check(got, want, f"DiT {case}")
        moves(ours(x, t.float(), y.flip(0)), got, bound, "the class label", weights)


def test_dit_distinct_block_embedders_are_refused(tmp_path):
    """diffusers' DiT pipeline dummy initialises each block's timestep/class embedder on its own; our model has one
    shared embedder (as every released DiT checkpoint), so distinct copies must be refused, never silently dropped."""
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(0)
    DiTTransformer2DModel(**tc.DIT_PIPE).save_pretrained(tmp_path)
    with pytest.raises(
        LoaderError,
        match=r"transformer_blocks\.1\.norm1\.emb.* differs from .*transformer_blocks\.0"
        r"\.norm1\.emb.*must be identical",
    ):
        load_component(tmp_path)


# ---------------------------------------------------------------- PixArt
PIXART_CASES = {  # name: (config, latent (H, W), text length, with a padding mask)
    # test_models_pixart_transformer2d.py: caption_channels=None, cross_attention_dim 8 over a width of 2×2
    # (caption_channels=None: no projection, the cross-attention reads the text states as they are)
    "model-test": (tc.PIXART_MODEL, (8, 8), 8, False),
    "model-test-same-width": (dict(tc.PIXART_MODEL, cross_attention_dim=4), (8, 8), 8, True),
    "pipeline-dummy": (
        tc.PIXART_PIPE,
        (8, 8),
        8,
        True,
    ),  # tests/pipelines/pixart_{alpha,sigma}/test_pixart.py
    "pipeline-dummy-non-square": (
        tc.PIXART_PIPE,
        (32, 48),
        8,
        True,
    ),  # their test_inference_non_square_images
    "odd": (
        dict(
            tc.PIXART_PIPE,
            num_attention_heads=3,
            attention_head_dim=4,
            cross_attention_dim=12,
            caption_channels=10,
        ),
        (6, 10),
        7,
        True,
    ),  # 3 heads, 3×5 grid, 7 text tokens
    "odd-micro-conditions": (
        dict(
            tc.PIXART_PIPE,
            num_attention_heads=3,
            attention_head_dim=4,
            cross_attention_dim=12,
            caption_channels=10,
            use_additional_conditions=True,
        ),
        (6, 10),
        7,
        True,
    ),
}


@pytest.mark.parametrize("case", PIXART_CASES.values(), ids=PIXART_CASES)
def test_pixart(tmp_path, case, weights):
    from diffusers import PixArtTransformer2DModel

    cfg, (H, W), T, masked = case
    ref, ours = saved(PixArtTransformer2DModel, cfg, tmp_path, weights)
    g = torch.Generator().manual_seed(1)
    x = rand(4, cfg["in_channels"], H, W, g=g)
    t = torch.tensor([999, 0, 500, 37])
    y = rand(4, T, cfg["caption_channels"] or cfg["cross_attention_dim"], g=g)
    mask = torch.ones(4, T, dtype=torch.long)
    if masked:
        mask[0, T // 2 :] = 0
        mask[1, 1:] = 0
    micro = (
        {"resolution": torch.tensor([[H * 8.0, W * 8.0]] * 4), "aspect_ratio": torch.tensor([[H / W]] * 4)}
        if cfg.get("use_additional_conditions")
        else {"resolution": None, "aspect_ratio": None}
    )
    with torch.no_grad():
        want = ref(
            x,
            encoder_hidden_states=y,
            timestep=t,
            encoder_attention_mask=mask if masked else None,
            added_cond_kwargs=micro,
        ).sample
        got = ours(
            x, t.float(), y, mask if masked else None, **{k: v for k, v in micro.items() if v is not None}
        )
        bound = check(got, want, f"PixArt {H}x{W}")
        moves(
            ours(
                x,
                t.float(),
                y.flip(0),
                mask if masked else None,
                **{k: v for k, v in micro.items() if v is not None},
            ),
            got,
            bound,
            "the text",
            weights,
        )


# ---------------------------------------------------------------- Sana
SANA_CASES = {  # name: (config, latent (H, W), text length, masked)
    "model-test": (
        tc.SANA_MODEL,
        (32, 32),
        8,
        False,
    ),  # test_models_transformer_sana.py (= the pipeline dummy's)
    "model-test-masked": (tc.SANA_MODEL, (32, 32), 8, True),
    "odd": (
        dict(
            tc.SANA_MODEL,
            num_attention_heads=3,
            num_cross_attention_heads=3,
            cross_attention_dim=12,
            caption_channels=10,
        ),
        (5, 9),
        7,
        True,
    ),  # 3 heads, 5×9 grid, 7 text tokens
    "odd-patch-2-sincos": (
        dict(
            tc.SANA_MODEL,
            num_attention_heads=3,
            num_cross_attention_heads=3,
            cross_attention_dim=12,
            caption_channels=10,
            patch_size=2,
            interpolation_scale=1.0,
        ),
        (6, 10),
        7,
        True,
    ),  # 3×5 grid with the optional sin-cos position table
}


@pytest.mark.parametrize("case", SANA_CASES)
def test_sana(tmp_path, case, weights):
    from diffusers import SanaTransformer2DModel

    cfg, (H, W), T, masked = SANA_CASES[case]
    ref, ours = saved(SanaTransformer2DModel, cfg, tmp_path, weights)
    g = torch.Generator().manual_seed(1)
    x = rand(2, cfg["in_channels"], H, W, g=g)
    t = torch.tensor([999, 136])  # SanaPipeline feeds the flow timestep σ·1000
    y = rand(2, T, cfg["caption_channels"], g=g)
    mask = torch.ones(2, T, dtype=torch.long)
    mask[0, T // 2 :] = 0
    mask = mask if masked else None
    with torch.no_grad():
        want = ref(x, encoder_hidden_states=y, timestep=t, encoder_attention_mask=mask).sample
        got = ours(x, t.float(), y, mask)
        bound = check(got, want, f"Sana {case}")
        moves(ours(x, t.float(), y.flip(0), mask), got, bound, "the text", weights)


# ---------------------------------------------------------------- SD3 / SD3.5
ODD_MMDIT = dict(num_attention_heads=3, caption_projection_dim=24, num_layers=2)
SD3_CASES = {  # name: (config, latent (H, W), text length)
    "sd3-model-test": (
        tc.SD3_MODEL,
        (32, 32),
        154,
    ),  # test_models_transformer_sd3.py SD3TransformerTesterConfig
    "sd35-model-test": (
        tc.SD35_MODEL,
        (32, 32),
        154,
    ),  # SD35TransformerTesterConfig: dual attention, RMS qk norm
    "sd3-pipeline-dummy": (tc.SD3_PIPE, (32, 32), 154),  # test_pipeline_stable_diffusion_3.py
    "sd3-odd": (
        dict(tc.SD3_MODEL, **ODD_MMDIT),
        (5, 9),
        7,
    ),  # 3 heads, a 5×9 crop of the 96×96 table, 7 tokens
    "sd35-odd": (dict(tc.SD35_MODEL, **ODD_MMDIT), (5, 9), 7),
    "sd35-odd-patch-2": (dict(tc.SD35_MODEL, **ODD_MMDIT, patch_size=2), (6, 10), 7),  # a 3×5 token grid
}


@pytest.mark.parametrize("case", SD3_CASES)
def test_sd3(tmp_path, case, weights):
    from diffusers import SD3Transformer2DModel

    cfg, (H, W), T = SD3_CASES[case]
    ref, ours = saved(SD3Transformer2DModel, cfg, tmp_path, weights)
    g = torch.Generator().manual_seed(1)
    x = rand(2, cfg["in_channels"], H, W, g=g)
    ctx, pooled = rand(2, T, cfg["joint_attention_dim"], g=g), rand(2, cfg["pooled_projection_dim"], g=g)
    t = torch.tensor([1000.0, 37.5])  # SD3 feeds σ·1000 as a float
    with torch.no_grad():
        want = ref(x, encoder_hidden_states=ctx, pooled_projections=pooled, timestep=t).sample
        got = ours(x, t, ctx, pooled)
        bound = check(got, want, f"SD3 {case}")
        moves(ours(x, t, ctx.flip(0), pooled), got, bound, "the text", weights)
        moves(ours(x, t.flip(0), ctx, pooled), got, bound, "the timestep", weights)


# ---------------------------------------------------------------- Flux
FLUX_CASES = {  # name: (config, packed latent grid (h, w) or None for diffusers' random ids, text length)
    "model-test": (
        tc.FLUX_MODEL,
        None,
        48,
    ),  # test_models_transformer_flux.py (= the pipeline dummy's): random ids
    "model-test-guidance": (dict(tc.FLUX_MODEL, guidance_embeds=True), None, 48),
    "odd": (dict(tc.FLUX_MODEL, num_attention_heads=3), (3, 5), 7),  # 3 heads, 3×5 packed grid, 7 text tokens
    "odd-guidance": (
        dict(tc.FLUX_MODEL, num_attention_heads=3, guidance_embeds=True, num_single_layers=2),
        (3, 5),
        7,
    ),
}


@pytest.mark.parametrize("case", FLUX_CASES)
def test_flux(tmp_path, case, weights):
    from diffusers import FluxTransformer2DModel

    from ditrt.export.models.flux import latent_image_ids

    cfg, grid, T = FLUX_CASES[case]
    ref, ours = saved(FluxTransformer2DModel, cfg, tmp_path, weights)
    g = torch.Generator().manual_seed(1)
    n = 16 if grid is None else grid[0] * grid[1]
    img_ids = rand(n, 3, g=g) if grid is None else latent_image_ids(2 * grid[0], 2 * grid[1])
    txt_ids = rand(T, 3, g=g) if grid is None else torch.zeros(T, 3)
    feeds = dict(
        hidden_states=rand(2, n, cfg["in_channels"], g=g),
        timestep=torch.tensor([1.0, 0.3125]),
        encoder_hidden_states=rand(2, T, cfg["joint_attention_dim"], g=g),
        pooled_projections=rand(2, cfg["pooled_projection_dim"], g=g),
        img_ids=img_ids,
        txt_ids=txt_ids,
        guidance=torch.tensor([3.5, 1.0]) if cfg.get("guidance_embeds") else None,
    )
    order = (
        "hidden_states",
        "timestep",
        "encoder_hidden_states",
        "pooled_projections",
        "img_ids",
        "txt_ids",
        "guidance",
    )
    with torch.no_grad():
        want = ref(**feeds).sample
        got = ours(*[feeds[k] for k in order])
        bound = check(got, want, f"Flux {case}")
        moves(
            ours(*[feeds[k].flip(0) if k == "encoder_hidden_states" else feeds[k] for k in order]),
            got,
            bound,
            "the text",
            weights,
        )
        if cfg.get("guidance_embeds"):
            moves(
                ours(*[feeds[k].flip(0) if k == "guidance" else feeds[k] for k in order]),
                got,
                bound,
                "the guidance",
                weights,
            )
