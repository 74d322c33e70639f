"""Every family's step graph: CFG batching/guidance as diffusers does it, and ONNX engine == torch (fp32)."""

import numpy as np
import onnxruntime as ort
import pytest
import torch

from ditrt.export.graphs import StepGraph, sample_inputs, step_io
from ditrt.export.models.dit import DiT, DiTConfig
from ditrt.export.models.flux import Flux, FluxConfig
from ditrt.export.models.mmdit import MMDiT, MMDiTConfig
from ditrt.export.models.pixart import PixArt, PixArtConfig
from ditrt.export.models.sana import Sana, SanaConfig
from ditrt.export.onnx_export import export_onnx

TINY = {  # name: (model, text tokens, latent (H, W))
    "dit": (lambda: DiT(DiTConfig(sample_size=8, hidden_size=32, depth=2, num_heads=2, num_classes=5)), 0, None),
    "pixart-alpha": (lambda: PixArt(PixArtConfig(sample_size=8, hidden_size=24, depth=2, num_heads=2,
                                                 caption_channels=16, interpolation_scale=1, micro_conditions=True)),
                     6, None),
    "sana": (lambda: Sana(SanaConfig(sample_size=8, in_channels=8, out_channels=8, hidden_size=16, depth=2,
                                     num_heads=2, cross_num_heads=2, caption_channels=12)), 5, None),
    "sd35-medium": (lambda: MMDiT(MMDiTConfig(sample_size=8, in_channels=4, out_channels=4, hidden_size=32, depth=2,
                                              num_heads=2, joint_attention_dim=16, pooled_projection_dim=12,
                                              pos_embed_max_size=8, qk_norm=True, dual_attention_layers=(0,))), 7, None),
    "flux-dev": (lambda: Flux(FluxConfig(in_channels=16, out_channels=16, hidden_size=32, num_heads=2, depth=1,
                                         depth_single=1, joint_attention_dim=16, pooled_projection_dim=12,
                                         axes_dims_rope=(4, 6, 6))), 5, (8, 6)),
    "flux-schnell": (lambda: Flux(FluxConfig(in_channels=16, out_channels=16, hidden_size=32, num_heads=2, depth=1,
                                             depth_single=1, joint_attention_dim=16, pooled_projection_dim=12,
                                             axes_dims_rope=(4, 6, 6), guidance_embeds=False)), 5, (8, 6)),
}
# fp32 end to end; ORT fuses and reorders reductions, so outputs differ from torch by rounding only
ATOL = 2e-5


def build(name):
    make, text_len, hw = TINY[name]
    model = make().eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for t in list(model.parameters()) + [b for n, b in model.named_buffers() if n == "pos_embed"]:
            t.copy_(torch.randn(t.shape, generator=g) * 0.1)
    return model, StepGraph(model, text_len, hw), *step_io(model, text_len, hw)


def feeds(inputs, B, seed=0):
    args = dict(zip([s.name for s in inputs], sample_inputs(inputs, {"B": B}, seed)))
    for name, v in args.items():
        if name.endswith("attention_mask"):  # real masks: 1 = token, 0 = padding
            args[name] = (torch.arange(v.shape[1])[None] < torch.tensor([3, 5, 2][:B])[:, None]).long()
        if name == "class_labels":
            args[name] = v % 5
    return args


@pytest.mark.parametrize("name", TINY)
def test_step_engine_matches_torch(name, tmp_path):
    model, graph, inputs, outputs = build(name)
    export_onnx(graph, inputs, outputs, tmp_path / "step.onnx")
    session = ort.InferenceSession(str(tmp_path / "step.onnx"))
    assert [i.name for i in session.get_inputs()] == [s.name for s in inputs]
    for B in (1, 3):
        args = feeds(inputs, B, seed=B)
        with torch.no_grad():
            want = graph(*args.values())
        got = session.run(None, {k: v.numpy() for k, v in args.items()})
        for w, o in zip(want, got):
            np.testing.assert_allclose(o, w.numpy(), rtol=0, atol=ATOL)


@pytest.mark.parametrize("name", ["pixart-alpha", "sana", "sd35-medium"])
def test_text_cfg_is_uncond_plus_g_times_difference(name):
    model, graph, inputs, _ = build(name)
    args = feeds(inputs, 2)
    paired = [n for n in args if "negative_" + n in args]
    shared = [n for n in args if n in ("resolution", "aspect_ratio")]
    t, g = args["t"], args["guidance"]
    C = model.cfg.in_channels
    with torch.no_grad():
        cond = model(args["x"], t.expand(2), *[args[n] for n in paired + shared])[:, :C]
        uncond = model(args["x"], t.expand(2), *[args["negative_" + n] for n in paired], *[args[n] for n in shared])[:, :C]
        x_next, x0 = graph(*args.values())
    torch.testing.assert_close(x0, args["p"] * args["x"] + args["q"] * (uncond + g * (cond - uncond)), atol=1e-5, rtol=0)


def test_flux_dev_embeds_guidance_without_cfg_batch():
    model, graph, inputs, _ = build("flux-dev")
    args = feeds(inputs, 2)
    assert not any(n.startswith("negative_") for n in args)
    with torch.no_grad():
        v = model(args["x"], (args["t"] / 1000).expand(2), args["prompt_embeds"], args["pooled_prompt_embeds"],
                  args["img_ids"], args["txt_ids"], guidance=args["guidance"].expand(2))
        _, x0 = graph(*args.values())
        other = dict(args, guidance=args["guidance"] + 1)
        _, x0_other = graph(*other.values())
    torch.testing.assert_close(x0, args["p"] * args["x"] + args["q"] * v, atol=1e-5, rtol=0)
    assert (x0 - x0_other).abs().max() > 1e-4  # the guidance value reaches the model
