"""Time the digits step engine on ONNX Runtime against the same step in torch eager, in one run.

Also reports the runtime's host overhead per step (the sampler loop's time minus the engine's time) and the loop's
step time with classifier-free guidance off (guidance <= 1: the conditional branch alone).

    python benchmarks/bench_step.py [--engines engines/digits] [--iters 200] [--out benchmarks/results/...]
"""

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from ditrt.export import export_model
from ditrt.export.graphs import StepGraph, sample_inputs, step_io
from ditrt.export.ops import lowering
from ditrt.export.presets import build_preset, get_preset
from ditrt.runtime import Pipeline


def time_ms(fn, iters: int, warmup: int = 10) -> float:
    """Median wall time of fn() in ms after warm-up (CPU: no device sync needed)."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples)


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def bench(engines: Path, iters: int, steps: int, threads: int) -> dict:
    torch.set_num_threads(threads)
    model = build_preset(get_preset("digits"))
    graph = StepGraph(model).eval()
    inputs, _ = step_io(model)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    session = ort.InferenceSession(
        str(engines / "denoiser" / "model.onnx"), opts, providers=["CPUExecutionProvider"]
    )
    pipe = Pipeline.load(engines, threads=threads)
    rows = []
    for B in (1, 8):
        args = sample_inputs(inputs, {"B": B, "n": 2})  # both CFG branches
        feeds = {s.name: a.numpy() for s, a in zip(inputs, args)}
        ort_ms = time_ms(lambda: session.run(None, feeds), iters)
        with torch.no_grad(), lowering("reference"):
            eager_ms = time_ms(lambda: graph(*args), iters)
        with torch.no_grad():
            op_ms = time_ms(lambda: graph(*args), iters)  # through the dit:: custom op dispatcher
        runs = [pipe(class_label=3, seed=0, steps=steps, batch_size=B).timings_ms for _ in range(5)]
        loop = statistics.median(r["denoise_total"] for r in runs) / steps
        engine = statistics.median(r["denoise_engine"] for r in runs) / steps
        cond_only = (
            statistics.median(
                pipe(class_label=3, seed=0, steps=steps, batch_size=B, guidance=1.0).timings_ms[
                    "denoise_total"
                ]
                for _ in range(5)
            )
            / steps
        )
        rows.append(
            {
                "batch": B,
                "ort_step_ms": round(ort_ms, 4),
                "torch_eager_step_ms": round(eager_ms, 4),
                "torch_eager_customop_step_ms": round(op_ms, 4),
                "speedup_vs_eager": round(eager_ms / ort_ms, 2),
                "loop_step_ms": round(loop, 4),
                "engine_step_ms": round(engine, 4),
                "host_overhead_step_ms": round(loop - engine, 4),
                "host_overhead_pct": round(100 * (loop - engine) / loop, 2),
                "loop_step_ms_cfg_off": round(cond_only, 4),
            }
        )
    return {
        "device": f"CPU: {cpu_name()}, {os.cpu_count()} cores",
        "threads": threads,
        "iters": iters,
        "pipeline_steps": steps,
        "versions": {
            "onnxruntime": ort.__version__,
            "torch": torch.__version__,
            "numpy": np.__version__,
            "python": platform.python_version(),
        },
        "rows": rows,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--engines", type=Path, help="digits engine folder (default: export one to a temp folder)"
    )
    ap.add_argument("--iters", type=int, default=200)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--out", type=Path, help="write the results as JSON here")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        engines = args.engines or Path(tmp) / "digits"
        if args.engines is None:
            export_model("digits", engines)
        result = bench(engines, args.iters, args.steps, args.threads)
    print(f"{result['device']}, {result['threads']} threads; median of {args.iters}")
    print(
        f"{'batch':>5} {'ORT ms':>8} {'eager ms':>9} {'eager/ORT':>9} {'loop ms':>8} {'engine ms':>9} {'host ms':>8} "
        f"{'host %':>7} {'no-CFG ms':>9}"
    )
    for r in result["rows"]:
        print(
            f"{r['batch']:>5} {r['ort_step_ms']:>8.3f} {r['torch_eager_step_ms']:>9.3f} {r['speedup_vs_eager']:>9.2f} "
            f"{r['loop_step_ms']:>8.3f} {r['engine_step_ms']:>9.3f} {r['host_overhead_step_ms']:>8.4f} "
            f"{r['host_overhead_pct']:>7.2f} {r['loop_step_ms_cfg_off']:>9.3f}"
        )
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
