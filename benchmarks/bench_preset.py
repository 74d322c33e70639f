"""Export a real-size built-in architecture (random weights) and time one sampler step: ONNX Runtime vs torch eager.

    python benchmarks/bench_preset.py --preset sana-600m-1024 [--batch 1] [--iters 3] [--out results.json]

Weights over 2 GB go to ONNX external data, as in any export. Warm-up runs are excluded; medians reported.
"""

import argparse
import json
import os
import platform
import resource
import statistics
import tempfile
import time
from pathlib import Path

import onnxruntime as ort
import torch

from ditrt.export import export_model
from ditrt.export.graphs import StepGraph, default_latent_hw, sample_inputs, step_io
from ditrt.export.ops import lowering
from ditrt.export.presets import build_preset, get_preset


def median_ms(fn, iters: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="sana-600m-1024")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    preset = get_preset(args.preset)
    with tempfile.TemporaryDirectory(dir=".") as tmp:
        start = time.perf_counter()
        manifest = export_model(args.preset, Path(tmp) / "engine", random_weights=True, seed=0)
        export_s = time.perf_counter() - start
        model = build_preset(preset, random_weights=True, seed=0)
        hw = preset.latent_hw or default_latent_hw(model)
        graph = StepGraph(model, preset.text_len, hw).eval()
        inputs, _ = step_io(model, preset.text_len, hw)
        tensors = sample_inputs(inputs, {"B": args.batch, "n": 2})  # CFG: both branches
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = args.threads
        start = time.perf_counter()
        session = ort.InferenceSession(
            str(Path(tmp) / "engine" / "denoiser" / "model.onnx"), opts, providers=["CPUExecutionProvider"]
        )
        session_s = time.perf_counter() - start
        feeds = {s.name: t.numpy() for s, t in zip(inputs, tensors)}
        ort_ms = median_ms(lambda: session.run(None, feeds), args.iters)
        with torch.no_grad(), lowering("reference"):
            eager_ms = median_ms(lambda: graph(*tensors), args.iters)
    result = {
        "preset": args.preset,
        "batch": args.batch,
        "cfg_batch": 2 * args.batch,
        "text_len": preset.text_len,
        "latent_hw": list(hw),
        "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 2),
        "onnx_files": {k: v.bytes for k, v in manifest.files.items()},
        "export_s": round(export_s, 1),
        "ort_session_s": round(session_s, 1),
        "ort_step_ms": round(ort_ms, 1),
        "torch_eager_step_ms": round(eager_ms, 1),
        "eager_over_ort": round(eager_ms / ort_ms, 2),
        "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, 1),
        "threads": args.threads,
        "iters": args.iters,
        "device": f"CPU, {os.cpu_count()} cores",
        "versions": {
            "onnxruntime": ort.__version__,
            "torch": torch.__version__,
            "python": platform.python_version(),
        },
    }
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
