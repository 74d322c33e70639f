"""The exported step engines compute the timestep sinusoid (and Flux's RoPE frequencies) from the very table torch
computes: held as ONNX initializers, bit for bit, not as an in-graph Exp/Pow whose result is 1-2 ulp off. So engine
and torch agree at every timestep, t = 1000 included, where a 1-ulp frequency error moves the sin/cos arguments by
~6e-5."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper

from ditrt.export.models.layers import rope_omega, timestep_freqs
from ditrt.export.onnx_export import export_onnx
from test_step_graphs import TINY, build, feeds

# fp32 engine vs fp32 torch: ONNX Runtime fuses and reorders sums, and its Sin/Cos are not torch's, so outputs
# differ by rounding only. Measured ≤ 1.2e-6 over these families and timesteps (before the tables were constants:
# up to 1.0e-5 at t = 1000, growing with t). The outputs are O(1) (x, x0 and their mix), so the bound is absolute.
ATOL = 1e-5
TIMESTEPS = (0.0, 1.0, 500.0, 999.0, 1000.0)  # the step graph's t: DDPM timesteps, or σ·1000 for flow families


def initializers(path) -> list[np.ndarray]:
    return [numpy_helper.to_array(i) for i in onnx.load(str(path)).graph.initializer]


def holds_exactly(tables: list[np.ndarray], want: torch.Tensor) -> bool:
    want = want.numpy().reshape(-1)
    return any(t.dtype == np.float32 and t.size == want.size and np.array_equal(t.reshape(-1).view(np.int32),
                                                                                want.view(np.int32)) for t in tables)


@pytest.mark.parametrize("name", TINY)
def test_engine_matches_torch_at_every_timestep(name, tmp_path):
    model, graph, inputs, outputs = build(name)
    export_onnx(graph, inputs, outputs, tmp_path / "step.onnx")
    tables = initializers(tmp_path / "step.onnx")
    assert holds_exactly(tables, model.t_embedder.freqs)
    assert model.t_embedder.freqs.equal(timestep_freqs(256, getattr(model.cfg, "freq_shift", 0)))
    if hasattr(model, "rope_omega"):
        assert holds_exactly(tables, rope_omega(model.cfg.axes_dims_rope, model.cfg.rope_theta))
    assert not {n.op_type for n in onnx.load(str(tmp_path / "step.onnx")).graph.node} & {"Exp"}
    session = ort.InferenceSession(str(tmp_path / "step.onnx"))
    for t in TIMESTEPS:
        args = feeds(inputs, 2, seed=3)
        args.update(t=torch.tensor(t), guidance=torch.tensor(3.5))  # Flux-dev embeds guidance·1000 too
        with torch.no_grad():
            want = graph(*args.values())
        got = session.run(None, {k: v.numpy() for k, v in args.items()})
        for w, o in zip(want, got):
            np.testing.assert_allclose(o, w.numpy(), rtol=0, atol=ATOL, err_msg=f"t = {t}")


def test_frequency_tables_are_torch_constants_not_state():
    """The tables are plain attributes: no state-dict keys for the strict loader, and a cast to fp16 (the
    precision policy) leaves them fp32, as the sinusoid and RoPE islands need."""
    model = TINY["flux-dev"][0]().half()
    assert model.t_embedder.freqs.dtype == model.rope_omega.dtype == torch.float32
    assert not any("freqs" in k or "omega" in k for k in model.state_dict())
    with torch.device("meta"):  # built on the meta device (parameter counts), the tables are still real
        assert TINY["dit"][0]().t_embedder.freqs.equal(timestep_freqs(256))
