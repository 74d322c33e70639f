"""CUDA kernels of the dit:: ops: the fused residual op's contract everywhere, the nvcc build wherever nvcc exists,
and the kernels against float64 maths and the torch references on a GPU (marked gpu, skipped without one)."""

import importlib
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ditrt.export.kernels import KernelUnavailable, build, emit_ptx, load, torch_ops
from ditrt.export.ops import (
    adaln,
    adaln_modulate,
    adaln_modulate_residual,
    adaln_residual,
    linear_attention,
    lowering,
)
from ditrt.export.ops.linear_attention import reference as la_reference
from ditrt.runtime.errors import InputError
from ditrt.runtime.manifest import TensorSpec

build_mod = importlib.import_module("ditrt.export.kernels.build")  # the module, not its build() function
pytestmark = pytest.mark.xdist_group("kernels")  # one worker compiles the module's kernel library (pytest -n)
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
C_ABI = [
    "dit_adaln_modulate",
    "dit_adaln_modulate_residual",
    "dit_linear_attention",
    "dit_linear_attention_workspace_size",
    "dit_runtime_check",
    "dit_error_string",
    "dit_kernels_version",
]
ENTRIES = [
    "adaln_modulate_kernel",
    "adaln_modulate_residual_kernel",
    "linear_attention_kernel",
    "linear_attention_partial_kernel",
    "linear_attention_apply_kernel",
]


def modulation_inputs(shape, dtype, device="cpu", seed=0):
    """residual, y (B, N, D) with a non-zero mean; gate, shift, scale (B, D)."""
    g = torch.Generator().manual_seed(seed)
    B, _, D = shape
    residual, y = torch.randn(shape, generator=g) * 3 + 1, torch.randn(shape, generator=g)
    gate, shift, scale = (torch.randn(B, D, generator=g) * 0.5 for _ in range(3))
    return [t.to(device=device, dtype=dtype) for t in (residual, y, gate, shift, scale)]


def adaln64(x, shift, scale, eps):
    """adaln_modulate in float64, written out: the exact value of the op on these (rounded) inputs."""
    x64 = x.double()
    mean = x64.mean(-1, keepdim=True)
    var = ((x64 - mean) ** 2).mean(-1, keepdim=True)
    return (x64 - mean) / torch.sqrt(var + eps) * (1 + scale.double()[:, None]) + shift.double()[:, None]


def linear_attention64(q, k, v, eps=1e-15):
    qf, kf, vf = q.double().relu(), k.double().relu(), v.double()
    return (qf @ (kf.transpose(-1, -2) @ vf)) / (qf @ kf.sum(2, keepdim=True).transpose(-1, -2)).clamp_min(
        eps
    )


def ulp_tol(dtype):
    """Outputs are computed in fp32 and rounded once to the output type: within 2 ulps of that type relative,
    plus a small fp32 floor for values that cancel to ~0."""
    return {
        torch.float32: dict(rtol=1e-5, atol=2e-5),
        torch.float16: dict(rtol=2**-9, atol=1e-4),
        torch.bfloat16: dict(rtol=2**-6, atol=1e-4),
    }[dtype]


# (a) everywhere: the fused residual op's reference, fake and lowerings.


@pytest.mark.parametrize("dtype", DTYPES)
def test_residual_reference_matches_decomposition(dtype):
    residual, y, gate, shift, scale = modulation_inputs((2, 7, 33), dtype)
    h, out = adaln_residual.reference(residual, y, gate, shift, scale, 1e-6)
    assert h.dtype == out.dtype == dtype
    h64 = residual.double() + gate.double()[:, None] * y.double()
    # h: one rounding of the fp32 sum to the output type
    torch.testing.assert_close(h.double(), h64, **ulp_tol(dtype))
    # out: exactly adaln_modulate of the stored h, which is the unfused computation
    assert torch.equal(out, adaln.reference(h, shift, scale, 1e-6))
    torch.testing.assert_close(out.double(), adaln64(h, shift, scale, 1e-6), **ulp_tol(dtype))


@pytest.mark.parametrize("mode", ["op", "reference"])
def test_residual_public_function_in_each_mode(mode):
    inputs = modulation_inputs((3, 5, 16), torch.float32, seed=1)
    with lowering(mode):
        h, out = adaln_modulate_residual(*inputs, 1e-5)
    ref_h, ref_out = adaln_residual.reference(*inputs, 1e-5)
    assert torch.equal(h, ref_h) and torch.equal(out, ref_out)


def test_fake_impls_give_shapes_and_residual_passes_opcheck():
    torch.library.opcheck(
        torch.ops.dit.adaln_modulate_residual.default, (*modulation_inputs((2, 5, 8), torch.float32), 1e-6)
    )
    with torch._subclasses.fake_tensor.FakeTensorMode():
        x, row = torch.empty(3, 4, 16, dtype=torch.float16), torch.empty(3, 16, dtype=torch.float16)
        h, out = torch.ops.dit.adaln_modulate_residual(x, x, row, row, row, 1e-6)
        assert h.shape == out.shape == (3, 4, 16) and h.dtype == out.dtype == torch.float16
        assert torch.ops.dit.adaln_modulate(x, row, row, 1e-6).shape == (3, 4, 16)
        q = torch.empty(2, 3, 17, 32, dtype=torch.bfloat16)
        assert torch.ops.dit.linear_attention(q, q, q, 1e-15).shape == (2, 3, 17, 32)


class _Residual(torch.nn.Module):
    def forward(self, residual, y, gate, shift, scale):
        h, out = adaln_modulate_residual(residual, y, gate, shift, scale, 1e-5)
        return h * 2, out


def test_residual_plugin_lowering_is_one_node_with_two_outputs(tmp_path):
    import onnx

    from ditrt.export.onnx_export import export_onnx

    x, row = ("B", 5, 8), ("B", 8)
    inputs = [TensorSpec(n, "float32", x) for n in ("residual", "y")] + [
        TensorSpec(n, "float32", row) for n in ("gate", "shift", "scale")
    ]
    outputs = [TensorSpec("h2", "float32", x), TensorSpec("out", "float32", x)]
    for name in ("plugin", "portable"):
        export_onnx(_Residual(), inputs, outputs, tmp_path / f"{name}.onnx", name)
    nodes = onnx.load(str(tmp_path / "plugin.onnx")).graph.node
    plugin = [n for n in nodes if n.op_type == adaln_residual.PLUGIN_NAME]
    assert len(plugin) == 1 and len(plugin[0].output) == 2 and plugin[0].domain == "dit"
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in plugin[0].attribute}
    assert (
        attrs["plugin_version"] == adaln_residual.PLUGIN_VERSION.encode()
        and attrs["plugin_namespace"] == b"dit"
    )
    assert {n.domain for n in onnx.load(str(tmp_path / "portable.onnx")).graph.node} <= {"", "ai.onnx"}


def test_cuda_entries_check_inputs_before_anything_else():
    x, shift, scale = modulation_inputs((2, 3, 8), torch.float32)[::2]
    with pytest.raises(InputError, match="scale is torch.float16 but x torch.float32"):
        torch_ops.adaln_modulate_cuda(x, shift, scale.half(), 1e-6)
    with pytest.raises(InputError, match=r"shift must be \(B, D\) = \(2, 8\), got \(2, 9\)"):
        torch_ops.adaln_modulate_cuda(x, torch.zeros(2, 9), scale, 1e-6)
    with pytest.raises(InputError, match="y must have the shape of residual"):
        torch_ops.adaln_modulate_residual_cuda(x, x[:, :2], shift, shift, scale, 1e-6)
    q = torch.randn(1, 2, 3, 4)
    with pytest.raises(InputError, match=r"share one \(B, H, N, d\) shape"):
        torch_ops.linear_attention_cuda(q, q[..., :3], q, 1e-15)


def test_lazy_kernels_warn_once_and_use_the_reference(monkeypatch):
    def unavailable():
        raise KernelUnavailable("nvcc not found: ...")

    monkeypatch.setattr(torch_ops, "load", unavailable)
    torch_ops.library.cache_clear()
    try:
        q, k, v = (torch.randn(1, 2, 5, 8) for _ in range(3))
        with pytest.warns(RuntimeWarning, match="torch reference: nvcc not found") as record:
            out = torch_ops.linear_attention_cuda(q, k, v, 1e-15)
            torch_ops.linear_attention_cuda(q, k, v, 1e-15)
        assert len(record) == 1 and torch.equal(out, la_reference(q, k, v, 1e-15))
    finally:
        torch_ops.library.cache_clear()


def test_register_without_a_gpu_says_so(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(KernelUnavailable, match="no CUDA device") as e:
        torch_ops.register()
    assert "\n" not in str(e.value)


# (b) the nvcc build: errors, cached library, architectures, symbols, PTX.


def test_missing_nvcc_is_one_line_naming_cuda_home_and_path(monkeypatch, tmp_path):
    monkeypatch.delenv("CUDA_HOME", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(KernelUnavailable, match="nvcc not found.*CUDA_HOME.*PATH") as e:
        build()
    assert "\n" not in str(e.value)
    monkeypatch.setenv("CUDA_HOME", str(tmp_path / "cuda"))
    with pytest.raises(KernelUnavailable, match=r"CUDA_HOME=.*cuda has no bin/nvcc") as e:
        emit_ptx("dit_kernels.cu")
    assert "\n" not in str(e.value)


def test_cli_reports_missing_nvcc_in_one_line(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "CUDA_HOME"}
    env["PATH"] = str(tmp_path)
    r = subprocess.run(
        [sys.executable, "-m", "ditrt.export.kernels", "build"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.startswith("error: nvcc not found") and r.stderr.count("\n") == 1


def test_missing_sources_are_named(monkeypatch):
    monkeypatch.setattr(build_mod, "ENTRY", "absent.cu")
    with pytest.raises(KernelUnavailable, match="CUDA kernel sources not found at .*csrc.*pip install -e"):
        build_mod.csrc_dir()


needs_nvcc = pytest.mark.skipif(
    shutil.which("nvcc") is None and not os.environ.get("CUDA_HOME"),
    reason="nvcc not found (no CUDA toolkit on PATH or CUDA_HOME)",
)


@pytest.fixture(scope="module")
def kernel_cache(tmp_path_factory):
    """A private kernel cache for this module: the library is compiled once and shared by the tests below."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DITRT_KERNEL_CACHE", str(tmp_path_factory.mktemp("kernel-cache")))
        yield


@pytest.fixture(scope="module")
def library(kernel_cache) -> Path:
    return build()


@needs_nvcc
@pytest.mark.slow  # `library`'s nvcc build (sm_80, sm_90, PTX): 10-15 s; fast lane: the PTX emitter's nvcc
def test_build_is_cached_and_the_cli_prints_its_path(library):
    mtime = library.stat().st_mtime_ns
    assert build() == library and library.stat().st_mtime_ns == mtime
    assert library.parent.parent == Path(os.environ["DITRT_KERNEL_CACHE"])
    assert not [p for p in library.parent.iterdir() if p != library]  # no temporary files left behind
    r = subprocess.run(
        [sys.executable, "-m", "ditrt.export.kernels", "build"], capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 0 and r.stdout.split()[0] == str(library), r.stderr


def fatbin_entries(lib: Path, tmp: Path) -> set[tuple[str, int]]:
    """(kind, arch) of every image in the library's .nv_fatbin section, read from the fatbin headers:
    container {u32 magic 0xBA55ED50, u16 version, u16 header size, u64 size}, then images
    {u16 kind (1 PTX, 2 ELF), u16, u32 header size, u64 size, ..., u32 arch at offset 28}."""
    blob = tmp / "fatbin.bin"
    subprocess.run(["objcopy", "-O", "binary", "--only-section=.nv_fatbin", str(lib), str(blob)], check=True)
    data, pos, found = blob.read_bytes(), 0, set()
    while pos + 16 <= len(data):
        magic, _, header, size = struct.unpack_from("<IHHQ", data, pos)
        if magic != 0xBA55ED50:
            pos += 8
            continue
        entry, end = pos + header, pos + header + size
        while entry < end:
            kind, _, entry_header, entry_size = struct.unpack_from("<HHIQ", data, entry)
            found.add(({1: "ptx", 2: "elf"}[kind], struct.unpack_from("<I", data, entry + 28)[0]))
            entry += entry_header + entry_size
        pos = end
    return found


def cuobjdump() -> str | None:
    nvcc = build_mod.find_nvcc()
    candidates = [shutil.which("cuobjdump"), str(Path(nvcc).parent / "cuobjdump")]
    return next((c for c in candidates if c and os.access(c, os.X_OK)), None)


@needs_nvcc
@pytest.mark.slow
def test_library_holds_sm80_sm90_and_compute90_ptx(library, tmp_path):
    assert {("elf", 80), ("elf", 90), ("ptx", 90)} <= fatbin_entries(library, tmp_path)
    tool = cuobjdump()
    if tool:  # the toolkit's own view agrees
        listing = subprocess.run(
            [tool, "--list-elf", "--list-ptx", str(library)], capture_output=True, text=True, check=True
        ).stdout
        assert ".sm_80.cubin" in listing and ".sm_90.cubin" in listing and ".sm_90.ptx" in listing


@needs_nvcc
@pytest.mark.slow
def test_library_exports_the_c_abi(library):
    symbols = subprocess.run(
        ["nm", "-D", "--defined-only", str(library)], capture_output=True, text=True, check=True
    ).stdout.split()
    assert set(C_ABI) <= set(symbols)


@needs_nvcc
@pytest.mark.slow
def test_library_loads_and_rejects_bad_sizes_without_a_gpu(library):
    lib = load()
    assert lib.dit_kernels_version().decode().startswith("ditrt-kernels 1 (CUDA ")
    invalid = 1  # cudaErrorInvalidValue: returned before any CUDA call
    assert lib.dit_linear_attention(None, None, None, None, 1, 1, 8, 65, 1e-15, 1, None, 0, None) == invalid
    assert lib.dit_adaln_modulate(None, None, None, None, 1, 1, 1152, 1e-6, 3, None) == invalid
    assert lib.dit_adaln_modulate(None, None, None, None, 1, 1, 8193, 1e-6, 0, None) == invalid
    assert lib.dit_adaln_modulate(None, None, None, None, 0, 5, 1152, 1e-6, 0, None) == 0  # nothing to do
    assert lib.dit_error_string(invalid) != b""


@needs_nvcc
def test_ptx_emitter_names_the_wrapper_entries(kernel_cache):
    ptx = emit_ptx("dit_kernels.cu", "compute_80")
    entries = [line.split()[-1] for line in ptx.splitlines() if ".entry" in line]
    assert ".target sm_80" in ptx
    for name in ENTRIES:
        assert any(name in e for e in entries), name


@needs_nvcc
def test_compile_error_is_one_line_with_nvccs_first_error(tmp_path):
    bad = tmp_path / "bad.cu"
    bad.write_text("__global__ void k() { undeclared_name = 1; }\n")
    with pytest.raises(KernelUnavailable, match=r"nvcc -ptx bad.cu failed: .*error.*undeclared_name") as e:
        emit_ptx(bad)
    assert "\n" not in str(e.value)


# (c) on a GPU: kernels against float64 maths and the references.


@pytest.fixture(scope="module")
def cuda_lib(kernel_cache):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    if shutil.which("nvcc") is None and not os.environ.get("CUDA_HOME"):
        pytest.skip("nvcc not found: the kernels cannot be built here")
    torch_ops.register()
    return load()


ADALN_DIMS = [64, 72, 1152, 1151, 2240, 2304, 3072]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,N", [(1, 1), (2, 7), (3, 256), (2, 1031)])
@pytest.mark.parametrize("D", ADALN_DIMS)
def test_adaln_kernel_matches_float64_and_reference(cuda_lib, dtype, B, N, D):
    x, _, _, shift, scale = modulation_inputs((B, N, D), dtype, "cuda", seed=D + N)
    out = torch.ops.dit.adaln_modulate(x, shift, scale, 1e-6)
    torch.testing.assert_close(out.double(), adaln64(x, shift, scale, 1e-6), **ulp_tol(dtype))
    torch.testing.assert_close(out, adaln.reference(x, shift, scale, 1e-6), **ulp_tol(dtype))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,N", [(1, 1), (3, 256), (2, 1031)])
@pytest.mark.parametrize("D", ADALN_DIMS)
def test_adaln_residual_kernel_matches_reference(cuda_lib, dtype, B, N, D):
    inputs = modulation_inputs((B, N, D), dtype, "cuda", seed=D)
    h, out = torch.ops.dit.adaln_modulate_residual(*inputs, 1e-6)
    ref_h, _ = adaln_residual.reference(*inputs, 1e-6)
    assert torch.equal(h, ref_h)  # fp32 multiply, then add, then one rounding: as torch does it
    torch.testing.assert_close(out.double(), adaln64(h, *inputs[3:], 1e-6), **ulp_tol(dtype))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_adaln_unaligned_noncontiguous_and_constant_rows(cuda_lib, dtype):
    B, N, D = 2, 33, 1152
    x, _, _, shift, scale = modulation_inputs((B, N, D), dtype, "cuda")
    flat = torch.empty(B * N * D + 1, dtype=dtype, device="cuda")
    unaligned = flat[1:].view(B, N, D).copy_(x)  # data pointer off 16-byte alignment: the scalar path
    strided = torch.empty(B, D, N, dtype=dtype, device="cuda").copy_(x.transpose(1, 2)).transpose(1, 2)
    exact = adaln64(x, shift, scale, 1e-6)
    for variant in (unaligned, strided):
        torch.testing.assert_close(
            torch.ops.dit.adaln_modulate(variant, shift, scale, 1e-6).double(), exact, **ulp_tol(dtype)
        )
    zeros = torch.zeros(B, N, D, dtype=dtype, device="cuda")  # variance 0: LN gives 0, out is shift, not NaN
    out = torch.ops.dit.adaln_modulate(zeros + 3, shift, scale, 1e-6)
    assert torch.equal(out, shift[:, None].expand_as(out))


@pytest.mark.gpu
def test_adaln_beyond_the_kernel_limit_uses_the_reference(cuda_lib):
    x, _, _, shift, scale = modulation_inputs((1, 3, 8200), torch.float32, "cuda")
    torch.testing.assert_close(
        torch.ops.dit.adaln_modulate(x, shift, scale, 1e-6),
        adaln.reference(x, shift, scale, 1e-6),
        rtol=0,
        atol=0,
    )


def la_inputs(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g).to(device="cuda", dtype=dtype) for _ in range(3)]


def la_tol(dtype, exact):
    """fp32 sums over N tokens stay within ~1e-6 of the output scale (emulated for N = 16384); allow 1e-5 of it,
    plus 2 ulps of the output type for the final rounding."""
    rtol = ulp_tol(dtype)["rtol"]
    return dict(rtol=rtol, atol=1e-5 * exact.abs().max().item())


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", [8, 32, 33, 64])
@pytest.mark.parametrize("N", [1, 17, 1024, 16384])
def test_linear_attention_kernel_matches_float64(cuda_lib, dtype, d, N):
    q, k, v = la_inputs((2, 3, N, d), dtype, seed=d + N)
    out = torch.ops.dit.linear_attention(q, k, v, 1e-15)
    exact = linear_attention64(q, k, v)
    torch.testing.assert_close(out.double(), exact, **la_tol(dtype, exact))
    torch.testing.assert_close(out, la_reference(q, k, v, 1e-15), **la_tol(dtype, exact))


def call_linear_attention(lib, q, k, v, workspace: torch.Tensor | None):
    out = torch.empty_like(q)
    B, H, N, d = q.shape
    size = 0 if workspace is None else workspace.numel()
    code = lib.dit_linear_attention(
        q.data_ptr(),
        k.data_ptr(),
        v.data_ptr(),
        out.data_ptr(),
        B,
        H,
        N,
        d,
        1e-15,
        torch_ops.DTYPES[q.dtype],
        None if workspace is None else workspace.data_ptr(),
        size,
        torch.cuda.current_stream().cuda_stream,
    )
    assert code == 0, lib.dit_error_string(code)
    return out


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_linear_attention_single_kernel_and_split_paths_agree(cuda_lib, dtype):
    q, k, v = la_inputs((1, 2, 16384, 32), dtype)  # few heads, many tokens: the split path is chosen
    need = cuda_lib.dit_linear_attention_workspace_size(1, 2, 16384, 32)
    assert need > 0
    single = call_linear_attention(cuda_lib, q, k, v, None)
    split = call_linear_attention(cuda_lib, q, k, v, torch.empty(need, dtype=torch.uint8, device="cuda"))
    exact = linear_attention64(q, k, v)
    for out in (single, split):
        torch.testing.assert_close(out.double(), exact, **la_tol(dtype, exact))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_linear_attention_zero_and_noncontiguous(cuda_lib, dtype):
    q, k, v = la_inputs((2, 4, 300, 32), dtype)
    neg = -q.abs() - 1  # relu gives 0 everywhere: 0 / eps = 0, never NaN
    assert torch.equal(torch.ops.dit.linear_attention(neg, k, v, 1e-15), torch.zeros_like(q))
    assert torch.equal(torch.ops.dit.linear_attention(q, neg, v, 1e-15), torch.zeros_like(q))
    t = [
        x.transpose(1, 2).contiguous().transpose(1, 2) for x in (q, k, v)
    ]  # (B, N, H, d) memory, as from a view
    assert torch.equal(
        torch.ops.dit.linear_attention(*t, 1e-15), torch.ops.dit.linear_attention(q, k, v, 1e-15)
    )


@pytest.mark.gpu
def test_model_calls_dispatch_to_the_kernels(cuda_lib):
    assert torch_ops.library() is cuda_lib
    x, y, gate, shift, scale = modulation_inputs((2, 64, 1152), torch.float16, "cuda")
    direct = torch.empty_like(x)
    code = cuda_lib.dit_adaln_modulate(
        x.data_ptr(),
        shift.data_ptr(),
        scale.data_ptr(),
        direct.data_ptr(),
        2,
        64,
        1152,
        1e-6,
        1,
        torch.cuda.current_stream().cuda_stream,
    )
    assert code == 0
    assert torch.equal(adaln_modulate(x, shift, scale, 1e-6), direct)  # the public wrapper, "op" lowering
    q, k, v = la_inputs((2, 3, 100, 32), torch.bfloat16)
    assert torch.equal(linear_attention(q, k, v), call_linear_attention(cuda_lib, q, k, v, None))
    h, out = adaln_modulate_residual(x, y, gate, shift, scale, 1e-6)
    assert torch.equal(out, adaln_modulate(h, shift, scale, 1e-6))


@pytest.mark.gpu
def test_cuda_kernels_pass_opcheck(cuda_lib):
    inputs = modulation_inputs((2, 5, 72), torch.float16, "cuda")
    torch.library.opcheck(torch.ops.dit.adaln_modulate.default, (inputs[0], *inputs[3:], 1e-6))
    torch.library.opcheck(torch.ops.dit.adaln_modulate_residual.default, (*inputs, 1e-6))
    torch.library.opcheck(
        torch.ops.dit.linear_attention.default, (*la_inputs((1, 2, 9, 32), torch.bfloat16), 1e-15)
    )


@needs_nvcc
@pytest.mark.slow
def test_kernel_bodies_match_float64_in_a_cpu_simulation(tmp_path):
    """No GPU in CI: the real csrc/ headers compiled for the host, each CUDA thread a std::thread (barriers for
    __syncthreads and shuffles), every dtype, odd widths, unaligned pointers, both linear-attention paths.
    Tolerance per element: fp32 1e-5 relative, fp16/bf16 one ulp of the output type (the accumulation is fp32)."""
    from ditrt.export.kernels.build import find_nvcc

    sim, csrc = Path(__file__).parent / "kernel_sim", Path(__file__).parent.parent / "csrc"
    exe = tmp_path / "kernels_vs_fp64"
    # nvcc -x c++ compiles plain host C++ with the toolkit's headers (cuda_fp16.h, cuda_bf16.h) on the path
    subprocess.run(
        [
            find_nvcc(),
            "-x",
            "c++",
            "-std=c++20",
            "-O2",
            "-Xcompiler",
            "-pthread",
            f"-I{sim}",
            f"-I{csrc}",
            str(sim / "kernels_vs_fp64.cpp"),
            "-o",
            str(exe),
        ],
        check=True,
        timeout=300,
    )
    r = subprocess.run([str(exe)], capture_output=True, text=True, timeout=600)
    lines = r.stdout.splitlines()
    assert r.returncode == 0 and lines[-1] == "fails=0", "\n".join(
        line for line in lines if not line.startswith("ok")
    )
    assert sum(line.startswith("ok") for line in lines) >= 80  # every case ran
