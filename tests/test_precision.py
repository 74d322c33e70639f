"""fp16/bf16 engines: the manifest records each component's precision, weights are fp16/bf16 outside the fp32
islands (a Cast to fp32 feeds each reduced-precision LayerNormalization, GroupNormalization and Softmax), ONNX Runtime
on CPU runs fp16 engines close to the fp32 ones, and a bf16 engine is well-typed ONNX that the CPU runtime refuses
in one line."""

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner
from onnx import TensorProto
from tiny_components import PROMPT, build_flux

from ditrt.export import export_model
from ditrt.export.cli import main as export_cli
from ditrt.runtime import Pipeline
from ditrt.runtime.cli import main as run_cli
from ditrt.runtime.errors import BackendUnavailable, InputError
from ditrt.runtime.manifest import load_manifest
from ditrt.runtime.pipeline import initial_noise, unpack

F32, F16, BF16 = TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16
ISLAND_OPS = ("LayerNormalization", "GroupNormalization", "Softmax")


def load(folder, component: str) -> onnx.ModelProto:
    model = onnx.load(folder / component / "model.onnx")
    onnx.checker.check_model(model, full_check=True)  # well-typed for its opset, shapes inferable
    return model


def weight_types(model: onnx.ModelProto) -> set[int]:
    """Element types of the initializers that MatMul, Gemm and Conv read: the weights."""
    init = {i.name: i.data_type for i in model.graph.initializer}
    return {
        init[x]
        for n in model.graph.node
        if n.op_type in ("MatMul", "Gemm", "Conv")
        for x in n.input
        if x in init
    }


def islands(model: onnx.ModelProto) -> dict[str, list[bool]]:
    """For each norm/softmax node, by op type: whether its input comes from a Cast to fp32."""
    producer = {out: n for n in model.graph.node for out in n.output}
    found = {}
    for n in model.graph.node:
        if n.op_type in ISLAND_OPS:
            src = producer.get(n.input[0])
            is_cast = src is not None and src.op_type == "Cast"
            cast_to = [a.i for a in src.attribute if a.name == "to"] if is_cast else []
            found.setdefault(n.op_type, []).append(cast_to == [F32])
    return found


def step_feeds(x: np.ndarray, **cond) -> dict:
    scalars = dict(t=500.0, guidance=4.0, p=1.0, q=-0.5, a=0.5, b=0.5, c=0.1, e=0.0, d=0.0, clip=np.inf)
    return dict(
        cond,
        x=x,
        x0_prev=np.ones_like(x),
        x0_prev2=np.zeros_like(x),
        **{k: np.float32(v) for k, v in scalars.items()},
    )


def test_digits_fp16_engine_matches_fp32(digits_engine, tmp_path):
    m = export_model("digits", tmp_path / "fp16", precision="fp16")
    assert m.components["denoiser"].precision == "fp16" and m.export["precision"]["requested"] == "fp16"
    assert load_manifest(digits_engine).components["denoiser"].precision == "fp32"
    # engine I/O stays fp32 (casts inside the graph): same specs as the fp32 engine
    assert m.components["denoiser"].inputs == load_manifest(digits_engine).components["denoiser"].inputs
    graph = load(tmp_path / "fp16", "denoiser")
    assert weight_types(graph) == {F16}
    found = islands(graph)
    assert (
        len(found["LayerNormalization"]) == 9 and len(found["Softmax"]) == 4
    )  # 4 blocks × (2 AdaLN, 1 attention)
    assert all(all(v) for v in found.values())

    p32, p16 = Pipeline.load(digits_engine), Pipeline.load(tmp_path / "fp16")
    x = initial_noise(list(range(10)), (1, 16, 16))
    feeds = step_feeds(x, class_labels=np.stack([np.full(10, 10), np.arange(10)]))  # CFG: [null; labels]
    a, b = p32.engines["denoiser"].run(feeds), p16.engines["denoiser"].run(feeds)
    assert b["x0"].dtype == np.float32
    # one step: fp16 rounding (unit roundoff 4.9e-4) through 4 blocks, amplified by guidance 4 in x0 (|x0| ≤ 2.8):
    # measured 8.1e-3 on x0, 4.0e-3 on x_next
    np.testing.assert_allclose(b["x0"], a["x0"], rtol=0, atol=3e-2)
    np.testing.assert_allclose(b["x_next"], a["x_next"], rtol=0, atol=3e-2)
    img32, img16 = (
        np.concatenate(
            [p(class_label=i, steps=20, guidance=3.0, latents=x[i : i + 1]).pixels for i in range(10)]
        )
        for p in (p32, p16)
    )
    # 20 Euler steps, one image per class: measured 4.0e-4 on [0, 1] pixels (the samples are mostly saturated
    # strokes on black, so the clamp hides most of the drift); 5e-3 is about one uint8 level
    np.testing.assert_allclose(img16, img32, rtol=0, atol=5e-3)


@pytest.mark.slow  # a whole pipeline export; fast lane: the digits fp16 engine, the bf16 graph and VAE typing
def test_flux_fp16_engine_matches_fp32(tmp_path):
    """Tiny Flux-dev: CLIP in fp16 and T5 in fp32 within one text engine, the denoiser in fp16 (RoPE tables and
    qk RMSNorm in fp32), the VAE in fp32. The fp32 reference is diffusers' FluxPipeline, which the fp32 engine
    matches (test_text_pipeline.py; 2.4e-7 on these images): the same reference without a second export."""
    from diffusers import FluxPipeline

    ref = build_flux(tmp_path / "flux", guidance_embeds=True)
    m = export_model(str(tmp_path / "flux"), tmp_path / "fp16", precision="fp16", height=16, width=8)
    assert {k: c.precision for k, c in m.components.items()} == {
        "denoiser": "fp16",
        "text_encoder": "fp16",
        "vae_decoder": "fp32",
    }
    assert m.export["precision"] == {"requested": "fp16", "text_encoders": {"clip_l": "fp16", "t5": "fp32"}}
    assert all(s.dtype in ("float32", "int64") for c in m.components.values() for s in c.inputs + c.outputs)
    denoiser, text = load(tmp_path / "fp16", "denoiser"), load(tmp_path / "fp16", "text_encoder")
    assert weight_types(denoiser) == {F16} and weight_types(text) == {F16, F32}
    assert weight_types(load(tmp_path / "fp16", "vae_decoder")) == {F32}
    found = islands(denoiser)
    assert (
        len(found["LayerNormalization"]) == 6
        and len(found["Softmax"]) == 2
        and all(all(v) for v in found.values())
    )
    found = islands(
        text
    )  # CLIP's LayerNorms and softmax are islands; T5 is fp32 throughout, so it has no Casts
    assert (
        len(found["LayerNormalization"]) == 5
        and all(found["LayerNormalization"])
        and sum(found["Softmax"]) == 2
    )

    pipe = Pipeline.load(tmp_path / "fp16")
    noise = initial_noise([0], (16, 8, 4))
    want = ref(
        PROMPT,
        num_inference_steps=10,
        guidance_scale=3.5,
        height=16,
        width=8,
        max_sequence_length=512,
        latents=FluxPipeline._pack_latents(torch.from_numpy(noise), 1, 16, 8, 4),
        output_type="latent",
    ).images
    got = pipe(prompt=PROMPT, steps=10, guidance=3.5, latents=noise).pixels
    # decoded by the same fp32 VAE engine: measured 6.7e-6 on [0, 1] pixels after 10 Euler steps at |x| ≤ 3.5
    # (latents 5.6e-4 apart; fp16's unit roundoff is 4.9e-4; the tiny random VAE compresses)
    decoded = pipe.engines["vae_decoder"].run({"latents": unpack(want.numpy(), 2, 8, 4)})["image"]
    np.testing.assert_allclose(got, decoded.transpose(0, 2, 3, 1), rtol=0, atol=1e-3)


def test_bf16_engine_is_well_typed_and_refused_on_cpu(tmp_path):
    m = export_model("digits", tmp_path / "bf16", precision="bf16")
    assert (
        m.components["denoiser"].precision == "bf16" and m.export["versions"]["opset"] == 22
    )  # bf16 Conv: 22+
    graph = load(tmp_path / "bf16", "denoiser")
    assert weight_types(graph) == {BF16}
    found = islands(graph)
    assert found["LayerNormalization"] and found["Softmax"] and all(all(v) for v in found.values())
    # ONNX Runtime's CPU provider has no bf16 Conv/Gemm/MatMul: one line naming backend and precision
    with pytest.raises(
        BackendUnavailable,
        match=r"onnxruntime backend \(CPUExecutionProvider\) cannot run the bf16 "
        r"engine 'denoiser/model.onnx': no bf16 kernel for \w+",
    ):
        Pipeline.load(tmp_path / "bf16")
    r = CliRunner().invoke(run_cli, [str(tmp_path / "bf16"), "-c", "3", "-o", str(tmp_path / "x.png")])
    assert r.exit_code == 2 and r.stderr.count("\n") == 1 and "Traceback" not in r.output
    assert r.stderr.startswith("error: the onnxruntime backend") and "--precision fp16" in r.stderr
    with pytest.raises(InputError, match="bf16 engines need ONNX opset 22 or newer"):
        export_model("digits", tmp_path / "old", precision="bf16", opset=18)


def test_bf16_vae_decoder_keeps_groupnorm_and_softmax_in_fp32(tmp_path):
    from ditrt.export.graphs import DecoderGraph, decoder_io
    from ditrt.export.models.vae_kl import VAEConfig, VAEDecoder
    from ditrt.export.onnx_export import export_onnx
    from ditrt.export.precision import POLICY, cast

    vae = VAEDecoder(VAEConfig(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4)).eval()
    cast(vae, POLICY["vae"]["bf16"])
    (tmp_path / "vae_decoder").mkdir()
    export_onnx(
        DecoderGraph(vae), *decoder_io(vae, (4, 4)), tmp_path / "vae_decoder" / "model.onnx", opset=22
    )
    graph = load(tmp_path, "vae_decoder")
    assert weight_types(graph) == {BF16}
    found = islands(graph)
    assert len(found["GroupNormalization"]) == 14 and len(found["Softmax"]) == 1
    assert all(all(v) for v in found.values())


def test_precision_choices():
    r = CliRunner().invoke(export_cli, ["digits", "--precision", "fp8"])
    assert r.exit_code == 2 and "Invalid value for '--precision'" in r.output
    assert "--precision [fp32|fp16|bf16]" in CliRunner().invoke(export_cli, ["--help"]).output
    with pytest.raises(InputError, match="unknown precision 'half'; choose from fp32, fp16, bf16"):
        export_model("digits", "unused", precision="half")
