"""SD3 / SD3.5 MMDiT: loader parity with diffusers' SD3Transformer2DModel at tiny sizes, presets, config errors."""

import copy
from dataclasses import replace

import pytest
import torch
from tiny_components import randomize

from ditrt.export.loaders.diffusers import load_component
from ditrt.export.models.mmdit import (
    SD3_MEDIUM,
    SD35_LARGE,
    SD35_MEDIUM,
    MMDiT,
    MMDiTConfig,
    config_from_diffusers,
)
from ditrt.runtime.errors import ConfigError, InputError

# fp32 on CPU, same weights, same maths in a different order (token order inside the joint attention, fused
# LayerNorm+modulate): the differences are float rounding, ~1e-6 at these sizes
ATOL = 1e-4
TINY = dict(
    sample_size=8,
    patch_size=2,
    in_channels=4,
    out_channels=4,
    num_layers=2,
    attention_head_dim=8,
    num_attention_heads=2,
    joint_attention_dim=12,
    caption_projection_dim=16,
    pooled_projection_dim=10,
    pos_embed_max_size=8,
)
CASES = {
    "sd3": {},
    "sd3.5-qk-norm": dict(qk_norm="rms_norm"),
    "sd3.5-medium-dual": dict(qk_norm="rms_norm", dual_attention_layers=(0,)),
}


def diffusers_sd3(folder, **overrides):
    from diffusers import SD3Transformer2DModel

    model = randomize(SD3Transformer2DModel(**dict(TINY, **overrides)), buffers=True)
    model.save_pretrained(folder)
    return model


def inputs(batch: int = 2, height: int = 8, width: int = 8, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(batch, 4, height, width, generator=g),
        torch.tensor([1000.0, 37.5][:batch]),
        torch.randn(batch, 5, 12, generator=g),
        torch.randn(batch, 10, generator=g),
    )


def run_both(ref, ours, x, t, ctx, pooled):
    with torch.no_grad():
        want = ref(x, encoder_hidden_states=ctx, pooled_projections=pooled, timestep=t).sample
        got = ours(x, t, ctx, pooled)
    return got, want


@pytest.mark.parametrize("size", [(8, 8), (12, 6)], ids=["square", "crop-non-square"])
@pytest.mark.parametrize("case", CASES)
def test_mmdit_matches_diffusers(tmp_path, case, size):
    ref = diffusers_sd3(tmp_path, **CASES[case])
    ours = load_component(tmp_path)
    got, want = run_both(ref, ours, *inputs(2, *size))
    assert got.shape == want.shape == (2, 4, *size)
    print(f"{case} {size}: max abs diff {(got - want).abs().max().item():.2e}")
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_mmdit_half_precision_weights_load(tmp_path, dtype):
    ref = diffusers_sd3(tmp_path / "fp32", qk_norm="rms_norm", dual_attention_layers=(0,))
    with torch.no_grad():  # make the fp32 reference hold exactly the stored half-precision values
        for t in [*ref.parameters(), *ref.buffers()]:
            t.copy_(t.to(dtype).float())
    copy.deepcopy(ref).to(dtype).save_pretrained(tmp_path / "half")
    got, want = run_both(ref, load_component(tmp_path / "half"), *inputs())
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)


@pytest.mark.parametrize(
    "cfg,params,buffer",
    [
        (SD3_MEDIUM, 2028.3e6, 56.6e6),
        (SD35_MEDIUM, 2243.2e6, 226.5e6),
        (SD35_LARGE, 8056.6e6, 89.7e6),
    ],
    ids=["sd3-medium", "sd3.5-medium", "sd3.5-large"],
)
def test_released_sizes(cfg, params, buffer):
    """Parameters and the position-table buffer (a buffer, as in diffusers) against architectures.md §8."""
    with torch.device("meta"):
        model = MMDiT(cfg)
    assert abs(sum(p.numel() for p in model.parameters()) - params) <= 0.05e6
    assert abs(sum(b.numel() for b in model.buffers()) - buffer) <= 0.05e6


def test_config_from_diffusers_reads_released_shape():
    d = dict(
        sample_size=128,
        num_layers=24,
        attention_head_dim=64,
        num_attention_heads=24,
        caption_projection_dim=1536,
        pos_embed_max_size=384,
        qk_norm="rms_norm",
        dual_attention_layers=list(range(13)),
        out_channels=None,
    )
    assert config_from_diffusers(d) == SD35_MEDIUM


@pytest.mark.parametrize(
    "key,value,match",
    [
        ("qk_norm", "layer_norm", "qk_norm='layer_norm' is not supported"),
        ("caption_projection_dim", 32, "caption_projection_dim=32 differs"),
        ("pos_embed_max_size", None, "pos_embed_max_size=None"),
        ("pos_embed_max_size", 2, "pos_embed_max_size=2 is smaller"),
        ("dual_attention_layers", [0, 5], r"dual_attention_layers holds \[5\]"),
    ],
)
def test_unsupported_configs_are_refused(key, value, match):
    with pytest.raises(ConfigError, match=match):
        config_from_diffusers(dict(TINY, **{key: value}))


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="num_heads=5"):
        replace(SD3_MEDIUM, num_heads=5)
    with pytest.raises(ValueError, match="sample_size=7"):
        MMDiTConfig(sample_size=7)


def test_latent_larger_than_position_table_is_refused(tmp_path):
    diffusers_sd3(tmp_path)
    ours = load_component(tmp_path)
    with pytest.raises(InputError, match="latent 18x8 .* at most 16"):
        ours(*inputs(2, 18, 8))
    with pytest.raises(InputError, match="latent 7x8 must be multiples of patch_size=2"):
        ours(*inputs(2, 7, 8))


def test_position_crop_exports_with_dynamic_latent_size(tmp_path):
    """The crop is a gather: exported as slices, odd token grids got a wrong slice end from torch.onnx."""
    import onnxruntime as ort

    from ditrt.export.ops import lowering

    diffusers_sd3(tmp_path / "model")
    ours = load_component(tmp_path / "model")
    h, w = torch.export.Dim("h", min=1, max=8), torch.export.Dim("w", min=1, max=8)
    dynamic = ({2: 2 * h, 3: 2 * w}, None, None, None)
    with lowering("reference"), torch.no_grad():
        torch.onnx.export(ours, inputs(), dynamic_shapes=dynamic, dynamo=True).save(str(tmp_path / "m.onnx"))
    session = ort.InferenceSession(str(tmp_path / "m.onnx"))
    feeds = inputs(2, 14, 6)  # a 7x3 token grid: odd offsets into the 8x8 table
    got = session.run(None, {i.name: a.numpy() for i, a in zip(session.get_inputs(), feeds)})[0]
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(got), ours(*feeds), atol=ATOL, rtol=0)
