#!/usr/bin/env bash
# The one prepared script a lent GPU machine runs, in the repository root, within a total deadline (default 570 s):
#   versions -> install -> kernels build -> pytest -m gpu tests/test_kernels.py -> compute-sanitizer memcheck and
#   racecheck on `bench_kernels.py --quick` -> bench_kernels.py -> bench_gpu.py with the time that is left.
# Each stage runs under `timeout`, a failing stage does not stop the next, and the status of every stage is printed
# last. Results go to benchmarks/results/ (as on any machine) and are copied to $OUT (the device tool brings back
# what is written there: at most 8 files): gpu_check.log, stages.txt, the *-kernels.json and *-e2e.json/.md of this
# run, and logs.tar.gz (one log per stage). Exit status 0 when every stage passed.
#
#   bash benchmarks/gpu_check.sh                       # on the device machine (see benchmarks/results/README.md)
#   GPU_CHECK_DEADLINE_S=300 BENCH_GPU_ARGS="--quick" bash benchmarks/gpu_check.sh
#
# Environment: GPU_CHECK_DEADLINE_S (total seconds, default 570), BENCH_GPU_MIN_S (seconds kept for bench_gpu.py
# whatever the earlier stages take, default 240), BENCH_GPU_ARGS (extra bench_gpu.py arguments), OUT (default
# /tmp/gpu_check_out). Wheels in .whl/ (diffusers, which the machine's image lacks) are installed to /tmp/site.
set -u
START=$(date +%s)
DEADLINE=${GPU_CHECK_DEADLINE_S:-570}
BENCH_MIN=${BENCH_GPU_MIN_S:-240}
OUT=${OUT:-/tmp/gpu_check_out}
LOGS=$(mktemp -d /tmp/gpu_check_logs.XXXX)
mkdir -p "$OUT" benchmarks/results
export PYTHONUNBUFFERED=1 DITRT_BENCH_CACHE=${DITRT_BENCH_CACHE:-/tmp/ditrt-bench-cache}
exec > >(tee "$OUT/gpu_check.log") 2>&1
TEE=$!
PY=$(command -v python3 || command -v python)
SANITIZER=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer /opt/nvidia/*/compute-sanitizer \
    2>/dev/null | head -1)
export PY LOGS SANITIZER
STAGES=()
BEFORE=$(mktemp)
touch -d "@$START" "$BEFORE"

left() { echo $((DEADLINE - ($(date +%s) - START))); }
say() { echo "[gpu_check $(date +%H:%M:%S) +$(($(date +%s) - START))s] $*"; }

# stage NAME MAX_SECONDS RESERVE_SECONDS CMD...: run CMD under timeout, min(MAX, time left - RESERVE), logged.
stage() {
    local name=$1 max=$2 reserve=$3
    shift 3
    local limit=$(($(left) - reserve))
    ((limit > max)) && limit=$max
    if ((limit < 10)); then
        STAGES+=("$name|SKIPPED (no time left)|0")
        say "$name: skipped, $(left) s left"
        return
    fi
    say "$name: start (limit ${limit} s): $*"
    local t0=$(date +%s)
    timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$LOGS/$name.log"
    local rc=${PIPESTATUS[0]} status
    case $rc in
        0) status=ok ;;
        124 | 137) status="TIMEOUT after ${limit} s" ;;
        *) status="FAILED (exit $rc)" ;;
    esac
    STAGES+=("$name|$status|$(($(date +%s) - t0))")
    say "$name: $status"
}

do_versions() {
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv || true
    command -v nvcc >/dev/null && nvcc --version | tail -2
    echo "compute-sanitizer: ${SANITIZER:-missing}"
    "$PY" - <<'EOF'
import importlib, platform, torch
print("python", platform.python_version(), "| torch", torch.__version__, "| CUDA", torch.version.cuda,
      "| GPU", torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)
for name in ("triton", "diffusers", "transformers", "onnxruntime", "tensorrt", "ditrt.runtime"):
    try:
        print(f"{name} {importlib.import_module(name).__version__}")
    except Exception as e:
        print(f"{name}: not importable ({type(e).__name__})")
EOF
}

do_install() {
    if compgen -G ".whl/*.whl" >/dev/null; then
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || return 1
    fi
    # the repository as `ditrt`: an editable install, else a path shim (ditrt is a namespace of export/ and runtime/)
    if ! "$PY" -m pip install -q --no-deps --no-build-isolation --no-index -e . ||
        ! (cd /tmp && "$PY" -c "import ditrt.export, ditrt.runtime"); then
        echo "editable install failed: using a path shim"
        mkdir -p /tmp/ditrt-shim/ditrt
        ln -sfn "$PWD/export" /tmp/ditrt-shim/ditrt/export
        ln -sfn "$PWD/runtime" /tmp/ditrt-shim/ditrt/runtime
        echo /tmp/ditrt-shim >"$LOGS/shim"
    fi
}
export -f do_install do_versions  # stages run under timeout, which runs commands, not functions

say "deadline ${DEADLINE} s; bench_gpu.py keeps at least ${BENCH_MIN} s; results to $OUT"
stage install 120 0 bash -c do_install  # always: every later stage needs it
export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
[[ -f $LOGS/shim ]] && export PYTHONPATH="/tmp/ditrt-shim:$PYTHONPATH"
stage versions 60 0 bash -c do_versions
stage kernels-build 180 "$BENCH_MIN" "$PY" -m ditrt.export.kernels build
stage pytest-gpu 180 "$BENCH_MIN" "$PY" -m pytest -m gpu tests/test_kernels.py -q -p no:cacheprovider
# memcheck without the caching allocator, so that an access past a tensor's end is past its allocation
stage memcheck 150 "$BENCH_MIN" env PYTORCH_NO_CUDA_MEMORY_CACHING=1 "${SANITIZER:-compute-sanitizer}" --tool memcheck \
    --error-exitcode 3 --print-limit 50 "$PY" benchmarks/bench_kernels.py --quick
stage racecheck 150 "$BENCH_MIN" "${SANITIZER:-compute-sanitizer}" --tool racecheck --error-exitcode 3 --print-limit 50 \
    "$PY" benchmarks/bench_kernels.py --quick
stage bench-kernels 180 "$BENCH_MIN" "$PY" benchmarks/bench_kernels.py
BUDGET=$(($(left) - 25))
# shellcheck disable=SC2086
stage bench-gpu $((BUDGET + 15)) 5 "$PY" benchmarks/bench_gpu.py --budget-s "$BUDGET" ${BENCH_GPU_ARGS:-}

# results of this run -> $OUT (the kernels and e2e files; at most 8 files come back in all)
for f in benchmarks/results/*-kernels.json benchmarks/results/*-e2e.json benchmarks/results/*-e2e.md; do
    [[ -f $f && $f -nt $BEFORE ]] && cp "$f" "$OUT/"
done
{
    printf '%-14s %-28s %s\n' stage status seconds
    for s in "${STAGES[@]}"; do
        IFS='|' read -r name status secs <<<"$s"
        printf '%-14s %-28s %s\n' "$name" "$status" "$secs"
    done
    echo "total $(($(date +%s) - START)) s of ${DEADLINE} s"
} >"$OUT/stages.txt"
tar -czf "$OUT/logs.tar.gz" -C "$LOGS" . 2>/dev/null
say "files in $OUT: $(ls "$OUT" | tr '\n' ' ')"
cat "$OUT/stages.txt"
! grep -qv -e '^stage' -e '^total' -e ' ok ' "$OUT/stages.txt"
RC=$?
exec >&- 2>&-
wait "$TEE" # the log is complete before the device tool collects $OUT
exit $RC
