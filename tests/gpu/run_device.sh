#!/usr/bin/env bash
# One device call: GPU tests, the memcheck pass over the short sweep, then the benchmark.
# Usage (repo root, on the GPU machine): bash tests/gpu/run_device.sh "<bench args>" [test_timeout_s] [bench_timeout_s]
set -u
OUT=${OUT:-/tmp/s2out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
BENCH_ARGS=${1:-"--quick"}; T_TEST=${2:-300}; T_BENCH=${3:-300}
nvidia-smi --query-gpu=name,clocks.max.sm,power.limit --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
timeout "$T_TEST" python3 -m pytest -q -p no:cacheprovider --tb=short tests/gpu tests/test_triton_s2.py \
    >"$OUT/gpu_tests.log" 2>&1; echo "pytest rc=$?"
grep -E "^(FAILED|ERROR)|passed|failed" "$OUT/gpu_tests.log" | tail -25
SAN=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -1)
timeout 200 "$SAN" --tool memcheck --error-exitcode 9 python3 -m pytest -q -p no:cacheprovider tests/gpu -k short \
    >"$OUT/memcheck.log" 2>&1; echo "memcheck rc=$?"
grep -E "ERROR SUMMARY|passed|failed|Invalid" "$OUT/memcheck.log" | head -8
timeout "$T_BENCH" python3 bench/attention.py --out "$OUT" $BENCH_ARGS 2>&1 | tee "$OUT/bench.log" | tail -60
