"""PixArt-α/Σ and Sana loaded from diffusers folders match diffusers (fp32, tiny random configs)."""

import pytest
import torch
from tiny_components import randomize

from ditrt.export.loaders.diffusers import load_component
from ditrt.runtime.errors import ConfigError, LoaderError

# fp32, same weights; attention/linear-attention sums run in another order than diffusers': rounding only
ATOL = 1e-4


def text_inputs(B, T, C, masked, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.randn(B, T, C, generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    if masked:
        mask[0, T // 2 :] = 0  # first sample: half of the text is padding
        mask[1, 1:] = 0
    return y, mask


def saved(model, tmp_path):
    model = randomize(model)
    model.save_pretrained(tmp_path / "transformer")
    return model, load_component(tmp_path / "transformer")


@pytest.mark.parametrize("variant", ["sigma", "alpha-micro", "sigma-unmasked", "sigma-other-size"])
def test_pixart_matches_diffusers(tmp_path, variant):
    from diffusers import PixArtTransformer2DModel

    micro = variant == "alpha-micro"
    cfg = dict(
        num_attention_heads=2,
        attention_head_dim=12,
        in_channels=4,
        out_channels=8,
        num_layers=2,
        cross_attention_dim=24,
        caption_channels=16,
        sample_size=8,
        patch_size=2,
        interpolation_scale=2,
        use_additional_conditions=micro,
        norm_type="ada_norm_single",
        norm_elementwise_affine=False,
        norm_eps=1e-6,
        attention_bias=True,
        activation_fn="gelu-approximate",
        num_embeds_ada_norm=1000,
    )
    ref, ours = saved(PixArtTransformer2DModel(**cfg), tmp_path)
    size = 12 if variant == "sigma-other-size" else 8  # another resolution: the sin-cos grid is rescaled
    x = torch.randn(2, 4, size, size, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([999, 20])
    y, mask = text_inputs(2, 6, 16, masked=variant != "sigma-unmasked")
    micro_kw = (
        {
            "resolution": torch.tensor([[512.0, 768.0], [1024.0, 1024.0]]),
            "aspect_ratio": torch.tensor([[1.5], [1.0]]),
        }
        if micro
        else {"resolution": None, "aspect_ratio": None}
    )
    with torch.no_grad():
        want = ref(
            x, encoder_hidden_states=y, timestep=t, encoder_attention_mask=mask, added_cond_kwargs=micro_kw
        ).sample
        got = ours(x, t.float(), y, mask, **({} if not micro else micro_kw))
    assert got.shape == want.shape == (2, 8, size, size)
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)


@pytest.mark.parametrize("masked", [True, False], ids=["mask", "no-mask"])
@pytest.mark.parametrize("pe", [None, 1.0], ids=["no-pe", "sincos-pe"])
def test_sana_matches_diffusers(tmp_path, masked, pe):
    from diffusers import SanaTransformer2DModel

    cfg = dict(
        in_channels=8,
        out_channels=8,
        num_attention_heads=2,
        attention_head_dim=8,
        num_layers=2,
        num_cross_attention_heads=2,
        cross_attention_head_dim=8,
        cross_attention_dim=16,
        caption_channels=12,
        sample_size=8,
        patch_size=1,
        interpolation_scale=pe,
    )
    ref, ours = saved(SanaTransformer2DModel(**cfg), tmp_path)
    x = torch.randn(2, 8, 8, 8, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([999, 136])  # Sana feeds int(σ·1000)
    y, mask = text_inputs(2, 5, 12, masked)
    with torch.no_grad():
        want = ref(
            x, encoder_hidden_states=y, timestep=t, encoder_attention_mask=mask if masked else None
        ).sample
        got = ours(x, t.float(), y, mask if masked else None)
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
    if masked:  # the mask really matters
        with torch.no_grad():
            assert (ours(x, t.float(), y, None) - got).abs().max() > 1e-3


def test_sana_bf16_weights_load(tmp_path):
    import copy

    from diffusers import SanaTransformer2DModel

    ref = randomize(
        SanaTransformer2DModel(
            in_channels=8,
            out_channels=8,
            num_attention_heads=2,
            attention_head_dim=8,
            num_layers=1,
            num_cross_attention_heads=2,
            cross_attention_head_dim=8,
            cross_attention_dim=16,
            caption_channels=12,
            sample_size=8,
        )
    )
    with torch.no_grad():
        for p in ref.parameters():
            p.copy_(p.bfloat16().float())
    copy.deepcopy(ref).to(torch.bfloat16).save_pretrained(tmp_path)
    ours = load_component(tmp_path)
    x, y = torch.randn(1, 8, 8, 8), torch.randn(1, 4, 12)
    with torch.no_grad():
        torch.testing.assert_close(
            ours(x, torch.tensor([500.0]), y), ref(x, y, torch.tensor([500])).sample, atol=ATOL, rtol=0
        )


def test_unsupported_sana_variant_is_named(tmp_path):
    import json

    from diffusers import SanaTransformer2DModel

    SanaTransformer2DModel(
        in_channels=8,
        out_channels=8,
        num_attention_heads=2,
        attention_head_dim=8,
        num_layers=1,
        num_cross_attention_heads=2,
        cross_attention_head_dim=8,
        cross_attention_dim=16,
        caption_channels=12,
        sample_size=8,
    ).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(dict(config, guidance_embeds=True)))
    with pytest.raises(ConfigError, match="guidance_embeds=True is not supported"):
        load_component(tmp_path)
    assert issubclass(ConfigError, ValueError) and not issubclass(LoaderError, ConfigError)
