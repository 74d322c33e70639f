"""Peak host memory of `dit-export NAME --random-weights --precision P` relative to the exported weight bytes.

    nice -n 10 python benchmarks/bench_export_memory.py --case sana-600m-1024:fp32 \
        --case sana-600m-1024:bf16 [--label after] [--out benchmarks/results/cpu-2core-export-memory.json]

Each case runs twice, each in a fresh subprocess whose peak RSS comes from os.wait4 (ru_maxrss):
  - "load": resolve_source + the precision policy (what build() casts), no ONNX export: weight loading alone;
  - "export": the whole `dit-export` command line.
The ratio is peak RSS / the engine folder's size (sum of its file sizes: ONNX graphs + external weight data).
Results are merged into the JSON file under `label` (e.g. "before" / "after"), keyed by case.

A case is NAME:PRECISION[:OPTION], OPTION one of
  ext       - pass --external-data to dit-export (weights beside the .onnx file even under 2 GB);
  fp32load  - the "load" phase as before lean loading: the denoiser built in fp32, then cast by the policy
              (the "export" phase is then the plain command line).
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

LOAD = """
import sys, inspect
from ditrt.export.source import resolve_source
from ditrt.export.precision import apply_policy
name, precision, old = sys.argv[1], sys.argv[2], sys.argv[3] == "fp32load"
lean = "precision" in inspect.signature(resolve_source).parameters and not old
kw = {"precision": precision} if lean else {}
src = resolve_source(name, True, 0, **kw)
apply_policy(precision, src.model, src.vae, src.text.graph if src.text is not None else None)
"""


def run(cmd: list[str]) -> tuple[float, float]:
    """Run cmd -> (peak RSS in bytes, seconds); raises on failure."""
    start = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    err = p.stderr.read()
    _, status, usage = os.wait4(p.pid, 0)
    p.returncode = os.waitstatus_to_exitcode(status)
    if p.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed ({p.returncode}):\n{err.decode()[-2000:]}")
    return usage.ru_maxrss * 1024, time.perf_counter() - start  # ru_maxrss is in KiB on Linux


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def measure(name: str, precision: str, option: str = "") -> dict:
    load_rss, load_s = run([sys.executable, "-c", LOAD, name, precision, option or "-"])
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "engine"
        extra = ["--external-data"] if option == "ext" else []
        cmd = ["dit-export", name, "--random-weights", "--precision", precision, "-o", str(out), *extra]
        rss, secs = run(cmd)
        weights = folder_bytes(out)
    row = {
        "model": name,
        "precision": precision,
        "option": option,
        "engine_bytes": weights,
        "load_peak_rss_bytes": load_rss,
        "load_ratio": round(load_rss / weights, 3),
        "load_s": round(load_s, 1),
        "export_peak_rss_bytes": rss,
        "export_ratio": round(rss / weights, 3),
        "export_s": round(secs, 1),
    }
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--case", action="append", required=True, help="NAME:PRECISION[:OPTION], e.g. sana-600m-1024:bf16"
    )
    ap.add_argument("--label", default="after")
    ap.add_argument(
        "--out", type=Path, default=Path(__file__).parent / "results" / "cpu-2core-export-memory.json"
    )
    args = ap.parse_args()
    data = json.loads(args.out.read_text()) if args.out.is_file() else {}
    cpu = platform.processor() or platform.machine()
    data["device"] = f"cpu: {os.cpu_count()} cores, {cpu}, no accelerator"
    command = (
        "nice -n 10 python benchmarks/bench_export_memory.py "
        + " ".join(f"--case {c}" for c in args.case)
        + f" --label {args.label}"
    )
    data.setdefault("commands", {}).setdefault(args.label, [])
    data["commands"][args.label] += [command] if command not in data["commands"][args.label] else []
    for case in args.case:
        name, precision, *option = case.split(":")
        data.setdefault(args.label, {})[case] = measure(name, precision, *option)
        args.out.write_text(json.dumps(data, indent=1) + "\n")


if __name__ == "__main__":
    main()
