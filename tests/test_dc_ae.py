"""AutoencoderDC (DC-AE) decoders loaded from diffusers folders match diffusers' decode (fp32, tiny configs)."""

import pytest
import torch
from tiny_components import dc_ae_config, randomize

from ditrt.export.loaders.diffusers import load_component
from ditrt.export.models import dc_ae
from ditrt.runtime.errors import ConfigError

# fp32 throughout, same op order as diffusers except RMSNorm's channel mean (reduced over dim 1 instead of a moved
# last dim) and, on grids of <= attention_head_dim positions, the linear instead of diffusers' quadratic form of the
# same attention: rounding only, relative to the output scale
RTOL_OF_SCALE = 1e-4


@pytest.mark.parametrize("upsample", ["interpolate", "pixel_shuffle"])
@pytest.mark.parametrize(
    "hw", [(6, 5), (2, 2)]
)  # 30 positions: diffusers' linear path; 4 (<= head dim): quadratic
def test_dc_ae_decoder_matches_diffusers(tmp_path, upsample, hw):
    from diffusers import AutoencoderDC

    ref = randomize(AutoencoderDC(**dc_ae_config(upsample)), seed=1)
    ref.save_pretrained(tmp_path / "vae")
    ours = load_component(tmp_path / "vae")
    assert isinstance(ours, dc_ae.DCAEDecoder)
    latents = torch.randn(2, 4, *hw, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = ref.decode(latents / ref.config.scaling_factor).sample
        got = ours(latents)
    assert got.shape == want.shape == (2, 3, 4 * hw[0], 4 * hw[1])
    torch.testing.assert_close(got, want, atol=RTOL_OF_SCALE * float(want.abs().max()), rtol=0)


def test_dc_ae_defaults_are_the_sana_release():
    cfg = dc_ae.DCAEConfig()
    assert (
        cfg.decoder_block_types[2:4] == ("ResBlock", "EfficientViTBlock")
        and cfg.upsample_block_type == "interpolate"
    )
    n_params = sum(p.numel() for p in dc_ae.DCAEDecoder(cfg).parameters())
    assert 150e6 < n_params < 170e6  # the released decoder holds about 159 M parameters


@pytest.mark.parametrize(
    "key,value",
    [
        ("decoder_norm_types", "batch_norm"),
        ("decoder_act_fns", "relu6"),
        ("upsample_block_type", "bicubic"),
        ("decoder_block_types", "ResnetBlock"),
        ("decoder_layers_per_block", (0, 1, 1)),
        ("decoder_conv_act_fn", "tanh"),
    ],
)
def test_dc_ae_refuses_unsupported_config(key, value):
    d = dict(dc_ae_config("interpolate"), **{key: value})
    with pytest.raises(ConfigError, match=f"{key}.*{value if isinstance(value, str) else 0}"):
        dc_ae.config_from_diffusers(d)
