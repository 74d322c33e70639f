"""Lean weight loading: modules built with meta parameters, weights memory-mapped and cast once, straight to the
dtype each component runs in (precision.POLICY), so that a bf16/fp16 export never holds its weights in fp32."""

import pytest
import torch
from tiny_components import randomize

from ditrt.export.loaders.diffusers import empty_parameters, load_component, read_state_dict
from ditrt.export.models import dit
from ditrt.export.models.layers import sincos_pos_embed_2d, timestep_freqs
from ditrt.export.precision import POLICY, apply_policy, torch_dtype
from ditrt.export.presets import build_preset, get_preset
from ditrt.export.source import resolve_source
from ditrt.runtime.errors import InputError


def dtypes(module) -> set[torch.dtype]:
    return {t.dtype for t in module.state_dict().values()}


def pointers(module) -> list[int]:
    return [t.data_ptr() for t in module.state_dict().values()]


def no_meta(module) -> bool:
    return not any(t.is_meta for t in list(module.parameters()) + list(module.buffers()))


def test_persistent_buffers_are_loaded_not_built():
    """SD3's (1, M·M, D) position table is a state-dict entry: built on meta, then drawn (or loaded) in dtype."""
    from ditrt.export.models import mmdit

    cfg = mmdit.SD35_MEDIUM
    with empty_parameters():
        model = mmdit.FAMILY.module(cfg)
    assert model.pos_embed.is_meta


def test_empty_parameters_keep_tables_and_buffers_real():
    cfg = dit.DiTConfig(sample_size=8, depth=1, hidden_size=32, num_heads=2, num_classes=10)
    with empty_parameters():
        model = dit.DiT(cfg)
    assert all(p.is_meta for p in model.parameters())
    assert not any(b.is_meta for b in model.buffers())
    assert model.t_embedder.freqs.equal(timestep_freqs(256))
    grid = cfg.sample_size // cfg.patch_size
    assert model.pos_embed.equal(sincos_pos_embed_2d(cfg.hidden_size, grid, grid, base_size=grid)[None])


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_random_weights_are_drawn_in_the_export_dtype(precision):
    """--random-weights at reduced precision: parameters born in the engine dtype, equal to the fp32 draw cast
    (so seeded engines agree across precisions); the precision policy then copies nothing."""
    preset = get_preset("digits")
    want = build_preset(preset, random_weights=True, seed=3)
    src = resolve_source("digits", random_weights=True, seed=3, precision=precision)
    assert dtypes(src.model) == {torch_dtype(precision)} and no_meta(src.model)
    for (k, a), b in zip(want.state_dict().items(), src.model.state_dict().values()):
        assert b.equal(a.to(b.dtype)), k
    before = pointers(src.model)
    apply_policy(precision, src.model)
    assert pointers(src.model) == before


@pytest.mark.parametrize("precision", ["fp32", "fp16", "bf16"])
def test_folder_components_load_in_their_policy_dtype(precision):
    """A pipeline folder: denoiser, VAE and Gemma-2 each come out of resolve_source in the dtype POLICY gives
    them, never fp32 first; apply_policy then only adds the text encoder's fp32 islands."""
    src = resolve_source("text-digits", precision=precision)
    text = src.text.graph
    encoder = next(m for m in text.modules() if type(m).__name__ == "Gemma2Model")
    parts = {"denoiser": src.model, "vae": src.vae, "gemma2": encoder}
    for kind, module in parts.items():
        assert {p.dtype for p in module.parameters()} == {torch_dtype(POLICY[kind][precision])}, kind
        assert no_meta(module), kind
    before = {kind: pointers(m) for kind, m in parts.items()}
    record = apply_policy(precision, src.model, src.vae, text)
    assert record["text_encoders"] == {"gemma2": POLICY["gemma2"][precision]}
    assert {kind: pointers(m) for kind, m in parts.items()} == before  # nothing cast twice
    if POLICY["gemma2"][precision] != "fp32":
        assert encoder.config._attn_implementation == "eager"  # the islands are still set up


def test_reduced_precision_checkpoint_is_not_upcast(tmp_path):
    """An fp16 checkpoint loaded for an fp16 component stays fp16 (no fp32 copy), with the file's exact values;
    loaded for fp32 it is upcast once."""
    from diffusers import DiTTransformer2DModel

    ref = randomize(
        DiTTransformer2DModel(
            num_attention_heads=2,
            attention_head_dim=8,
            in_channels=4,
            out_channels=8,
            num_layers=1,
            sample_size=8,
            patch_size=2,
            num_embeds_ada_norm=10,
        )
    ).half()
    ref.save_pretrained(tmp_path / "t")
    state = read_state_dict(tmp_path / "t", dtype=torch.float16)
    assert {v.dtype for v in state.values()} == {torch.float16}
    assert all(state[k].equal(v) for k, v in ref.state_dict().items())
    ours = load_component(tmp_path / "t", dtype=torch.float16)
    assert dtypes(ours) == {torch.float16} and no_meta(ours)
    assert dtypes(load_component(tmp_path / "t")) == {torch.float32}


def test_unknown_precision_is_refused_before_loading():
    with pytest.raises(InputError, match="unknown precision 'int8'"):
        resolve_source("digits", precision="int8")
