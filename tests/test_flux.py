"""Flux.1: loader parity with diffusers' FluxTransformer2DModel at tiny sizes, latent packing, presets, errors."""

import copy

import pytest
import torch
from tiny_components import randomize

from ditrt.export.loaders.diffusers import load_component
from ditrt.export.models.flux import (
    FLUX_DEV,
    FLUX_SCHNELL,
    Flux,
    FluxConfig,
    config_from_diffusers,
    latent_image_ids,
    pack_latents,
    unpack_latents,
)
from ditrt.runtime.errors import ConfigError, InputError

# fp32 on CPU, same weights, same maths in a different order (fused LayerNorm+modulate, RoPE angles from fp32
# rather than fp64 frequencies): the differences are float rounding, ~1e-6 at these sizes
ATOL = 1e-4
TINY = dict(
    patch_size=1,
    in_channels=8,
    num_layers=1,
    num_single_layers=2,
    attention_head_dim=16,
    num_attention_heads=2,
    joint_attention_dim=12,
    pooled_projection_dim=10,
    axes_dims_rope=(4, 6, 6),
)


def diffusers_flux(folder, **overrides):
    from diffusers import FluxTransformer2DModel

    model = randomize(FluxTransformer2DModel(**dict(TINY, **overrides)))
    model.save_pretrained(folder)
    return model


def inputs(guidance: bool, height: int = 8, width: int = 12, batch: int = 2, seed: int = 1):
    """Packed latents for a height×width latent, 5 text tokens with non-zero ids (so their RoPE counts too)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, (height // 2) * (width // 2), 8, generator=g)
    txt_ids = torch.randint(0, 4, (5, 3), generator=g).float()
    return dict(
        hidden_states=x,
        timestep=torch.tensor([1.0, 0.3125][:batch]),
        encoder_hidden_states=torch.randn(batch, 5, 12, generator=g),
        pooled_projections=torch.randn(batch, 10, generator=g),
        img_ids=latent_image_ids(height, width),
        txt_ids=txt_ids,
        guidance=torch.tensor([3.5, 1.0][:batch]) if guidance else None,
    )


def run_both(ref, ours, feeds):
    with torch.no_grad():
        want = ref(**feeds).sample
        got = ours(
            feeds["hidden_states"],
            feeds["timestep"],
            feeds["encoder_hidden_states"],
            feeds["pooled_projections"],
            feeds["img_ids"],
            feeds["txt_ids"],
            feeds["guidance"],
        )
    return got, want


@pytest.mark.parametrize("guidance", [True, False], ids=["dev", "schnell"])
def test_flux_matches_diffusers(tmp_path, guidance):
    ref = diffusers_flux(tmp_path, guidance_embeds=guidance)
    got, want = run_both(ref, load_component(tmp_path), inputs(guidance))
    assert got.shape == want.shape == (2, 24, 8)
    print(f"guidance_embeds={guidance}: max abs diff {(got - want).abs().max().item():.2e}")
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_flux_half_precision_weights_load(tmp_path, dtype):
    ref = diffusers_flux(tmp_path / "fp32", guidance_embeds=True)
    with torch.no_grad():  # make the fp32 reference hold exactly the stored half-precision values
        for p in ref.parameters():
            p.copy_(p.to(dtype).float())
    copy.deepcopy(ref).to(dtype).save_pretrained(tmp_path / "half")
    got, want = run_both(ref, load_component(tmp_path / "half"), inputs(True))
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)


def test_packing_matches_flux_pipeline():
    from diffusers import FluxPipeline

    latents = torch.randn(2, 16, 6, 10)
    packed = pack_latents(latents)
    torch.testing.assert_close(packed, FluxPipeline._pack_latents(latents, 2, 16, 6, 10), atol=0, rtol=0)
    torch.testing.assert_close(
        unpack_latents(packed, 6, 10), FluxPipeline._unpack_latents(packed, 48, 80, 8), atol=0, rtol=0
    )
    assert torch.equal(unpack_latents(packed, 6, 10), latents)
    want = FluxPipeline._prepare_latent_image_ids(2, 3, 5, "cpu", torch.float32)
    torch.testing.assert_close(latent_image_ids(6, 10), want, atol=0, rtol=0)
    with pytest.raises(InputError, match="latent 6x9 must have even sides"):
        pack_latents(torch.randn(1, 16, 6, 9))


def test_rope_tables_match_diffusers_at_full_size():
    """diffusers builds the angles in fp64; ours multiply fp32 ids by its frequencies rounded to fp32 (no fp64 in
    TensorRT): ~1e-5 off at 1024²."""
    from diffusers.models.transformers.transformer_flux import FluxPosEmbed

    from ditrt.export.models.layers import rope_freqs, rope_omega

    ids = torch.cat([torch.zeros(512, 3), latent_image_ids(128, 128)])  # 1024² image, T5 length 512
    axes = (16, 56, 56)
    for got, want in zip(rope_freqs(ids, axes, rope_omega(axes)), FluxPosEmbed(10000, list(axes))(ids)):
        torch.testing.assert_close(got, want, atol=2e-5, rtol=0)


@pytest.mark.parametrize(
    "cfg,params", [(FLUX_DEV, 11901.4e6), (FLUX_SCHNELL, 11891.2e6)], ids=["dev", "schnell"]
)
def test_released_sizes(cfg, params):
    """Parameter counts against architectures.md §8 (Flux has no buffers)."""
    with torch.device("meta"):
        model = Flux(cfg)
    assert abs(sum(p.numel() for p in model.parameters()) - params) <= 0.05e6
    assert not list(model.buffers())


def test_config_from_diffusers_reads_released_shape():
    d = dict(
        patch_size=1,
        in_channels=64,
        num_layers=19,
        num_single_layers=38,
        attention_head_dim=128,
        num_attention_heads=24,
        joint_attention_dim=4096,
        pooled_projection_dim=768,
        guidance_embeds=False,
        axes_dims_rope=[16, 56, 56],
    )
    assert config_from_diffusers(d) == FLUX_SCHNELL
    assert config_from_diffusers(dict(d, guidance_embeds=True)) == FLUX_DEV


@pytest.mark.parametrize(
    "key,value,match",
    [
        ("patch_size", 2, "patch_size=2 is not supported"),
        (
            "axes_dims_rope",
            (4, 6, 8),
            r"axes_dims_rope=\(4, 6, 8\) must be even sizes summing to head_dim=16",
        ),
    ],
)
def test_unsupported_configs_are_refused(key, value, match):
    with pytest.raises(ConfigError, match=match):
        config_from_diffusers(dict(TINY, **{key: value}))


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="num_heads=5"):
        FluxConfig(num_heads=5)


@pytest.mark.parametrize("guidance_embeds", [True, False])
def test_guidance_input_must_fit_the_model(guidance_embeds):
    cfg = FluxConfig(
        in_channels=8,
        out_channels=8,
        hidden_size=32,
        num_heads=2,
        depth=1,
        depth_single=1,
        joint_attention_dim=12,
        pooled_projection_dim=10,
        guidance_embeds=guidance_embeds,
        axes_dims_rope=(4, 6, 6),
    )
    feeds = inputs(not guidance_embeds)
    with pytest.raises(InputError, match=f"guidance_embeds={guidance_embeds}"):
        Flux(cfg)(
            *[
                feeds[k]
                for k in (
                    "hidden_states",
                    "timestep",
                    "encoder_hidden_states",
                    "pooled_projections",
                    "img_ids",
                    "txt_ids",
                    "guidance",
                )
            ]
        )
