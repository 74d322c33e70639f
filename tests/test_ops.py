import onnx
import pytest
import torch

from ditrt.export.ops import adaln_modulate, lowering
from ditrt.export.ops.adaln import PLUGIN_NAME, PLUGIN_VERSION


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
    shift, scale = torch.randn(shape[0], shape[-1], generator=g), torch.randn(shape[0], shape[-1], generator=g)
    with lowering(mode):
        y = adaln_modulate(x, shift, scale, 1e-6)
    # fp32 LayerNorm on O(1) data: error is a few ulps of the output magnitude
    torch.testing.assert_close(y.double(), decomposed(x, shift, scale, 1e-6), atol=2e-5, rtol=1e-5)


def test_adaln_low_precision_keeps_dtype_and_uses_fp32_statistics():
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(2, 16, 256, generator=g) * 50 + 200).to(torch.bfloat16)  # large mean: bf16 stats would fail
    shift, scale = torch.zeros(2, 256, dtype=torch.bfloat16), torch.zeros(2, 256, dtype=torch.bfloat16)
    y = adaln_modulate(x, shift, scale)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.double(), decomposed(x, shift, scale, 1e-6), atol=3e-2, rtol=1e-2)


def test_adaln_opcheck_fake_and_schema():
    args = (torch.randn(2, 5, 8), torch.randn(2, 8), torch.randn(2, 8), 1e-6)
    torch.library.opcheck(torch.ops.dit.adaln_modulate.default, args)
    with torch._subclasses.fake_tensor.FakeTensorMode():
        out = torch.ops.dit.adaln_modulate(torch.empty(3, 4, 16), torch.empty(3, 16), torch.empty(3, 16), 1e-6)
    assert out.shape == (3, 4, 16)


def test_unknown_lowering_is_refused():
    with pytest.raises(ValueError, match="unknown op lowering 'fast'"):
        with lowering("fast"):
            pass


class _Modulated(torch.nn.Module):
    def forward(self, x, shift, scale):
        return adaln_modulate(x, shift, scale, 1e-5) * 2


def _export(tmp_path, lowering_name):
    from ditrt.export.graphs import IOSpec
    from ditrt.export.onnx_export import export_onnx

    inputs = [IOSpec("x", "float32", ("B", 5, 8)), IOSpec("shift", "float32", ("B", 8)),
              IOSpec("scale", "float32", ("B", 8))]
    path = tmp_path / f"{lowering_name}.onnx"
    export_onnx(_Modulated(), inputs, [IOSpec("y", "float32", ("B", 5, 8))], path, lowering_name)
    return onnx.load(str(path))


def test_plugin_lowering_emits_one_typed_plugin_node(tmp_path):
    model = _export(tmp_path, "plugin")
    nodes = [n for n in model.graph.node if n.op_type == PLUGIN_NAME]
    assert len(nodes) == 1 and nodes[0].domain == "dit"
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in nodes[0].attribute}
    assert attrs == {"eps": pytest.approx(1e-5), "plugin_namespace": b"dit", "plugin_version": PLUGIN_VERSION.encode()}
    assert ("dit", 1) in [(o.domain, o.version) for o in model.opset_import]
    assert [d.dim_param or d.dim_value for d in model.graph.output[0].type.tensor_type.shape.dim] == ["B", 5, 8]


def test_portable_lowering_uses_standard_ops_only(tmp_path):
    model = _export(tmp_path, "portable")
    assert {n.domain for n in model.graph.node} <= {"", "ai.onnx"}
    assert "LayerNormalization" in {n.op_type for n in model.graph.node}
