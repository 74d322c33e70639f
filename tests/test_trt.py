"""The TensorRT path: plugin-lowered graphs the parser can map, AOT kernel entry points and launch shapes that match
csrc/, clear errors where TensorRT is missing, the device step loop's pure parts (buffer rotation, scalar block,
context pool), and (with TensorRT and a GPU) engines that match ONNX Runtime and device loops that match HostLoop."""

import json
import re
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from conftest import one_line_error, run_cli, run_cli_here
from tiny_components import randomize

from ditrt.export.graphs import StepGraph, sample_inputs, step_io
from ditrt.export.models.dit import DiT, DiTConfig
from ditrt.export.models.sana import Sana, SanaConfig
from ditrt.export.onnx_export import export_onnx
from ditrt.export.trt import plugins
from ditrt.export.trt.build import DEFAULT_DIMS, check_engine, profile_shapes
from ditrt.runtime.backends import READ, ROTATION, STATE, HostLoop
from ditrt.runtime.backends.trt import ALIGN, STATE_BUFFERS, Pool, TrtBackend, carry, scalar_layout
from ditrt.runtime.errors import BackendUnavailable, InputError
from ditrt.runtime.manifest import Component, TensorSpec
from ditrt.runtime.schedules import STEP_SCALARS

pytestmark = pytest.mark.xdist_group("trt")  # one worker exports the module's plugin graphs (pytest -n)

TINY = {  # name: (model, text tokens)
    "dit": (lambda: DiT(DiTConfig(sample_size=8, hidden_size=32, depth=2, num_heads=2, num_classes=5)), 0),
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
    ),
}
PLUGINS = {
    "AdaLNModulate": ((3, 2, 2), 1),
    "AdaLNModulateResidual": ((3, 3, 2, 2, 2), 2),
    "LinearAttention": ((4, 4, 4), 1),
}  # op type: (ranks of its inputs, number of outputs)
DTYPES = tuple(plugins.SUFFIX)


def tensorrt_missing() -> bool:
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return True
    return False


def build(name):
    make, text_len = TINY[name]
    model = randomize(make(), seed=1)  # no zero-init layers: every weight must matter
    return model, StepGraph(model, text_len), *step_io(model, text_len)


class Residual(torch.nn.Module):  # no model uses the fused residual form yet
    def forward(self, x, y, gate, shift, scale):
        from ditrt.export.ops import adaln_modulate_residual

        h, out = adaln_modulate_residual(x, y, gate, shift, scale, 1e-6)
        return h * 2, out + 1


@pytest.fixture(scope="module")
def plugin_graphs(tmp_path_factory):
    """name -> (path of the plugin-lowered graph, the module, its input specs, output specs): the tiny step
    graphs, and "residual" for the fused residual op alone."""

    rows, vecs = ("B", 6, 16), ("B", 16)
    graphs = {name: build(name)[1:] for name in TINY}
    graphs["residual"] = (
        Residual(),
        [TensorSpec(n, "float32", rows) for n in ("x", "y")]
        + [TensorSpec(n, "float32", vecs) for n in ("gate", "shift", "scale")],
        [TensorSpec(n, "float32", rows) for n in ("h", "out")],
    )
    out = {}
    for name, (graph, inputs, outputs) in graphs.items():
        path = tmp_path_factory.mktemp("plugin") / f"{name}.onnx"
        export_onnx(graph, inputs, outputs, path, "plugin")
        out[name] = path, graph, inputs, outputs
    return out


def dims(value_info) -> list:
    return [d.dim_param or d.dim_value for d in value_info.type.tensor_type.shape.dim]


@pytest.mark.parametrize(
    "name,ops",
    [
        ("dit", {"AdaLNModulate", "AdaLNModulateResidual"}),
        ("sana", {"AdaLNModulate", "LinearAttention"}),
        ("residual", {"AdaLNModulateResidual"}),
    ],
)
def test_plugin_graph_is_what_the_parser_maps(plugin_graphs, name, ops):
    model = onnx.load(str(plugin_graphs[name][0]))
    onnx.checker.check_model(model, full_check=True)
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    values = {v.name: v for v in [*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output]}
    nodes = [n for n in model.graph.node if n.domain == "dit"]
    assert {n.op_type for n in nodes} == ops
    assert {n.domain for n in model.graph.node} <= {"", "dit"}
    for node in nodes:
        attrs = {a.name: a for a in node.attribute}
        # the parser finds the creator by op type + plugin_namespace/plugin_version and passes the other attributes
        # that the plugin declares: here exactly `eps`, a float
        assert set(attrs) == {"eps", "plugin_namespace", "plugin_version"}
        assert attrs["eps"].type == onnx.AttributeProto.FLOAT and attrs["eps"].f > 0
        assert attrs["plugin_namespace"].type == attrs["plugin_version"].type == onnx.AttributeProto.STRING
        assert (attrs["plugin_namespace"].s, attrs["plugin_version"].s) == (
            b"dit",
            b"1",
        )  # QDP creators are v1
        ins, outs = [values[i] for i in node.input], [values[o] for o in node.output]
        assert ([len(dims(v)) for v in ins], len(outs)) == (
            list(PLUGINS[node.op_type][0]),
            PLUGINS[node.op_type][1],
        )
        assert {v.type.tensor_type.elem_type for v in [*ins, *outs]} == {onnx.TensorProto.FLOAT}
        for out in outs:  # what the plugin's register function declares: outputs like inputs[0]
            assert dims(out) == dims(ins[0])
        last = dims(ins[0])[-1]
        assert isinstance(last, int)  # block shapes are chosen from it when the engine is built
        if node.op_type == "LinearAttention":
            plugins.la_bucket(last)
        else:
            plugins.adaln_launch(1, last, "float32")


def ptx_entries(ptx: str) -> dict:
    """entry name -> (parameter types in order, .maxntid)."""
    out = {}
    for m in re.finditer(r"\.entry (\w+)\(([^)]*)\)\s*(?:\.maxntid (\d+))?", ptx):
        out[m.group(1)] = (re.findall(r"\.param \.(\w+)", m.group(2)), int(m.group(3) or 0))
    return out


def nvcc_or_skip():
    from ditrt.export.kernels import KernelUnavailable, find_nvcc

    try:
        return find_nvcc()
    except KernelUnavailable as e:
        pytest.skip(str(e))


def test_aot_entry_points_take_the_arguments_tensorrt_passes():
    """TensorRT calls an AOT kernel with input pointers, then aot_impl's int32 scalars, then output pointers."""
    from ditrt.export.kernels import emit_ptx

    nvcc_or_skip()
    ptx = emit_ptx("trt_aot.cu", plugins.PTX_ARCH)
    assert ".target sm_80" in ptx
    entries = ptx_entries(ptx)
    adaln = ["u64"] * 3 + ["u32"] * len(plugins.adaln_args(2, 3, 4, 1e-6)) + ["u64"]
    residual = ["u64"] * 5 + ["u32"] * len(plugins.adaln_args(2, 3, 4, 1e-6)) + ["u64"] * 2
    la = ["u64"] * 3 + ["u32"] * len(plugins.linear_attention_args(3, 4, 1e-15)) + ["u64"]
    want = {plugins.kernel_name("adaln_modulate", dt): (adaln, plugins.ADALN_MAX_THREADS) for dt in DTYPES}
    want |= {
        plugins.kernel_name("adaln_modulate_residual", dt): (residual, plugins.ADALN_MAX_THREADS)
        for dt in DTYPES
    }
    want |= {
        plugins.kernel_name("linear_attention", dt, dk): (la, plugins.LA_THREADS)
        for dt in DTYPES
        for dk in plugins.LA_BUCKETS
    }
    assert entries == want
    one = ptx_entries(plugins.kernel_ptx("linear_attention", "float16", 32))  # what one plugin layer embeds
    assert one == {"dit_linear_attention_f16_dk32": (la, plugins.LA_THREADS)}


CONTRACT = r"""
#include <cstdio>
#include "adaln_modulate.cuh"
#include "linear_attention.cuh"
int main() {
  printf("C %d %d %d %d %d %d\n", dit::kAdaLNMaxThreads, dit::kAdaLNBytesPerThread, dit::kLAThreads,
         dit::kLAMaxHeadDim, int(dit::adaln_max_dim(4)), int(dit::adaln_max_dim(2)));
  for (int eb = 2; eb <= 4; eb += 2)
    for (int d = 1; d <= dit::adaln_max_dim(eb); d += d < 600 ? 1 : 37) {
      const int tx = dit::adaln_threads_x(d, eb);
      printf("A %d %d %d %d\n", eb, d, tx, dit::adaln_rows_per_block(tx));
    }
  for (int d = 1; d <= dit::kLAMaxHeadDim; ++d) printf("L %d %d\n", d, dit::la_bucket(d));
}
"""


def test_launch_shapes_follow_the_kernel_headers(tmp_path):
    """plugins.py computes blocks and grids in Python (TensorRT needs them symbolically); the C++ helpers that the
    C ABI launches with are the reference."""
    from ditrt.export.kernels import csrc_dir

    nvcc = nvcc_or_skip()
    (tmp_path / "contract.cu").write_text(CONTRACT)
    subprocess.run(
        [
            nvcc,
            "-std=c++17",
            "-I",
            str(csrc_dir()),
            "-o",
            str(tmp_path / "contract"),
            str(tmp_path / "contract.cu"),
        ],
        check=True,
        capture_output=True,
    )
    lines = [
        ln.split()
        for ln in subprocess.run(
            [str(tmp_path / "contract")], check=True, capture_output=True, text=True
        ).stdout.splitlines()
    ]
    assert [int(v) for v in lines[0][1:]] == [
        plugins.ADALN_MAX_THREADS,
        plugins.ADALN_BYTES_PER_THREAD,
        plugins.LA_THREADS,
        plugins.LA_MAX_HEAD_DIM,
        plugins.adaln_max_dim("float32"),
        plugins.adaln_max_dim("float16"),
    ]
    checked = 0
    for kind, *vals in lines[1:]:
        if kind == "A":
            eb, d, tx, ty = map(int, vals)
            launch = plugins.adaln_launch(5 * ty + 1, d, "float32" if eb == 4 else "float16")
            assert launch.block == (tx, ty, 1) and launch.grid == (6, 1, 1) and launch.shared_mem == 0, (
                eb,
                d,
            )
            assert tx * ty <= plugins.ADALN_MAX_THREADS
            checked += 1
        else:
            assert plugins.la_bucket(int(vals[0])) == int(vals[1])
    assert checked > 1000
    for dtype in DTYPES:
        with pytest.raises(ValueError, match="not supported"):
            plugins.adaln_launch(1, plugins.adaln_max_dim(dtype) + 1, dtype)
    with pytest.raises(ValueError, match="head dim 65"):
        plugins.linear_attention_launch(4, 65)
    assert plugins.linear_attention_launch(6, 32) == plugins.Launch((6, 1, 1), (plugins.LA_THREADS, 1, 1))


@pytest.mark.parametrize("eps", [1e-6, 1e-5, 1e-15])
def test_eps_travels_as_its_float32_bits(eps):
    bits = plugins.eps_bits(eps)
    assert np.array(bits, dtype=np.int32).view(np.float32) == np.float32(eps)


def test_profile_from_the_declared_inputs():
    specs = [
        TensorSpec("x", "float32", ["B", 4, 8, 8]),
        TensorSpec("t", "float32", []),
        TensorSpec("prompt_embeds", "float32", ["B", "T", 16]),
        TensorSpec("ids", "float32", [64, 3]),
    ]
    assert profile_shapes(specs) == {
        "x": ((1, 4, 8, 8), (1, 4, 8, 8), (4, 4, 8, 8)),
        "prompt_embeds": ((1, 1, 16), (1, 300, 16), (4, 1024, 16)),
    }
    assert profile_shapes(specs[:1], {"B": (2, 2, 16)}) == {"x": ((2, 4, 8, 8), (2, 4, 8, 8), (16, 4, 8, 8))}
    assert DEFAULT_DIMS["B"][0] == 1
    with pytest.raises(InputError, match="no TensorRT profile range for axis 'H'"):
        profile_shapes([TensorSpec("x", "float32", ["B", "H"])])
    with pytest.raises(InputError, match="1 <= min <= opt <= max"):
        profile_shapes(specs, {"B": (4, 2, 8)})


def test_tensorrt_engines_need_the_plugin_lowering():
    with pytest.raises(InputError, match="plugin lowering"):
        check_engine("tensorrt", "portable")
    with pytest.raises(InputError, match="unknown engine 'tvm'"):
        check_engine("tvm", "plugin")


@pytest.mark.skipif(not tensorrt_missing(), reason="TensorRT is installed here")
def test_without_tensorrt_export_says_so_and_writes_nothing(tmp_path):
    with pytest.raises(BackendUnavailable, match="TensorRT is not installed"):
        plugins.register_plugins()
    one_line_error(
        run_cli_here("dit-export", "digits", "--engine", "tensorrt", cwd=tmp_path),
        "TensorRT is not installed",
    )
    assert list(tmp_path.iterdir()) == []  # not even engines/


def tensorrt_folder(digits_engine, folder):
    """A valid engine folder whose denoiser is (claims to be) a TensorRT engine: enough to reach the backend."""
    from ditrt.export.folder import file_entries, write_manifest
    from ditrt.runtime.manifest import load_manifest

    shutil.copytree(digits_engine, folder)
    (folder / "denoiser" / "model.onnx").rename(folder / "denoiser" / "denoiser.plan")
    m = load_manifest(digits_engine)
    denoiser = replace(
        m.components["denoiser"], file="denoiser/denoiser.plan", backend="tensorrt", lowering="plugin"
    )
    write_manifest(folder, replace(m, components={"denoiser": denoiser}, files=file_entries(folder)))
    return folder


@pytest.mark.skipif(not tensorrt_missing(), reason="TensorRT is installed here")
def test_without_tensorrt_run_says_so(digits_engine, tmp_path):
    from ditrt.runtime import Pipeline

    folder = tensorrt_folder(digits_engine, tmp_path / "engines")
    with pytest.raises(BackendUnavailable, match="TensorRT is not installed"):
        Pipeline.load(folder, backend="tensorrt")
    work = tmp_path / "work"
    work.mkdir()
    one_line_error(
        run_cli("dit-run", str(folder), "-c", "1", "--backend", "tensorrt", cwd=work),
        "TensorRT is not installed",
        "--backend onnxruntime",
    )
    one_line_error(
        run_cli("dit-run", str(folder), "-c", "1", cwd=work), "exported for the 'tensorrt' backend"
    )
    assert list(work.iterdir()) == []


@pytest.mark.skipif(not tensorrt_missing(), reason="TensorRT is installed here")
def test_without_tensorrt_the_backend_says_so():
    specs = [TensorSpec("x", "float32", ["B", 4])]
    with pytest.raises(BackendUnavailable, match="TensorRT is not installed.*--backend onnxruntime"):
        TrtBackend(
            Path("denoiser.plan"), Component("denoiser.plan", "tensorrt", "fp32", "plugin", specs, specs)
        )


def test_backend_module_imports_without_torch_and_tensorrt():
    code = """
import sys
sys.modules["torch"] = None
import ditrt.runtime.backends.trt
bad = sorted(m for m in ("torch", "tensorrt", "cuda") if sys.modules.get(m) is not None)
assert not bad, bad
print("ok")
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr


def step_fn(feeds: dict) -> dict:
    """A stand-in step engine of the StepGraph form (nonlinear in x, every state input and scalar used)."""
    f = {k: np.asarray(v, np.float32) for k, v in feeds.items()}
    guided = np.tanh(f["x"]) + f["t"]
    x0 = np.clip(f["p"] * f["x"] + f["q"] * guided, -f["clip"], f["clip"])
    x_next = f["a"] * f["x"] + f["b"] * x0 + f["c"] * f["x0_prev"] + f["e"] * f["x0_prev2"] + f["d"] * guided
    return {"x_next": x_next.astype(np.float32), "x0": x0.astype(np.float32)}


class StepFn:  # the host loop's backend: run() is step_fn
    def run(self, feeds):
        return step_fn(feeds)


def step_scalars(k: int) -> dict:
    values = dict(t=1 - k / 40, p=1.1, q=-0.4, a=0.7, b=0.3, c=-0.2, e=0.1, d=0.05, clip=3)
    return {name: np.float32(v + 0.01 * k) for name, v in values.items()}


def test_state_carry_is_the_host_loops_state_rotation():
    """TrtLoop's state on the device, played on host arrays as the device plays it: five fixed buffers, the engine
    writing its outputs into theirs, then the `carry` copies in order; the state after each step equals HostLoop's."""
    assert len(set(STATE_BUFFERS)) == 5 and {dst for dst, _ in ROTATION} == set(STATE)
    rng = np.random.default_rng(0)
    state = {k: rng.standard_normal((2, 3, 4), dtype=np.float32) for k in STATE}
    buffers = [
        np.full((2, 3, 4), np.nan, np.float32) for _ in STATE_BUFFERS
    ]  # outputs need no initial content
    address = {name: i for i, name in enumerate(STATE_BUFFERS)}  # "device addresses": indices into buffers
    for name in STATE:
        buffers[address[name]][...] = state[name]
    with HostLoop(StepFn(), {}, state) as host:
        for k in range(50):
            scalars = step_scalars(k)
            for name in ("x0", "x_next"):  # each output written in place before the next reads the inputs
                out = step_fn({**{n: buffers[address[n]] for n in STATE}, **scalars})
                buffers[address[name]][...] = out[name]
            for dst, src in carry(address):
                np.copyto(buffers[dst], buffers[src])
            host.step(scalars)
            want = host.read()
            assert set(want) == set(READ)
            for name in READ:
                np.testing.assert_array_equal(buffers[address[name]], want[name])


def test_scalar_block_layout():
    offsets, size = scalar_layout(list(STEP_SCALARS))
    assert ALIGN == 256  # TensorRT's alignment of tensor addresses (IExecutionContext::setTensorAddress)
    assert list(offsets) == list(STEP_SCALARS) and size == len(STEP_SCALARS) * ALIGN
    assert sorted(offsets.values()) == [i * ALIGN for i in range(len(STEP_SCALARS))]
    assert all(o % ALIGN == 0 and o + 4 <= size for o in offsets.values())
    block = np.zeros(size // 4, np.float32)  # one host block, filled as TrtLoop.step fills it
    scalars = step_scalars(3)
    for name, offset in offsets.items():
        block[offset // 4] = scalars[name]
    raw = block.tobytes()
    for name, offset in offsets.items():  # what the engine reads at block + offset
        assert np.frombuffer(raw, np.float32, 1, offset)[0] == scalars[name]
    assert scalar_layout([]) == ({}, ALIGN)  # never a zero-byte allocation


def test_pool_blocks_when_all_are_out_and_makes_at_most_size():
    made = []
    pool = Pool(2, lambda: made.append(len(made)) or f"context{len(made)}")
    a, b = pool.take(), pool.take()
    got = []
    waiter = threading.Thread(target=lambda: got.append(pool.take()))
    waiter.start()
    waiter.join(0.2)
    assert waiter.is_alive() and not got  # both are out: the third request waits
    pool.give(b)
    waiter.join(5)
    assert got == [b] and len(made) == 2
    pool.give(a)
    pool.give(b)
    assert sorted(pool.drain()) == ["context1", "context2"]


def test_pool_under_threads():
    pool = Pool(2, object)
    lock, out, peak, errors = threading.Lock(), set(), [0], []

    def request(i):
        try:
            with pool.lease() as item:
                with lock:
                    assert item not in out, "one context leased twice"
                    out.add(item)
                    peak[0] = max(peak[0], len(out))
                time.sleep(0.002 * (i % 3))
                with lock:
                    out.remove(item)
                if i % 5 == 0:
                    raise KeyError(i)  # a failing request still gives its context back
        except KeyError:
            pass
        except AssertionError as e:
            errors.append(e)

    threads = [threading.Thread(target=request, args=(i,)) for i in range(40)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors and not any(t.is_alive() for t in threads)
    assert peak[0] <= 2 and pool.made == 2 and len(pool.free) == 2


def test_pool_failed_make_frees_its_place():
    calls = []

    def make():
        calls.append(1)
        if len(calls) == 1:
            raise BackendUnavailable("no context")
        return "context"

    pool = Pool(1, make)
    with pytest.raises(BackendUnavailable):
        pool.take()
    assert pool.take() == "context"  # the failed one did not use up the only place


# ---- with TensorRT, cuda-python and a GPU ------------------------------------------------------------------------


@pytest.fixture
def gpu():
    pytest.importorskip("tensorrt")
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        cudart = pytest.importorskip("cuda.cudart")
    err, count = cudart.cudaGetDeviceCount()
    if err != cudart.cudaError_t.cudaSuccess or count == 0:
        pytest.skip("no CUDA GPU visible")


def feeds(inputs, B, seed=0) -> dict:
    samples = sample_inputs(inputs, {"B": B, "n": 2}, seed)  # n: both CFG branches
    args = dict(zip([s.name for s in inputs], (a.numpy() for a in samples)))
    for name, v in args.items():
        if name.endswith("attention_mask"):  # real masks: 1 = token, 0 = padding; (..., B, T)
            tokens = np.arange(v.shape[-1]) < np.array([3, 5, 2][:B])[:, None]
            args[name] = np.broadcast_to(tokens, v.shape).astype(np.int64)
        if name == "class_labels":
            args[name] = v % 5
    return args


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["dit", "sana", "residual"])
def test_engine_with_plugins_matches_onnxruntime(gpu, plugin_graphs, name, tmp_path):
    import onnxruntime as ort

    from ditrt.export.trt.build import build_engine
    from ditrt.runtime.backends.trt import TrtBackend

    path, graph, inputs, outputs = plugin_graphs[name]
    export_onnx(graph, inputs, outputs, tmp_path / "portable.onnx", "portable")
    specs = [[TensorSpec(s.name, s.dtype, list(s.shape)) for s in ss] for ss in (inputs, outputs)]
    plan = build_engine(path, tmp_path / "step.plan", specs[0], dims={"B": (1, 2, 3)})
    engine = TrtBackend(plan, Component("step.plan", "tensorrt", "fp32", "plugin", *specs))
    session = ort.InferenceSession(str(tmp_path / "portable.onnx"), providers=["CPUExecutionProvider"])
    try:
        for B in (1, 3):
            x = feeds(inputs, B, seed=B)
            got, want = engine.run(x), session.run([s.name for s in outputs], x)
            for s, w in zip(outputs, want):
                assert got[s.name].shape == w.shape
                # fp32 throughout; kernels sum in another order than ONNX Runtime: rounding only
                np.testing.assert_allclose(got[s.name], w, rtol=0, atol=1e-4)
        with pytest.raises(InputError, match="built for"):
            engine.run(feeds(inputs, 4))  # past the profile's batch range
    finally:
        engine.close()


@pytest.mark.gpu
def test_export_and_run_tensorrt_end_to_end(gpu, request, tmp_path):
    digits_engine = request.getfixturevalue(
        "digits_engine"
    )  # after the skip: a session fixture is set up first
    r = run_cli("dit-export", "digits", "--engine", "tensorrt", "-o", str(tmp_path / "trt"), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    manifest = json.loads((tmp_path / "trt" / "manifest.json").read_text())
    assert manifest["components"]["denoiser"]["file"] == "denoiser/denoiser.plan"
    assert manifest["components"]["denoiser"]["backend"] == "tensorrt"
    assert {"denoiser/model.onnx", "denoiser/denoiser.plan"} <= set(manifest["files"])
    from PIL import Image

    images = []
    for folder, backend in ((tmp_path / "trt", "tensorrt"), (digits_engine, "onnxruntime")):
        out = tmp_path / f"{backend}.png"
        r = run_cli(
            "dit-run", str(folder), "-c", "3", "-s", "7", "--backend", backend, "-o", str(out), cwd=tmp_path
        )
        assert r.returncode == 0, r.stderr
        images.append(np.asarray(Image.open(out), dtype=np.int16))
    assert np.abs(images[0] - images[1]).max() <= 2  # same seed, same model: rounding only


@pytest.mark.gpu
def test_device_loop_matches_host_loop(gpu, plugin_graphs, tmp_path):
    """TrtLoop (device state, scalar block, CUDA graph, pooled contexts) against HostLoop through run() on the
    same engine: 8 steps (warm-up, capture, replays), a preview read mid-loop, three concurrent loops on a pool of
    two contexts, and a second round that reuses the contexts' buffers and graphs."""
    from ditrt.export.trt.build import build_engine

    path, _, inputs, outputs = plugin_graphs["sana"]
    specs = [[TensorSpec(s.name, s.dtype, list(s.shape)) for s in ss] for ss in (inputs, outputs)]
    plan = build_engine(path, tmp_path / "step.plan", specs[0], dims={"B": (1, 2, 3)})
    engine = TrtBackend(plan, Component("step.plan", "tensorrt", "fp32", "plugin", *specs), contexts=2)
    fed = feeds(inputs, 2, seed=5)
    state = {k: fed.pop(k) for k in STATE}
    steps = [step_scalars(k) for k in range(8)]
    static = {k: v for k, v in fed.items() if k not in steps[0]}
    try:
        with HostLoop(engine, static, state) as host:
            want = []
            for k, scalars in enumerate(steps):
                host.step(scalars)
                if k in (2, 7):
                    want.append(host.read())

        def device(results, i):
            with engine.loop(static, state) as loop:
                got = []
                for k, scalars in enumerate(steps):
                    loop.step(scalars)
                    if k in (2, 7):
                        got.append(loop.read())
            results[i] = got

        for _ in range(2):  # the second round finds the contexts' buffers and graphs
            results = {}
            threads = [threading.Thread(target=device, args=(results, i)) for i in range(3)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(120)
            assert sorted(results) == [0, 1, 2]
            for got in results.values():
                for g, w in zip(got, want):
                    for name in READ:
                        np.testing.assert_allclose(g[name], w[name], rtol=1e-5, atol=1e-5)
        assert engine.graphs, "TensorRT could not capture the step engine as a CUDA graph"
        slots = engine.pool.free
        assert len(slots) <= 2 and any(slot.graph is not None for slot in slots)
        with pytest.raises(InputError, match="missing"):
            with engine.loop(static, state) as loop:
                loop.step({k: v for k, v in steps[0].items() if k != "t"})
    finally:
        engine.close()
