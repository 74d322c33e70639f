import numpy as np
import pytest
import torch
from tiny_components import randomize

from ditrt.export.models.dit import DiT, DiTConfig
from ditrt.export.models.layers import sincos_pos_embed_2d, timestep_embedding, timestep_freqs

TINY = DiTConfig(
    sample_size=8, in_channels=4, patch_size=2, hidden_size=32, depth=2, num_heads=4, num_classes=5
)


@pytest.mark.parametrize("shift", [0, 1])
def test_timestep_embedding_matches_diffusers(shift):
    from diffusers.models.embeddings import get_timestep_embedding

    t = torch.tensor([0.0, 1.5, 250.0, 999.0, 1000.0])
    ref = get_timestep_embedding(t, 256, flip_sin_to_cos=True, downscale_freq_shift=shift)
    torch.testing.assert_close(
        timestep_embedding(t, timestep_freqs(256, shift)), ref, atol=0, rtol=0
    )  # same ops


@pytest.mark.parametrize("grid", [4, 16])
def test_pos_embed_matches_diffusers(grid):
    from diffusers.models.embeddings import get_2d_sincos_pos_embed

    ref = get_2d_sincos_pos_embed(64, grid, base_size=grid, interpolation_scale=1.0, output_type="pt")
    torch.testing.assert_close(
        sincos_pos_embed_2d(64, grid, grid, base_size=grid), ref.float(), atol=1e-6, rtol=0
    )


@pytest.mark.parametrize("learn_sigma", [True, False])
def test_dit_shapes_and_learn_sigma(learn_sigma):
    from dataclasses import replace

    model = randomize(DiT(replace(TINY, learn_sigma=learn_sigma)))  # no zero init: output depends on input
    x, t, y = torch.randn(3, 4, 8, 8), torch.tensor([1.0, 500.0, 999.0]), torch.tensor([0, 4, 5])
    out = model(x, t, y)
    assert out.shape == (3, 8 if learn_sigma else 4, 8, 8)
    assert not torch.allclose(out[0], out[1])  # timestep and class reach the output


def test_null_class_changes_output():
    model = randomize(DiT(TINY))
    x, t = torch.randn(1, 4, 8, 8), torch.tensor([300.0])
    assert not torch.allclose(model(x, t, torch.tensor([2])), model(x, t, torch.tensor([5])))


@pytest.mark.parametrize(
    "field,value,match",
    [
        ("prediction", "x0", "prediction='x0'"),
        ("sample_size", 9, "sample_size=9"),
        ("num_heads", 5, "num_heads=5"),
    ],
)
def test_config_errors_name_the_field(field, value, match):
    from dataclasses import replace

    with pytest.raises(ValueError, match=match):
        replace(TINY, **{field: value})


def test_init_weights_is_seeded():
    a, b = DiT(TINY).init_weights(3), DiT(TINY).init_weights(3)
    for (k, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(pa, pb), k
    assert not np.allclose(
        DiT(TINY).init_weights(4).x_embedder.proj.weight.detach(), a.x_embedder.proj.weight.detach()
    )


@pytest.mark.parametrize(
    "module,cls,bad",
    [
        ("dit", "DiTConfig", dict(sample_size=9)),
        ("pixart", "PixArtConfig", dict(hidden_size=100, num_heads=3)),
        ("sana", "SanaConfig", dict(hidden_size=100)),
        ("mmdit", "MMDiTConfig", dict(depth=0)),
        ("flux", "FluxConfig", dict(hidden_size=100, num_heads=3)),
        ("vae_kl", "VAEConfig", dict(norm_num_groups=3)),
        ("dc_ae", "DCAEConfig", dict(upsample_block_type="bogus")),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_every_config_class_raises_the_project_error(module, cls, bad):
    """One error convention: a config no family can build is a ConfigError (dit-export: one line, exit 2)."""
    from importlib import import_module

    from ditrt.runtime.errors import ConfigError

    with pytest.raises(ConfigError) as e:
        getattr(import_module(f"ditrt.export.models.{module}"), cls)(**bad)
    assert "\n" not in str(e.value) and type(e.value) is ConfigError
