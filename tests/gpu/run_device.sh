#!/usr/bin/env bash
# One device call: GPU tests (parallel workers), the memcheck pass over the short sweep, the benchmark with its
# baselines, and an Nsight Compute look at the three kernels (Triton or Hopper, whichever ran).
# Usage (repo root, on the GPU machine): bash tests/gpu/run_device.sh "<bench args>" [test_s] [memcheck_s] [bench_s]
set -u
OUT=${OUT:-/tmp/s2out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
BENCH_ARGS=${1:-""}; T_TEST=${2:-150}; T_SAN=${3:-60}; T_BENCH=${4:-310}
nvidia-smi --query-gpu=name,clocks.max.sm,power.limit --format=csv,noheader
timeout "$T_TEST" python3 -m pytest -q -n 6 -p no:cacheprovider --tb=short tests/gpu/test_triton_s2_gpu.py \
    tests/test_triton_s2.py >"$OUT/gpu_tests.log" 2>&1; echo "pytest rc=$?"
grep -E "^(FAILED|ERROR)|passed|failed" "$OUT/gpu_tests.log" | tail -15
SAN=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -1)
timeout "$T_SAN" "$SAN" --tool memcheck --error-exitcode 9 python3 -m pytest -q -p no:cacheprovider \
    tests/gpu/test_triton_s2_gpu.py -k short >"$OUT/memcheck.log" 2>&1; echo "memcheck rc=$?"
grep -E "ERROR SUMMARY|passed|failed|Invalid" "$OUT/memcheck.log" | head -8
timeout "$T_BENCH" python3 bench/attention.py --out "$OUT" $BENCH_ARGS >"$OUT/bench.log" 2>&1; echo "bench rc=$?"
cat "$OUT"/attention_*.md; grep -E "Error|error" "$OUT/bench.log" | tail -5
NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
timeout 60 "$NCU" --clock-control none --kernel-name regex:"s2_.*_kernel" --launch-skip 3 \
    --launch-count 3 --section SpeedOfLight --section Occupancy --section WarpStateStats \
    python3 bench/attention.py --probe >"$OUT/ncu.txt" 2>&1; echo "ncu rc=$?"
grep -E "s2_.*kernel|Compute \(SM\) Throughput|Memory Throughput|Achieved Occupancy|Registers Per|Warp Cycles Per Issued|Duration" "$OUT/ncu.txt" | head -30
