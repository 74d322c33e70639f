import onnx
import pytest
import torch

from ditrt.export.ops import adaln_modulate, lowering
from ditrt.export.ops.adaln import PLUGIN_NAME, PLUGIN_VERSION
from ditrt.runtime.manifest import TensorSpec


def decomposed(x, shift, scale, eps):
    """LayerNorm written out by hand, in float64, as the independent reference."""
    x64 = x.double()
    mean = x64.mean(-1, keepdim=True)
    var = ((x64 - mean) ** 2).mean(-1, keepdim=True)
    return (x64 - mean) / torch.sqrt(var + eps) * (1 + scale.double()[:, None]) + shift.double()[:, None]


@pytest.mark.parametrize("mode", ["op", "reference"])
@pytest.mark.parametrize("shape", [(1, 1, 8), (2, 7, 33), (3, 64, 1152)])
def test_adaln_matches_decomposition_fp32(mode, shape):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g) * 3 + 1
    shift, scale = (
        torch.randn(shape[0], shape[-1], generator=g),
        torch.randn(shape[0], shape[-1], generator=g),
    )
    with lowering(mode):
        y = adaln_modulate(x, shift, scale, 1e-6)
    # fp32 LayerNorm on O(1) data: error is a few ulps of the output magnitude
    torch.testing.assert_close(y.double(), decomposed(x, shift, scale, 1e-6), atol=2e-5, rtol=1e-5)


def test_adaln_low_precision_keeps_dtype_and_uses_fp32_statistics():
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(2, 16, 256, generator=g) * 50 + 200).to(
        torch.bfloat16
    )  # large mean: bf16 stats would fail
    shift, scale = torch.zeros(2, 256, dtype=torch.bfloat16), torch.zeros(2, 256, dtype=torch.bfloat16)
    y = adaln_modulate(x, shift, scale)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.double(), decomposed(x, shift, scale, 1e-6), atol=3e-2, rtol=1e-2)


def test_adaln_opcheck_fake_and_schema():
    args = (torch.randn(2, 5, 8), torch.randn(2, 8), torch.randn(2, 8), 1e-6)
    torch.library.opcheck(torch.ops.dit.adaln_modulate.default, args)
    with torch._subclasses.fake_tensor.FakeTensorMode():
        out = torch.ops.dit.adaln_modulate(
            torch.empty(3, 4, 16), torch.empty(3, 16), torch.empty(3, 16), 1e-6
        )
    assert out.shape == (3, 4, 16)


def test_unknown_lowering_is_refused():
    with pytest.raises(ValueError, match="unknown op lowering 'fast'"):
        with lowering("fast"):
            pass


class _Modulated(torch.nn.Module):
    def forward(self, x, shift, scale):
        return adaln_modulate(x, shift, scale, 1e-5) * 2


def _export(tmp_path, lowering_name):
    from ditrt.export.onnx_export import export_onnx

    inputs = [
        TensorSpec("x", "float32", ("B", 5, 8)),
        TensorSpec("shift", "float32", ("B", 8)),
        TensorSpec("scale", "float32", ("B", 8)),
    ]
    path = tmp_path / f"{lowering_name}.onnx"
    export_onnx(_Modulated(), inputs, [TensorSpec("y", "float32", ("B", 5, 8))], path, lowering_name)
    return onnx.load(str(path))


def test_plugin_lowering_emits_one_typed_plugin_node(tmp_path):
    model = _export(tmp_path, "plugin")
    nodes = [n for n in model.graph.node if n.op_type == PLUGIN_NAME]
    assert len(nodes) == 1 and nodes[0].domain == "dit"
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in nodes[0].attribute}
    assert attrs == {
        "eps": pytest.approx(1e-5),
        "plugin_namespace": b"dit",
        "plugin_version": PLUGIN_VERSION.encode(),
    }
    assert ("dit", 1) in [(o.domain, o.version) for o in model.opset_import]
    assert [d.dim_param or d.dim_value for d in model.graph.output[0].type.tensor_type.shape.dim] == [
        "B",
        5,
        8,
    ]


def test_portable_lowering_uses_standard_ops_only(tmp_path):
    model = _export(tmp_path, "portable")
    assert {n.domain for n in model.graph.node} <= {"", "ai.onnx"}
    assert "LayerNormalization" in {n.op_type for n in model.graph.node}


def padded_linear_attention(q, k, v, eps=1e-15):
    """diffusers' SanaLinearAttnProcessor2_0 formulation (ones row appended to V), in float64."""
    q = torch.relu(q).double().transpose(-1, -2)  # (B, H, d, N)
    k = torch.relu(k).double()  # (B, H, N, d)
    v = torch.nn.functional.pad(v.double().transpose(-1, -2), (0, 0, 0, 1), value=1.0)  # (B, H, d+1, N)
    o = (v @ k) @ q  # (B, H, d+1, N)
    return (o[:, :, :-1] / (o[:, :, -1:] + eps)).transpose(-1, -2)


@pytest.mark.parametrize("mode", ["op", "reference"])
@pytest.mark.parametrize("shape", [(1, 1, 1, 4), (2, 3, 17, 8), (1, 2, 1024, 32), (1, 1, 64, 64)])
def test_linear_attention_matches_padded_formulation(mode, shape):
    from ditrt.export.ops import linear_attention

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(shape, generator=g) for _ in range(3))
    with lowering(mode):
        out = linear_attention(q, k, v)
    assert out.shape == shape and out.dtype == torch.float32
    # fp32 sums over N tokens of O(1) products, divided by an O(N) normaliser: relative error ~1e-6
    torch.testing.assert_close(out.double(), padded_linear_attention(q, k, v), atol=1e-5, rtol=1e-5)


def test_linear_attention_fp16_io_keeps_fp32_state():
    from ditrt.export.ops import linear_attention

    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, 2, 4096, 32, generator=g).half() * 4 for _ in range(3))
    out = linear_attention(q, k, v)  # an fp16 K/V state would overflow at 4096 tokens of magnitude ~16
    assert out.dtype == torch.float16 and torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), padded_linear_attention(q, k, v), atol=2e-2, rtol=1e-2)


def test_linear_attention_all_zero_keys_stay_finite():
    from ditrt.export.ops import linear_attention

    q, v = torch.randn(1, 1, 5, 4), torch.randn(1, 1, 5, 4)
    out = linear_attention(q, -torch.ones(1, 1, 5, 4), v)  # ReLU zeroes every key: 0 / (0 + eps)
    assert torch.isfinite(out).all() and out.abs().max() == 0


def test_linear_attention_opcheck():
    shape = (2, 2, 6, 4)
    torch.library.opcheck(
        torch.ops.dit.linear_attention.default,
        (torch.randn(shape), torch.randn(shape), torch.randn(shape), 1e-15),
    )


class _LinearAttn(torch.nn.Module):
    def forward(self, q, k, v):
        from ditrt.export.ops import linear_attention

        return linear_attention(q, k, v) + 1


def test_linear_attention_lowerings(tmp_path):
    import numpy as np
    import onnxruntime as ort

    from ditrt.export.onnx_export import export_onnx
    from ditrt.export.ops.linear_attention import PLUGIN_NAME

    specs = [TensorSpec(n, "float32", ("B", 2, "N", 8)) for n in "qkv"]
    out = [TensorSpec("o", "float32", ("B", 2, "N", 8))]
    export_onnx(_LinearAttn(), specs, out, tmp_path / "p.onnx", "plugin")
    model = onnx.load(str(tmp_path / "p.onnx"))
    nodes = [n for n in model.graph.node if n.op_type == PLUGIN_NAME]
    assert len(nodes) == 1 and nodes[0].domain == "dit" and list(nodes[0].input) == ["q", "k", "v"]
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in nodes[0].attribute}
    assert attrs["eps"] == pytest.approx(1e-15) and attrs["plugin_namespace"] == b"dit"

    export_onnx(_LinearAttn(), specs, out, tmp_path / "s.onnx", "portable")
    q, k, v = (np.random.default_rng(i).standard_normal((3, 2, 50, 8)).astype(np.float32) for i in range(3))
    got = ort.InferenceSession(str(tmp_path / "s.onnx")).run(None, {"q": q, "k": k, "v": v})[0]
    want = padded_linear_attention(*(torch.from_numpy(a) for a in (q, k, v))).numpy() + 1
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
