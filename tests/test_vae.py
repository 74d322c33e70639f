"""AutoencoderKL decoders loaded from diffusers folders match diffusers' decode (fp32, tiny configs)."""

import pytest
import torch
from tiny_components import dc_ae_config, randomize

from ditrt.export.loaders.diffusers import load_component

# fp32; GroupNorm/conv/attention in the same order as diffusers: rounding only, on outputs of size ~1-10
ATOL = 1e-4


@pytest.mark.parametrize("variant", ["sd-4ch", "sd3-16ch"])
def test_vae_decoder_matches_diffusers(tmp_path, variant):
    from diffusers import AutoencoderKL

    sd3 = variant == "sd3-16ch"
    cfg = dict(
        in_channels=3,
        out_channels=3,
        block_out_channels=(8, 16),
        layers_per_block=1,
        norm_num_groups=4,
        latent_channels=16 if sd3 else 4,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        scaling_factor=1.5305 if sd3 else 0.18215,
        shift_factor=0.0609 if sd3 else None,
        use_quant_conv=not sd3,
        use_post_quant_conv=not sd3,
    )
    ref = randomize(AutoencoderKL(**cfg))
    ref.save_pretrained(tmp_path / "vae")
    ours = load_component(tmp_path / "vae")
    latents = torch.randn(2, cfg["latent_channels"], 6, 5, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = ref.decode(latents / ref.config.scaling_factor + (ref.config.shift_factor or 0.0)).sample
        got = ours(latents)
    assert got.shape == want.shape == (2, 3, 12, 10)
    torch.testing.assert_close(got, want, atol=ATOL * float(want.abs().max()), rtol=0)


@pytest.mark.parametrize("kind", ["kl", "dc-ae"])
def test_decoder_engine_matches_torch(tmp_path, kind):
    """The vae_decoder engine (scale, decode, map to [0, 1]) on ONNX Runtime equals our torch module."""
    import numpy as np
    import onnxruntime as ort

    from ditrt.export.graphs import DecoderGraph, decoder_io
    from ditrt.export.models import dc_ae, vae_kl
    from ditrt.export.onnx_export import export_onnx

    if kind == "kl":
        vae = vae_kl.VAEDecoder(
            vae_kl.VAEConfig(
                latent_channels=16,
                block_out_channels=(8, 16),
                layers_per_block=1,
                norm_num_groups=4,
                post_quant_conv=False,
                shift_factor=0.06,
            )
        )
    else:
        vae = dc_ae.DCAEDecoder(dc_ae.config_from_diffusers(dc_ae_config("interpolate")))
    randomize(vae)
    graph = DecoderGraph(vae)
    inputs, outputs = decoder_io(vae, (6, 4))
    export_onnx(graph, inputs, outputs, tmp_path / "vae.onnx")
    latents = torch.randn(2, vae.cfg.latent_channels, 6, 4, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = graph(latents).numpy()
    got = ort.InferenceSession(str(tmp_path / "vae.onnx")).run(None, {"latents": latents.numpy()})[0]
    assert np.isfinite(got).all() and want.min() >= 0 and want.max() <= 1
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)  # fp32 [0, 1] pixels: rounding only
