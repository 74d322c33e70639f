"""The dit ops as C++ torch ops (torch.ops.ditrt.*, csrc/torch_ops.cpp built by export/kernels/cpp_ops): the build,
the schemas, the CPU kernels against the Python references and float64 maths, the Meta kernels, input errors, the
"kernels" lowering in torch.export graphs, and AOTInductor packages calling the ops, run from Python and (slow)
from a C++ program with no Python.

The library is built into the ambient kernel cache ($DITRT_KERNEL_CACHE or ~/.cache/ditrt/kernels: nvcc then g++,
about 20 s the first time, a second when cached); the build tests that start from an empty cache are slow."""

import importlib
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from ditrt.export.kernels import KernelUnavailable, cpp_ops
from ditrt.export.ops import adaln_modulate, adaln_modulate_residual, linear_attention, lowering

adaln = importlib.import_module("ditrt.export.ops.adaln")  # the modules (the package exports the functions)
adaln_residual = importlib.import_module("ditrt.export.ops.adaln_residual")
la = importlib.import_module("ditrt.export.ops.linear_attention")

_NVCC = shutil.which("nvcc") or os.environ.get("CUDA_HOME")
_CXX = shutil.which(os.environ.get("CXX") or "g++")
pytestmark = [
    pytest.mark.xdist_group("cpp_ops"),  # one worker builds and loads the op library (pytest -n)
    pytest.mark.skipif(
        not _NVCC,
        reason="nvcc not found (no CUDA toolkit on PATH or CUDA_HOME): libditrt_ops links the kernels",
    ),
    pytest.mark.skipif(not _CXX, reason="g++ not found (nor $CXX): the ditrt torch ops cannot be compiled"),
]
ROOT = Path(__file__).resolve().parent.parent
SCHEMAS = {
    "adaln_modulate": "ditrt::adaln_modulate(Tensor x, Tensor shift, Tensor scale, float eps) -> Tensor",
    "adaln_modulate_residual": "ditrt::adaln_modulate_residual(Tensor residual, Tensor y, Tensor gate, "
    "Tensor shift, Tensor scale, float eps) -> (Tensor, Tensor)",
    "linear_attention": "ditrt::linear_attention(Tensor q, Tensor k, Tensor v, float eps) -> Tensor",
}


@pytest.fixture(scope="module")
def ops_library() -> Path:
    return cpp_ops.load()


def modulation_inputs(B, N, D, dtype, seed=0):
    """residual, y (B, N, D) with a non-zero mean; gate, shift, scale (B, D)."""
    g = torch.Generator().manual_seed(seed)
    residual, y = torch.randn(B, N, D, generator=g) * 3 + 1, torch.randn(B, N, D, generator=g)
    gate, shift, scale = (torch.randn(B, D, generator=g) * 0.5 for _ in range(3))
    return [t.to(dtype) for t in (residual, y, gate, shift, scale)]


def attention_inputs(B, H, N, d, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, N, d, generator=g).to(dtype) for _ in range(3)]


def strided(t: torch.Tensor) -> torch.Tensor:
    """The same values with another layout: dims 0 and 1 swapped in memory."""
    return t.transpose(0, 1).contiguous().transpose(0, 1)


# Against the Python references: the C++ CPU kernels run the same ATen ops in the same order, so the results are
# identical here; fp32 allows ~8 ulps only in case a BLAS blocks a matmul differently, and fp16/bf16 one ulp of the
# output type (both round the same fp32 values once).
REF_TOL = {
    torch.float32: dict(rtol=1e-6, atol=1e-6),
    torch.float16: dict(rtol=2**-10, atol=1e-5),
    torch.bfloat16: dict(rtol=2**-7, atol=1e-5),
}
DTYPES = list(REF_TOL)


def test_library_builds_loads_and_links_the_kernels_beside_it(ops_library):
    assert ops_library.name == "libditrt_ops.so" and ops_library.is_file()
    kernels_copy, ops = cpp_ops.package_libraries(ops_library)
    assert ops == ops_library and kernels_copy.name == "libditkernels.so" and kernels_copy.is_file()
    assert cpp_ops.registered() and cpp_ops.available() == ops_library
    if shutil.which("readelf"):
        dynamic = subprocess.run(["readelf", "-d", str(ops_library)], capture_output=True, text=True).stdout
        assert "[libditkernels.so]" in dynamic and "$ORIGIN" in dynamic  # found beside it, from any process


def test_shipped_copies_load_in_order_and_a_second_copy_registers_nothing(ops_library, tmp_path):
    """An engine folder's copies (kernels, then ops, as the runtime loads them), then the cache's library in
    the same process: TORCH_LIBRARY would abort the process there; the first copy serves."""
    for lib in cpp_ops.package_libraries(ops_library):
        shutil.copy2(lib, tmp_path / lib.name)
    script = (
        "import sys, torch\n"
        "for lib in sys.argv[1:]: torch.ops.load_library(lib)\n"
        "x, r = torch.ones(1, 2, 4), torch.zeros(1, 4)\n"
        "print(torch.ops.ditrt.adaln_modulate(x, r, r, 1e-6).abs().sum().item())\n"
    )
    folder = [str(tmp_path / "libditkernels.so"), str(tmp_path / "libditrt_ops.so")]
    env = {k: v for k, v in os.environ.items() if k != "LD_LIBRARY_PATH"}
    r = subprocess.run(
        [sys.executable, "-c", script, *folder, str(ops_library)], capture_output=True, text=True, env=env
    )
    assert r.returncode == 0 and r.stdout.strip() == "0.0", r.stderr


def test_schemas_are_registered_and_pt2_compliant(ops_library):
    for name, schema in SCHEMAS.items():
        op = getattr(torch.ops.ditrt, name).default
        assert str(op._schema) == schema
        assert torch.Tag.pt2_compliant_tag in op.tags
        for key in ("CPU", "CUDA", "Meta"):
            assert torch._C._dispatch_has_kernel_for_dispatch_key(f"ditrt::{name}", key), (name, key)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["contiguous", "strided", "sliced"])
def test_cpu_modulation_matches_the_references(ops_library, dtype, layout):
    residual, y, gate, shift, scale = modulation_inputs(3, 40, 72, dtype)
    if layout == "strided":
        residual, y = strided(residual), strided(y)
    elif layout == "sliced":  # every other token, and (B, D) rows read from a wider tensor
        residual, y, shift = residual[:, ::2], y[:, ::2], torch.cat([shift, shift], 1)[:, 72:]
    out = torch.ops.ditrt.adaln_modulate(residual, shift, scale, 1e-6)
    assert out.dtype == dtype and out.is_contiguous()
    torch.testing.assert_close(out, adaln.reference(residual, shift, scale, 1e-6), **REF_TOL[dtype])
    h, out = torch.ops.ditrt.adaln_modulate_residual(residual, y, gate, shift, scale, 1e-6)
    h_ref, out_ref = adaln_residual.reference(residual, y, gate, shift, scale, 1e-6)
    assert h.is_contiguous() and out.is_contiguous() and h.dtype == out.dtype == dtype
    torch.testing.assert_close(h, h_ref, **REF_TOL[dtype])
    torch.testing.assert_close(out, out_ref, **REF_TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["contiguous", "strided"])
def test_cpu_linear_attention_matches_the_reference(ops_library, dtype, layout):
    q, k, v = attention_inputs(2, 3, 130, 24, dtype)
    if layout == "strided":
        q, k, v = strided(q), k.transpose(2, 3).contiguous().transpose(2, 3), v.flip(1)
    out = torch.ops.ditrt.linear_attention(q, k, v, la.EPS)
    assert out.dtype == dtype and out.is_contiguous()
    torch.testing.assert_close(out, la.reference(q, k, v, la.EPS), **REF_TOL[dtype])


def test_cpu_fp32_matches_float64_maths(ops_library):
    """Independently of the Python references: fp32 statistics and sums are a few fp32 ulps from exact."""
    x, y, gate, shift, scale = modulation_inputs(2, 33, 1152, torch.float32)
    x64 = x.double()
    mean, var = x64.mean(-1, keepdim=True), x64.var(-1, unbiased=False, keepdim=True)
    exact = (x64 - mean) / torch.sqrt(var + 1e-6) * (1 + scale.double()[:, None]) + shift.double()[:, None]
    out = torch.ops.ditrt.adaln_modulate(x, shift, scale, 1e-6)
    torch.testing.assert_close(out.double(), exact, rtol=1e-5, atol=2e-5)
    q, k, v = attention_inputs(1, 2, 200, 16, torch.float32)
    qf, kf = q.double().relu(), k.double().relu()
    exact = (qf @ (kf.transpose(-1, -2) @ v.double())) / (qf @ kf.sum(2, keepdim=True).transpose(-1, -2))
    torch.testing.assert_close(
        torch.ops.ditrt.linear_attention(q, k, v, la.EPS).double(), exact, rtol=1e-5, atol=1e-5
    )


def test_cpu_all_zero_keys_stay_finite(ops_library):
    q, k, v = attention_inputs(1, 1, 9, 8, torch.float32)
    out = torch.ops.ditrt.linear_attention(q, -k.abs(), v, la.EPS)  # relu(k) = 0: numerator and normaliser 0
    assert torch.isfinite(out).all() and (out == 0).all()


def test_meta_kernels_give_contiguous_outputs(ops_library):
    x = torch.empty(5, 2, 16, device="meta").transpose(0, 1)  # (2, 5, 16), not contiguous
    rows = torch.empty(2, 16, device="meta", dtype=torch.float32)
    out = torch.ops.ditrt.adaln_modulate(x, rows, rows, 1e-6)
    assert out.device.type == "meta" and out.shape == (2, 5, 16) and out.is_contiguous()
    h, out = torch.ops.ditrt.adaln_modulate_residual(x, x, rows, rows, rows, 1e-6)
    assert h.shape == out.shape == (2, 5, 16) and h.is_contiguous() and out.is_contiguous()
    q = torch.empty(2, 7, 3, 8, device="meta", dtype=torch.bfloat16).transpose(1, 2)
    out = torch.ops.ditrt.linear_attention(q, q, q, la.EPS)
    assert out.shape == (2, 3, 7, 8) and out.dtype == torch.bfloat16 and out.is_contiguous()


def test_opcheck_schema_fake_and_dynamic_shapes(ops_library):
    residual, y, gate, shift, scale = modulation_inputs(2, 5, 8, torch.float32)
    q, k, v = attention_inputs(1, 2, 7, 4, torch.float32)
    cases = [
        (torch.ops.ditrt.adaln_modulate.default, (strided(residual), shift, scale, 1e-6)),
        (torch.ops.ditrt.adaln_modulate_residual.default, (residual, y, gate, shift, scale, 1e-6)),
        (
            torch.ops.ditrt.linear_attention.default,
            (q, k.transpose(1, 2).contiguous().transpose(1, 2), v, 1e-15),
        ),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args)


BAD = [
    (
        "adaln_modulate",
        lambda x, r: (x, r[:1], r, 1e-6),
        r"ditrt::adaln_modulate: shift must be \(B, D\) = \(2, 8\)",
    ),
    (
        "adaln_modulate",
        lambda x, r: (x[0], r, r, 1e-6),
        r"ditrt::adaln_modulate: expected x of shape \(B, N, D\)",
    ),
    (
        "adaln_modulate",
        lambda x, r: (x, r, r.double(), 1e-6),
        r"ditrt::adaln_modulate: scale is Double but x Float",
    ),
    (
        "adaln_modulate_residual",
        lambda x, r: (x, x[:, :2], r, r, r, 1e-6),
        r"ditrt::adaln_modulate_residual: y must have the shape of residual",
    ),
    (
        "adaln_modulate_residual",
        lambda x, r: (x, x, r[:, :4], r, r, 1e-6),
        r"ditrt::adaln_modulate_residual: gate must be \(B, D\)",
    ),
    (
        "linear_attention",
        lambda x, r: (x[None], x[None], x[None, :, :2], 1e-15),
        r"ditrt::linear_attention: q, k, v must share one \(B, H, N, d\) shape",
    ),
    ("linear_attention", lambda x, r: (x, x, x, 1e-15), r"ditrt::linear_attention: q, k, v must share one"),
]


@pytest.mark.parametrize("device", ["cpu", "meta"])
@pytest.mark.parametrize("name, args, match", BAD, ids=[f"{b[0]}-{i}" for i, b in enumerate(BAD)])
def test_bad_inputs_raise_a_runtime_error_naming_the_op(ops_library, device, name, args, match):
    x, rows = torch.randn(2, 5, 8, device=device), torch.randn(2, 8, device=device)
    with pytest.raises(RuntimeError, match=match) as e:
        getattr(torch.ops.ditrt, name)(*args(x, rows))
    assert "\n" not in str(e.value).strip()  # the message, without a C++ backtrace


class Tiny(torch.nn.Module):
    """The three ops between linear layers, as a DiT block uses them (D = 16, two heads of 8)."""

    def __init__(self):
        super().__init__()
        with torch.random.fork_rng():
            torch.manual_seed(0)
            self.proj = torch.nn.Linear(16, 16)
            self.ada = torch.nn.Linear(16, 48)

    def forward(self, x, c):
        shift, scale, gate = self.ada(c).chunk(3, -1)
        h = adaln_modulate(x, shift, scale)
        B, N, D = h.shape
        q = self.proj(h).view(B, N, 2, 8).transpose(1, 2)
        a = linear_attention(q, q * 0.5, q.flip(-1)).transpose(1, 2).reshape(B, N, D)
        res, out = adaln_modulate_residual(x, a, gate, shift, scale)
        return res + out


def tiny_inputs(n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, n, 16, generator=g), torch.randn(2, 16, generator=g)


def export_tiny(mode: str = "kernels"):
    model = Tiny().eval()
    dynamic = {"x": {1: torch.export.Dim("tokens", min=2, max=256)}, "c": None}
    with lowering(mode), torch.no_grad():
        return model, torch.export.export(model, tiny_inputs(10), dynamic_shapes=dynamic)


def eager(model, x, c, mode="reference"):
    with lowering(mode), torch.no_grad():
        return model(x, c)


def test_kernels_lowering_puts_ditrt_ops_in_export_graphs(ops_library):
    model, program = export_tiny()
    targets = [str(n.target) for n in program.graph.nodes if n.op == "call_function"]
    assert {"ditrt.adaln_modulate.default", "ditrt.linear_attention.default"} <= set(targets), targets
    assert "ditrt.adaln_modulate_residual.default" in targets
    assert not [t for t in targets if t.startswith("dit.")]
    x, c = tiny_inputs(37, seed=1)  # another token count: the axis stayed symbolic through the Meta kernels
    with torch.no_grad():
        torch.testing.assert_close(program.module()(x, c), eager(model, x, c), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(eager(model, x, c, "kernels"), eager(model, x, c), rtol=1e-6, atol=1e-6)


def test_kernels_lowering_falls_back_to_the_reference_with_one_warning(ops_library, monkeypatch):
    def unavailable():
        raise KernelUnavailable("g++ torch_ops.cpp failed: error: something")

    monkeypatch.setattr(cpp_ops, "load", unavailable)
    cpp_ops.available.cache_clear()
    try:
        x, c = tiny_inputs(6)
        model = Tiny().eval()
        with pytest.warns(
            RuntimeWarning, match="ditrt torch ops unavailable: g\\+\\+ torch_ops.cpp failed"
        ) as w:
            out = eager(model, x, c, "kernels")
            eager(model, x, c, "kernels")
        assert len([r for r in w if "ditrt torch ops" in str(r.message)]) == 1
        torch.testing.assert_close(out, eager(model, x, c), rtol=0, atol=0)
        with lowering("kernels"), torch.no_grad():
            program = torch.export.export(model, (x, c))
        assert not [n for n in program.graph.nodes if str(n.target).startswith("ditrt.")]
    finally:
        cpp_ops.available.cache_clear()


def test_missing_compiler_is_named_once(monkeypatch):
    monkeypatch.setenv("CXX", "no-such-cxx")
    cpp_ops.load.cache_clear()
    cpp_ops.available.cache_clear()
    try:
        with pytest.raises(KernelUnavailable, match="C\\+\\+ compiler 'no-such-cxx' not found"):
            cpp_ops.load()
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            assert cpp_ops.available() is None and cpp_ops.available() is None
        assert [str(r.message) for r in record] == [
            "ditrt torch ops unavailable: C++ compiler 'no-such-cxx' not found: install g++ (or set CXX) to "
            "build the ditrt torch ops"
        ]
    finally:
        cpp_ops.load.cache_clear()
        cpp_ops.available.cache_clear()


def test_compile_error_is_one_line_with_the_compilers_first_error(ops_library, monkeypatch, tmp_path):
    src = tmp_path / "csrc"
    src.mkdir()
    shutil.copy(ROOT / "csrc" / "dit_kernels.h", src)
    (src / "torch_ops.cpp").write_text('#include "dit_kernels.h"\nint f() { return undeclared_name; }\n')
    monkeypatch.setattr(cpp_ops, "csrc_dir", lambda: src)
    monkeypatch.setattr(cpp_ops, "cache_root", lambda: tmp_path / "cache")  # the kernels stay in their cache
    with pytest.raises(KernelUnavailable, match=r"g\+\+ torch_ops.cpp failed: .*error.*undeclared_name") as e:
        cpp_ops.build()
    assert "\n" not in str(e.value)
    assert not [
        p for p in (tmp_path / "cache").rglob("*.so") if p.name != "libditkernels.so"
    ]  # no temp files


@pytest.mark.slow  # nvcc and g++ into an empty cache: about 20 s on 2 cores
def test_build_into_an_empty_cache_is_cached_and_the_cli_prints_both_paths(tmp_path, monkeypatch):
    monkeypatch.setenv("DITRT_KERNEL_CACHE", str(tmp_path))
    path = cpp_ops.build()
    assert path.parent.parent == tmp_path and path.parent.name.startswith("ops-")
    mtime = path.stat().st_mtime_ns
    assert cpp_ops.build() == path and path.stat().st_mtime_ns == mtime
    assert sorted(p.name for p in path.parent.iterdir()) == ["libditkernels.so", "libditrt_ops.so"]
    r = subprocess.run(
        [sys.executable, "-m", "ditrt.export.kernels", "build"], capture_output=True, text=True, timeout=120
    )
    kernel_library = str(cpp_ops.kernels.library_path())
    assert r.returncode == 0 and r.stdout.split() == [kernel_library, str(path)], r.stderr


# AOTInductor packages (CPU): the graph calls the ditrt ops through the proxy executor.


@pytest.fixture(scope="module")
def package(ops_library, tmp_path_factory):
    model, program = export_tiny()
    path = tmp_path_factory.mktemp("aoti") / "tiny.pt2"
    torch._inductor.aoti_compile_and_package(program, package_path=str(path))
    return model, path


@pytest.mark.slow  # Inductor compiles the package with g++: about 10 s
def test_aoti_package_calls_the_ops_and_matches_eager(package):
    import zipfile

    model, path = package
    with zipfile.ZipFile(path) as z:
        graph = "".join(z.read(n).decode() for n in z.namelist() if n.endswith("wrapper.json"))
    for name in SCHEMAS:
        assert f'"target": "ditrt::{name}"' in graph, name  # called, not inlined
    loaded = torch._inductor.aoti_load_package(str(path))
    for n in (10, 3, 130):
        x, c = tiny_inputs(n, seed=n)
        torch.testing.assert_close(loaded(x, c), eager(model, x, c), rtol=1e-6, atol=1e-6)


@pytest.mark.slow  # the package (~10 s) and a C++ program against libtorch (~5 s)
def test_cpp_program_runs_the_package_with_the_op_library(package, ops_library, tmp_path):
    model, path = package
    includes, torch_lib, defines = cpp_ops.torch_config()
    exe = tmp_path / "run_package"
    subprocess.run(
        [
            _CXX,
            "-std=c++20",
            "-O1",
            *defines,
            *(f"-I{p}" for p in includes),
            str(ROOT / "tests" / "aoti_cpp" / "run_package.cpp"),
            "-o",
            str(exe),
            f"-L{torch_lib}",
            "-ltorch",
            "-ltorch_cpu",
            "-lc10",
            "-ldl",
            f"-Wl,-rpath,{torch_lib}",
        ],
        check=True,
        capture_output=True,
    )
    x, c = tiny_inputs(21, seed=3)
    x.numpy().tofile(tmp_path / "x.bin")
    c.numpy().tofile(tmp_path / "c.bin")
    args = [
        str(path),
        str(tmp_path / "out.bin"),
        f"{tmp_path / 'x.bin'}:2,21,16",
        f"{tmp_path / 'c.bin'}:2,16",
    ]
    env = {k: v for k, v in os.environ.items() if k != "LD_LIBRARY_PATH"}
    r = subprocess.run(
        [str(exe), str(ops_library), *args], capture_output=True, text=True, timeout=120, env=env
    )
    assert r.returncode == 0 and r.stdout.strip() == "output [2, 21, 16]", r.stderr
    out = torch.from_file(str(tmp_path / "out.bin"), size=2 * 21 * 16).view(2, 21, 16)
    torch.testing.assert_close(out, eager(model, x, c), rtol=1e-6, atol=1e-6)
    # without the library the package cannot run: the ops exist only once a C++ library registered them
    r = subprocess.run([str(exe), "-", *args], capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 3 and "Could not find schema for ditrt::" in r.stderr, r.stderr


# On a GPU (marked gpu, skipped without one): the CUDA kernels through the C++ ops.


@pytest.fixture(scope="module")
def cuda_ops(ops_library):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    from ditrt.export.kernels import torch_ops

    torch_ops.register()  # torch.ops.dit.* on CUDA: the same kernels through ctypes, the comparison below
    return ops_library


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_ops_equal_the_python_binding_of_the_same_kernels(cuda_ops, dtype):
    """Same kernels, same arguments, same workspace rule: bit-identical outputs, contiguous or not."""
    residual, y, gate, shift, scale = (t.cuda() for t in modulation_inputs(2, 64, 1152, dtype))
    for x in (residual, strided(residual)):
        assert torch.equal(
            torch.ops.ditrt.adaln_modulate(x, shift, scale, 1e-6),
            torch.ops.dit.adaln_modulate(x, shift, scale, 1e-6),
        )
        ours = torch.ops.ditrt.adaln_modulate_residual(x, y, gate, shift, scale, 1e-6)
        theirs = torch.ops.dit.adaln_modulate_residual(x, y, gate, shift, scale, 1e-6)
        assert all(torch.equal(a, b) for a, b in zip(ours, theirs))
    for shape in ((2, 3, 300, 32), (1, 2, 16384, 32)):  # one kernel; the split path with its workspace
        q, k, v = (t.cuda() for t in attention_inputs(*shape, dtype))
        want = torch.ops.dit.linear_attention(q, k, v, la.EPS)
        assert torch.equal(torch.ops.ditrt.linear_attention(q, k, v, la.EPS), want)
        side = torch.cuda.Stream()  # the kernels run on the current stream
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            out = torch.ops.ditrt.linear_attention(q, k, v, la.EPS)
        torch.cuda.current_stream().wait_stream(side)
        assert torch.equal(out, want)


@pytest.mark.gpu
def test_cuda_inputs_the_kernels_do_not_cover_use_the_reference(cuda_ops):
    residual, _, _, shift, scale = (
        t.cuda() for t in modulation_inputs(1, 3, 16400, torch.float16)
    )  # D > 16384
    torch.testing.assert_close(
        torch.ops.ditrt.adaln_modulate(residual, shift, scale, 1e-6),
        adaln.reference(residual, shift, scale, 1e-6),
        **REF_TOL[torch.float16],
    )
    for shape, dtype in (
        ((1, 2, 9, 80), torch.float32),
        ((1, 2, 9, 16), torch.float64),
        ((1, 2, 0, 16), torch.float32),
    ):
        q, k, v = (t.cuda() for t in attention_inputs(*shape, dtype))  # head dim > 64, fp64, no tokens
        out = torch.ops.ditrt.linear_attention(q, k, v, la.EPS)
        assert out.shape == shape and out.dtype == dtype and out.is_contiguous()
        torch.testing.assert_close(out, la.reference(q, k, v, la.EPS), rtol=1e-6, atol=1e-6)


@pytest.mark.gpu
def test_cuda_ops_pass_opcheck(cuda_ops):
    residual, y, gate, shift, scale = (t.cuda() for t in modulation_inputs(2, 5, 72, torch.float16))
    torch.library.opcheck(torch.ops.ditrt.adaln_modulate.default, (residual, shift, scale, 1e-6))
    torch.library.opcheck(
        torch.ops.ditrt.adaln_modulate_residual.default, (residual, y, gate, shift, scale, 1e-6)
    )
    q, k, v = (t.cuda() for t in attention_inputs(1, 2, 9, 32, torch.bfloat16))
    torch.library.opcheck(torch.ops.ditrt.linear_attention.default, (q, k, v, 1e-15))


@pytest.mark.gpu
@pytest.mark.slow  # Inductor compiles a CUDA package
def test_cuda_aoti_package_calls_the_kernels(cuda_ops, tmp_path):
    model = Tiny().eval().cuda()
    dynamic = {"x": {1: torch.export.Dim("tokens", min=2, max=256)}, "c": None}
    x, c = (t.cuda() for t in tiny_inputs(10))
    with lowering("kernels"), torch.no_grad():
        program = torch.export.export(model, (x, c), dynamic_shapes=dynamic)
    path = torch._inductor.aoti_compile_and_package(program, package_path=str(tmp_path / "tiny.pt2"))
    loaded = torch._inductor.aoti_load_package(path)
    for n in (10, 77):
        x, c = (t.cuda() for t in tiny_inputs(n, seed=n))
        torch.testing.assert_close(loaded(x, c), eager(model, x, c, "kernels"), rtol=1e-5, atol=1e-5)
