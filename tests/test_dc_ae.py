"""AutoencoderDC (DC-AE) decoders loaded from diffusers folders match diffusers' decode (fp32, tiny configs)."""

import pytest
import torch

from conftest import randomize
from ditrt.export.loaders.diffusers import load_component
from ditrt.export.models import dc_ae
from ditrt.runtime.errors import ConfigError

# fp32 throughout, same op order as diffusers except RMSNorm's channel mean (reduced over dim 1 instead of a moved
# last dim) and, on grids of <= attention_head_dim positions, the linear instead of diffusers' quadratic form of the
# same attention: rounding only, relative to the output scale
RTOL_OF_SCALE = 1e-4


def tiny_config(upsample: str) -> dict:
    return dict(in_channels=3, latent_channels=4, attention_head_dim=4, scaling_factor=0.41407,
                encoder_block_types=("ResBlock", "ResBlock", "EfficientViTBlock"),
                decoder_block_types=("ResBlock", "EfficientViTBlock", "EfficientViTBlock"),
                encoder_block_out_channels=(8, 16, 32), decoder_block_out_channels=(8, 16, 32),
                encoder_layers_per_block=(1, 1, 1), decoder_layers_per_block=(1, 2, 1),
                encoder_qkv_multiscales=((), (), (5,)), decoder_qkv_multiscales=((), (3,), (3, 5)),
                upsample_block_type=upsample, downsample_block_type="pixel_unshuffle",
                decoder_norm_types="rms_norm", decoder_act_fns="silu", decoder_conv_act_fn="relu")


@pytest.mark.parametrize("upsample", ["interpolate", "pixel_shuffle"])
@pytest.mark.parametrize("hw", [(6, 5), (2, 2)])  # 30 positions: diffusers' linear path; 4 (<= head dim): quadratic
def test_dc_ae_decoder_matches_diffusers(tmp_path, upsample, hw):
    from diffusers import AutoencoderDC

    ref = randomize(AutoencoderDC(**tiny_config(upsample)), seed=1)
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
    assert cfg.decoder_block_types[2:4] == ("ResBlock", "EfficientViTBlock") and cfg.upsample_block_type == "interpolate"
    n_params = sum(p.numel() for p in dc_ae.DCAEDecoder(cfg).parameters())
    assert 150e6 < n_params < 170e6  # the released decoder holds about 159 M parameters


@pytest.mark.parametrize("key,value", [("decoder_norm_types", "batch_norm"), ("decoder_act_fns", "relu6"),
                                       ("upsample_block_type", "bicubic"), ("decoder_block_types", "ResnetBlock"),
                                       ("decoder_layers_per_block", (0, 1, 1)), ("decoder_conv_act_fn", "tanh")])
def test_dc_ae_refuses_unsupported_config(key, value):
    d = dict(tiny_config("interpolate"), **{key: value})
    with pytest.raises(ConfigError, match=f"{key}.*{value if isinstance(value, str) else 0}"):
        dc_ae.config_from_diffusers(d)
