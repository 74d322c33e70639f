"""Every family's step graph: CFG batching/guidance as diffusers does it, and ONNX engine == torch (fp32)."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper
from tiny_components import randomize

from ditrt.export.graphs import StepGraph, sample_inputs, step_io
from ditrt.export.models.dit import DiT, DiTConfig
from ditrt.export.models.flux import Flux, FluxConfig, latent_image_ids
from ditrt.export.models.layers import rope_freqs, rope_omega, timestep_freqs
from ditrt.export.models.mmdit import MMDiT, MMDiTConfig
from ditrt.export.models.pixart import PixArt, PixArtConfig
from ditrt.export.models.sana import Sana, SanaConfig
from ditrt.export.onnx_export import export_onnx

TINY = {  # name: (model, text tokens, latent (H, W))
    "dit": (
        lambda: DiT(DiTConfig(sample_size=8, hidden_size=32, depth=2, num_heads=2, num_classes=5)),
        0,
        None,
    ),
    "pixart-alpha": (
        lambda: PixArt(
            PixArtConfig(
                sample_size=8,
                hidden_size=24,
                depth=2,
                num_heads=2,
                caption_channels=16,
                interpolation_scale=1,
                micro_conditions=True,
            )
        ),
        6,
        None,
    ),
    "sana": (
        lambda: Sana(
            SanaConfig(
                sample_size=8,
                in_channels=8,
                out_channels=8,
                hidden_size=16,
                depth=2,
                num_heads=2,
                cross_num_heads=2,
                caption_channels=12,
            )
        ),
        5,
        None,
    ),
    "sd35-medium": (
        lambda: MMDiT(
            MMDiTConfig(
                sample_size=8,
                in_channels=4,
                out_channels=4,
                hidden_size=32,
                depth=2,
                num_heads=2,
                joint_attention_dim=16,
                pooled_projection_dim=12,
                pos_embed_max_size=8,
                qk_norm=True,
                dual_attention_layers=(0,),
            )
        ),
        7,
        None,
    ),
    "flux-dev": (
        lambda: Flux(
            FluxConfig(
                in_channels=16,
                out_channels=16,
                hidden_size=32,
                num_heads=2,
                depth=1,
                depth_single=1,
                joint_attention_dim=16,
                pooled_projection_dim=12,
                axes_dims_rope=(4, 6, 6),
            )
        ),
        5,
        (8, 6),
    ),
    "flux-schnell": (
        lambda: Flux(
            FluxConfig(
                in_channels=16,
                out_channels=16,
                hidden_size=32,
                num_heads=2,
                depth=1,
                depth_single=1,
                joint_attention_dim=16,
                pooled_projection_dim=12,
                axes_dims_rope=(4, 6, 6),
                guidance_embeds=False,
            )
        ),
        5,
        (8, 6),
    ),
}
# fp32 end to end; ORT fuses and reorders reductions, so outputs differ from torch by rounding only
ATOL = 2e-5
# The timestep sinusoid (and Flux's RoPE frequencies) come from the very table torch computes, held as ONNX
# initializers bit for bit, not an in-graph Exp whose result is 1-2 ulp off (which moved the sin/cos arguments by
# ~6e-5 at t = 1000). Engine vs torch at every timestep: measured ≤ 1.2e-6 (before: up to 1.0e-5 at t = 1000,
# growing with t); the outputs are O(1), so the bound is absolute.
T_ATOL = 1e-5
TIMESTEPS = (
    0.0,
    1.0,
    500.0,
    999.0,
    1000.0,
)  # the step graph's t: DDPM timesteps, or σ·1000 for flow families


def build(name):
    make, text_len, hw = TINY[name]
    model = randomize(make(), seed=1, buffers=True)  # pos_embed: MMDiT's stored table, DiT's sin-cos one
    return model, StepGraph(model, text_len, hw), *step_io(model, text_len, hw)


def feeds(inputs, B, seed=0, n=2):
    args = dict(zip([s.name for s in inputs], sample_inputs(inputs, {"B": B, "n": n}, seed)))
    for name, v in args.items():
        if name.endswith("attention_mask"):  # real masks: 1 = token, 0 = padding
            args[name] = (
                (torch.arange(v.shape[-1]) < torch.tensor([3, 5, 2][:B])[:, None]).long().expand(v.shape)
            )
        if name == "class_labels":
            args[name] = v % 5
    args["clip"] = torch.tensor(float("inf"))
    return args


@pytest.mark.parametrize("name", TINY)
def test_step_engine_matches_torch(name, tmp_path):
    model, graph, inputs, outputs = build(name)
    export_onnx(graph, inputs, outputs, tmp_path / "step.onnx")
    session = ort.InferenceSession(str(tmp_path / "step.onnx"))
    assert [i.name for i in session.get_inputs()] == [s.name for s in inputs]
    for B, n in ((1, 1), (1, 2), (3, 1), (3, 2)):  # batch sizes, with and without the CFG branch
        args = feeds(inputs, B, seed=B, n=n)
        args["clip"] = torch.tensor(0.5 if n == 1 else float("inf"))  # DDIM's clip_sample, or none
        with torch.no_grad():
            want = graph(*args.values())
        got = session.run(None, {k: v.numpy() for k, v in args.items()})
        for w, o in zip(want, got):
            np.testing.assert_allclose(o, w.numpy(), rtol=0, atol=ATOL)
    tables = [numpy_helper.to_array(i) for i in onnx.load(str(tmp_path / "step.onnx")).graph.initializer]
    assert holds_exactly(tables, model.t_embedder.freqs)
    assert model.t_embedder.freqs.equal(timestep_freqs(256, getattr(model.cfg, "freq_shift", 0)))
    if hasattr(
        model, "rope_omega"
    ):  # Flux: its positions are constants of the engine, so are their RoPE tables
        _, text_len, hw = TINY[name]
        ids = torch.cat([torch.zeros(text_len, 3), latent_image_ids(*hw)])
        cos, sin = rope_freqs(
            ids, model.cfg.axes_dims_rope, rope_omega(model.cfg.axes_dims_rope, model.cfg.rope_theta)
        )
        assert holds_close(tables, cos) and holds_close(
            tables, sin
        )  # folded at export, within an ulp of torch's
    assert "Exp" not in {n.op_type for n in onnx.load(str(tmp_path / "step.onnx")).graph.node}
    for t in TIMESTEPS:
        args = feeds(inputs, 2, seed=3)
        args.update(t=torch.tensor(t), guidance=torch.tensor(3.5))  # Flux-dev embeds guidance·1000 too
        with torch.no_grad():
            want = graph(*args.values())
        got = session.run(None, {k: v.numpy() for k, v in args.items()})
        for w, o in zip(want, got):
            np.testing.assert_allclose(o, w.numpy(), rtol=0, atol=T_ATOL, err_msg=f"t = {t}")


def holds_close(tables: list[np.ndarray], want: torch.Tensor) -> bool:
    """One of the tables is want, up to one fp32 ulp of 1 (the exporter's constant folding computes cos/sin)."""
    want = want.numpy()
    return any(t.shape == want.shape and np.abs(t - want).max() <= 2**-23 for t in tables)


def holds_exactly(tables: list[np.ndarray], want: torch.Tensor) -> bool:
    want = want.numpy().reshape(-1)
    return any(
        t.dtype == np.float32
        and t.size == want.size
        and np.array_equal(t.reshape(-1).view(np.int32), want.view(np.int32))
        for t in tables
    )


def test_frequency_tables_are_torch_constants_not_state():
    """The tables are plain attributes: no state-dict keys for the strict loader, and a cast to fp16 (the
    precision policy) leaves them fp32, as the sinusoid and RoPE islands need."""
    model = TINY["flux-dev"][0]().half()
    assert model.t_embedder.freqs.dtype == model.rope_omega.dtype == torch.float32
    assert not any("freqs" in k or "omega" in k for k in model.state_dict())
    with torch.device("meta"):  # built on the meta device (parameter counts), the tables are still real
        assert TINY["dit"][0]().t_embedder.freqs.equal(timestep_freqs(256))


@pytest.mark.parametrize("name", ["dit", "pixart-alpha", "sana", "sd35-medium"])
def test_cfg_branches(name):
    """n = 2: g = uncond + guidance·(cond − uncond), in the pipeline's batch order; n = 1: g = cond alone."""
    model, graph, inputs, _ = build(name)
    args = feeds(inputs, 2)
    paired = [s.name for s in inputs if s.shape[:1] == ["n"]]
    # PixArt-α's micro-conditions are constants of the engine's size: here (no VAE) the latent's, 8x8
    micro = (
        {"resolution": torch.tensor([[8.0, 8.0]] * 2), "aspect_ratio": torch.tensor([[1.0]] * 2)}
        if getattr(model.cfg, "micro_conditions", False)
        else {}
    )
    t, g, x = args["t"], args["guidance"], args["x"]
    C = model.cfg.in_channels
    args.update(
        p=torch.tensor(0.0), q=torch.tensor(1.0), a=torch.tensor(0.0), b=torch.tensor(1.0)
    )  # out: x0 = g
    with torch.no_grad():
        uncond, cond = (model(x, t.expand(2), *[args[k][i] for k in paired], **micro)[:, :C] for i in (0, 1))
        _, x0 = graph(*args.values())
        _, x0_cond_only = graph(*{**args, **{k: args[k][1:] for k in paired}}.values())
    torch.testing.assert_close(x0, uncond + g * (cond - uncond), atol=1e-5, rtol=0)
    torch.testing.assert_close(x0_cond_only, cond, atol=1e-5, rtol=0)
    assert (cond - uncond).abs().max() > 1e-3  # the branches differ, so the check above means something


def test_flux_dev_embeds_guidance_without_cfg_batch():
    model, graph, inputs, _ = build("flux-dev")
    args = feeds(inputs, 2)
    assert not any(s.shape[:1] == ["n"] for s in inputs)  # no CFG branches
    img_ids = latent_image_ids(8, 6)  # the engine's constants: FluxPipeline's ids at its latent size
    txt_ids = torch.zeros(args["prompt_embeds"].shape[1], 3)
    with torch.no_grad():
        v = model(
            args["x"],
            (args["t"] / 1000).expand(2),
            args["prompt_embeds"],
            args["pooled_prompt_embeds"],
            img_ids,
            txt_ids,
            guidance=args["guidance"].expand(2),
        )
        _, x0 = graph(*args.values())
        other = dict(args, guidance=args["guidance"] + 1)
        _, x0_other = graph(*other.values())
    torch.testing.assert_close(x0, args["p"] * args["x"] + args["q"] * v, atol=1e-5, rtol=0)
    assert (x0 - x0_other).abs().max() > 1e-4  # the guidance value reaches the model
