"""Loader parity: diffusers builds and saves a tiny random model, our loader reads it, outputs must match."""

import json

import pytest
import torch
from tiny_components import randomize

from ditrt.export.loaders.diffusers import load_component
from ditrt.runtime.errors import LoaderError

# fp32 on CPU, same weights, same maths in a different order: differences are float rounding
ATOL = 1e-4


def diffusers_dit(tmp_path, **overrides):
    from diffusers import DiTTransformer2DModel

    cfg = dict(
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=4,
        out_channels=8,
        num_layers=2,
        sample_size=8,
        patch_size=2,
        num_embeds_ada_norm=10,
    )
    cfg.update(overrides)
    model = randomize(DiTTransformer2DModel(**cfg))
    with torch.no_grad():  # converted checkpoints hold identical per-block embedder copies
        for block in model.transformer_blocks[1:]:
            block.norm1.emb.load_state_dict(model.transformer_blocks[0].norm1.emb.state_dict())
    model.save_pretrained(tmp_path / "transformer")
    return model, tmp_path / "transformer"


@pytest.mark.parametrize("out_channels", [8, 4], ids=["learn-sigma", "eps-only"])
def test_dit_matches_diffusers(tmp_path, out_channels):
    ref, folder = diffusers_dit(tmp_path, out_channels=out_channels)
    ours = load_component(folder)
    x = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    t, y = torch.tensor([0, 500, 999]), torch.tensor([0, 7, 10])  # 10 = null class
    with torch.no_grad():
        want = ref(x, timestep=t, class_labels=y).sample
        got = ours(x, t.float(), y)
    assert got.shape == want.shape == (3, out_channels, 8, 8)
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)


def test_dit_fp16_and_sharded_weights(tmp_path):
    import copy

    ref, folder = diffusers_dit(tmp_path)
    with torch.no_grad():
        for p in ref.parameters():  # make the fp32 reference hold exactly the fp16 values
            p.copy_(p.half().float())
    copy.deepcopy(ref).half().save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert len(list((tmp_path / "sharded").glob("*.safetensors"))) > 1
    ours = load_component(tmp_path / "sharded")
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([10, 900]), torch.tensor([1, 2])
    with torch.no_grad():
        want = ref(x, timestep=t, class_labels=y).sample
        torch.testing.assert_close(ours(x, t.float(), y), want, atol=ATOL, rtol=0)


def test_diverged_per_block_embedders_are_refused(tmp_path):
    from diffusers import DiTTransformer2DModel

    model = randomize(
        DiTTransformer2DModel(
            num_attention_heads=2, attention_head_dim=8, num_layers=2, sample_size=8, num_embeds_ada_norm=10
        )
    )
    model.save_pretrained(tmp_path)
    with pytest.raises(
        LoaderError, match="transformer_blocks.1.norm1.emb.* differs from .*transformer_blocks.0"
    ):
        load_component(tmp_path)


def test_loader_errors(tmp_path):
    with pytest.raises(LoaderError, match="has no config.json"):
        load_component(tmp_path)
    _, folder = diffusers_dit(tmp_path)
    config = json.loads((folder / "config.json").read_text())

    (folder / "config.json").write_text(json.dumps(dict(config, _class_name="UNet2DConditionModel")))
    with pytest.raises(LoaderError, match="holds a 'UNet2DConditionModel'; supported: "):
        load_component(folder)

    (folder / "config.json").write_text(json.dumps(dict(config, num_layers=3)))
    with pytest.raises(LoaderError, match=r"14 missing \(e.g. blocks.2.adaLN.weight"):
        load_component(folder)

    (folder / "config.json").write_text(json.dumps(dict(config, num_layers=1)))
    with pytest.raises(LoaderError, match=r"14 unexpected \(e.g. blocks.1.attn"):
        load_component(folder)

    (folder / "config.json").write_text(json.dumps(dict(config, attention_head_dim=4)))
    with pytest.raises(LoaderError, match="shape mismatch"):
        load_component(folder)

    (folder / "config.json").write_text(json.dumps(config))
    from safetensors.torch import load_file, save_file

    weights = folder / "diffusion_pytorch_model.safetensors"
    save_file(dict(load_file(weights), **{"mystery.weight": torch.zeros(2)}), weights)
    with pytest.raises(LoaderError, match="1 unexpected checkpoint key.*mystery.weight"):
        load_component(folder)

    weights.rename(folder / "diffusion_pytorch_model.bin")
    with pytest.raises(LoaderError, match="only pickled weights .* never loaded"):
        load_component(folder)
    (folder / "diffusion_pytorch_model.bin").rename(weights)
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(LoaderError, match="cannot read"):
        load_component(folder)
