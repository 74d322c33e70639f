"""Time the dit:: CUDA kernels against torch eager and torch.compile of the same references, in one run.

A correctness spot-check comes first. adaln_modulate (and its fused residual form) is reported as achieved GB/s and
its fraction of the GPU's peak HBM bandwidth; linear attention as time and speedup at Sana-1600M shapes, for the
path the torch binding chooses and for the single kernel a TensorRT plugin launches.

    python benchmarks/bench_kernels.py [--iters 100] [--out benchmarks/results/<device>-kernels.json]
    python benchmarks/bench_kernels.py --quick    # tiny shapes, no torch.compile: a compute-sanitizer run
"""

import argparse
import json
import platform
import re
import statistics
import subprocess
import sys
from pathlib import Path

import torch

from ditrt.export.kernels import torch_ops
from ditrt.export.ops import adaln, adaln_residual
from ditrt.export.ops.linear_attention import EPS
from ditrt.export.ops.linear_attention import reference as la_reference

ROOT = Path(__file__).resolve().parent
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# Peak HBM bandwidth (GB/s) by device name, when the driver's clock and bus width cannot be read.
PEAK_GBPS = [
    ("H200", 4800),
    ("H100 PCIe", 2000),
    ("H100 NVL", 3900),
    ("H100", 3350),
    ("A100-SXM4-80GB", 2039),
    ("A100", 1555),
    ("L40S", 864),
    ("L4", 300),
]
EPS_LN = 1e-6


def peak_gbps(props) -> tuple[float | None, str]:
    """memory clock (kHz) x bus width (bits) x 2 (DDR) from the device properties, else the table above."""
    clock, bus = getattr(props, "memory_clock_rate", None), getattr(props, "memory_bus_width", None)
    if clock and bus:
        return clock * 1e3 * bus / 8 * 2 / 1e9, "device properties"
    try:
        from cuda.bindings import runtime as rt

        _, clock = rt.cudaDeviceGetAttribute(
            rt.cudaDeviceAttr.cudaDevAttrMemoryClockRate, torch.cuda.current_device()
        )
        _, bus = rt.cudaDeviceGetAttribute(
            rt.cudaDeviceAttr.cudaDevAttrGlobalMemoryBusWidth, torch.cuda.current_device()
        )
        if clock and bus:
            return clock * 1e3 * bus / 8 * 2 / 1e9, "cuda-python"
    except Exception:  # no cuda-python, or an attribute this CUDA version dropped
        pass
    return next(((gbps, "table") for name, gbps in PEAK_GBPS if name in props.name), (None, "unknown"))


def driver_version() -> str:
    try:
        return (
            subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=30,
            )
            .stdout.split("\n")[0]
            .strip()
            or "unknown"
        )
    except OSError:
        return "unknown"


class Timer:
    """Median CUDA-event time of fn() in ms; the L2 cache is flushed before each timed call (the tensors here
    would otherwise fit in it and the bandwidth would be the cache's)."""

    def __init__(self, iters: int, warmup: int):
        self.iters, self.warmup = iters, warmup
        self.flush = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")

    def __call__(self, fn) -> float:
        for _ in range(self.warmup):
            fn()
        times = []
        for _ in range(self.iters):
            self.flush.zero_()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        return statistics.median(times)


def modulation(B, N, D, dtype, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    r, y = (torch.randn(B, N, D, generator=g, device="cuda").to(dtype) for _ in range(2))
    gate, shift, scale = (0.5 * torch.randn(B, D, generator=g, device="cuda").to(dtype) for _ in range(3))
    return r, y, gate, shift, scale


def qkv(B, H, N, d, dtype, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    return [torch.randn(B, H, N, d, generator=g, device="cuda").to(dtype) for _ in range(3)]


def spot_check(quick: bool) -> None:
    """The kernels against the references before anything is timed; exits non-zero on a mismatch."""
    tol = {torch.float32: (1e-5, 2e-5), torch.float16: (2**-9, 1e-4), torch.bfloat16: (2**-6, 1e-4)}
    for dtype in DTYPES.values():
        rtol, atol = tol[dtype]
        r, y, gate, shift, scale = modulation(2, 7 if quick else 1031, 1151 if quick else 2304, dtype)
        checks = [
            (
                torch.ops.dit.adaln_modulate(r, shift, scale, EPS_LN),
                adaln.reference(r, shift, scale, EPS_LN),
                atol,
            ),
            (
                torch.ops.dit.adaln_modulate_residual(r, y, gate, shift, scale, EPS_LN)[1],
                adaln_residual.reference(r, y, gate, shift, scale, EPS_LN)[1],
                atol,
            ),
        ]
        q, k, v = qkv(1, 2, 300 if quick else 16384, 32, dtype)
        ref = la_reference(q, k, v, EPS)
        checks.append((torch.ops.dit.linear_attention(q, k, v, EPS), ref, 1e-5 * ref.abs().max().item()))
        for got, want, a in checks:
            torch.testing.assert_close(got.float(), want.float(), rtol=rtol, atol=a)
    print("spot-check: kernels match the references", file=sys.stderr)


def compiled(fn, use: bool):
    return torch.compile(fn, dynamic=False) if use else None


def bench_adaln(timer, shapes, peak, use_compile) -> list[dict]:
    rows = []
    for name, dtype in DTYPES.items():
        for B, N, D in shapes:
            r, y, gate, shift, scale = modulation(B, N, D, dtype)
            size = r.element_size()
            for op, inputs, kernel, ref, bytes_ in (
                (
                    "adaln_modulate",
                    (r, shift, scale),
                    torch.ops.dit.adaln_modulate,
                    adaln.reference,
                    (2 * B * N * D + 2 * B * D) * size,
                ),
                (
                    "adaln_modulate_residual",
                    (r, y, gate, shift, scale),
                    torch.ops.dit.adaln_modulate_residual,
                    adaln_residual.reference,
                    (4 * B * N * D + 3 * B * D) * size,
                ),
            ):
                ms = timer(lambda: kernel(*inputs, EPS_LN))
                eager = timer(lambda: ref(*inputs, EPS_LN))
                comp = compiled(ref, use_compile)
                comp_ms = timer(lambda: comp(*inputs, EPS_LN)) if comp else None
                gbps = bytes_ / ms / 1e6
                rows.append(
                    {
                        "op": op,
                        "dtype": name,
                        "B": B,
                        "N": N,
                        "D": D,
                        "kernel_ms": round(ms, 4),
                        "eager_ms": round(eager, 4),
                        "compiled_ms": comp_ms and round(comp_ms, 4),
                        "kernel_gbps": round(gbps, 1),
                        "peak_fraction": peak and round(gbps / peak, 3),
                        "compiled_gbps": comp_ms and round(bytes_ / comp_ms / 1e6, 1),
                        "speedup_vs_eager": round(eager / ms, 2),
                        "speedup_vs_compiled": comp_ms and round(comp_ms / ms, 2),
                    }
                )
                print_row(rows[-1])
    return rows


def single_kernel(lib, q, k, v):
    """The single-kernel path (what a TensorRT plugin launches): the C ABI without workspace."""
    out = torch.empty_like(q)
    B, H, N, d = q.shape
    code = lib.dit_linear_attention(
        q.data_ptr(),
        k.data_ptr(),
        v.data_ptr(),
        out.data_ptr(),
        B,
        H,
        N,
        d,
        EPS,
        torch_ops.DTYPES[q.dtype],
        None,
        0,
        torch.cuda.current_stream().cuda_stream,
    )
    assert code == 0, lib.dit_error_string(code)
    return out


def bench_linear_attention(timer, lib, shapes, use_compile) -> list[dict]:
    rows = []
    for name, dtype in DTYPES.items():
        for B, H, N, d in shapes:
            q, k, v = qkv(B, H, N, d, dtype)
            ms = timer(lambda: torch.ops.dit.linear_attention(q, k, v, EPS))
            single = timer(lambda: single_kernel(lib, q, k, v))
            eager = timer(lambda: la_reference(q, k, v, EPS))
            comp = compiled(la_reference, use_compile)
            comp_ms = timer(lambda: comp(q, k, v, EPS)) if comp else None
            bytes_ = 4 * B * H * N * d * q.element_size()
            flops = 2 * B * H * N * d * (2 * d + 1)  # state and outputs, each ~N·d·(d+1) multiply-adds
            rows.append(
                {
                    "op": "linear_attention",
                    "dtype": name,
                    "B": B,
                    "H": H,
                    "N": N,
                    "d": d,
                    "split": bool(lib.dit_linear_attention_workspace_size(B, H, N, d)),
                    "kernel_ms": round(ms, 4),
                    "single_kernel_ms": round(single, 4),
                    "eager_ms": round(eager, 4),
                    "compiled_ms": comp_ms and round(comp_ms, 4),
                    "kernel_gbps": round(bytes_ / ms / 1e6, 1),
                    "kernel_tflops": round(flops / ms / 1e9, 2),
                    "speedup_vs_eager": round(eager / ms, 2),
                    "speedup_vs_compiled": comp_ms and round(comp_ms / ms, 2),
                }
            )
            print_row(rows[-1])
    return rows


def print_row(r: dict) -> None:
    print("  ".join(f"{k}={v}" for k, v in r.items() if v is not None), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny shapes, 3 iterations, no torch.compile")
    ap.add_argument("--iters", type=int, default=100)
    ap.add_argument("--no-compile", action="store_true", help="leave out torch.compile of the references")
    ap.add_argument("--out", type=Path, help="JSON path (default benchmarks/results/<device>-kernels.json)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("error: no CUDA device: the kernel benchmarks need a GPU")
    torch_ops.register()
    lib = torch_ops.library()
    spot_check(args.quick)
    props = torch.cuda.get_device_properties(0)
    peak, peak_source = peak_gbps(props)
    timer = Timer(3 if args.quick else args.iters, 1 if args.quick else 10)
    use_compile = not (args.quick or args.no_compile)
    # 1024² images: 4096 latent tokens (DiT/PixArt, patch 2) and 16384; Sana-1600M: 70 heads of 32
    adaln_shapes = (
        [(2, 64, 1152), (2, 7, 1151)]
        if args.quick
        else [(2, N, D) for N in (4096, 16384) for D in (1152, 2240, 3072)]
    )
    la_shapes = (
        [(1, 2, 300, 32), (1, 1, 300, 33), (1, 2, 4096, 32)]
        if args.quick
        else [(2, 70, 1024, 32), (2, 70, 16384, 32)]
    )
    result = {
        "device": props.name,
        "sm_count": props.multi_processor_count,
        "driver": driver_version(),
        "cuda_torch": torch.version.cuda,
        "kernels": lib.dit_kernels_version().decode(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "peak_hbm_gbps": peak,
        "peak_source": peak_source,
        "iters": timer.iters,
        "timing": "median of CUDA events, L2 flushed",
        "adaln": bench_adaln(timer, adaln_shapes, peak, use_compile),
        "linear_attention": bench_linear_attention(timer, lib, la_shapes, use_compile),
    }
    if args.quick:
        return
    slug = re.sub(r"[^a-z0-9]+", "-", props.name.lower()).strip("-")
    out = args.out or ROOT / "results" / f"{slug}-kernels.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
