"""AutoencoderKL decoders loaded from diffusers folders match diffusers' decode (fp32, tiny configs)."""

import pytest
import torch

from conftest import randomize
from ditrt.export.loaders.diffusers import load_component

# fp32; GroupNorm/conv/attention in the same order as diffusers: rounding only, on outputs of size ~1-10
ATOL = 1e-4


@pytest.mark.parametrize("variant", ["sd-4ch", "sd3-16ch"])
def test_vae_decoder_matches_diffusers(tmp_path, variant):
    from diffusers import AutoencoderKL

    sd3 = variant == "sd3-16ch"
    cfg = dict(in_channels=3, out_channels=3, block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4,
               latent_channels=16 if sd3 else 4, down_block_types=("DownEncoderBlock2D",) * 2,
               up_block_types=("UpDecoderBlock2D",) * 2, scaling_factor=1.5305 if sd3 else 0.18215,
               shift_factor=0.0609 if sd3 else None, use_quant_conv=not sd3, use_post_quant_conv=not sd3)
    ref = randomize(AutoencoderKL(**cfg))
    ref.save_pretrained(tmp_path / "vae")
    ours = load_component(tmp_path / "vae")
    latents = torch.randn(2, cfg["latent_channels"], 6, 5, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = ref.decode(latents / ref.config.scaling_factor + (ref.config.shift_factor or 0.0)).sample
        got = ours(latents)
    assert got.shape == want.shape == (2, 3, 12, 10)
    torch.testing.assert_close(got, want, atol=ATOL * float(want.abs().max()), rtol=0)
