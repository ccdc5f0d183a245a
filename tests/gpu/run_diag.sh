#!/usr/bin/env bash
# Temporary diagnostic call: failing tests with tracebacks, the full suite (parallel), config sweep.
OUT=${OUT:-/tmp/s2out}; mkdir -p "$OUT"; export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name --format=csv,noheader
timeout 100 python3 tests/gpu/diag_small_blocks.py 2>&1 | tail -40
timeout 60 python3 -m pytest -q -p no:cacheprovider --tb=short tests/gpu/test_triton_s2_gpu.py -k cuda_graph 2>&1 | grep -v "^$" | tail -30
timeout 220 python3 -m pytest -q -n 6 -p no:cacheprovider --tb=line --durations=10 tests/gpu/test_triton_s2_gpu.py tests/test_triton_s2.py >"$OUT/tests.log" 2>&1; echo "pytest rc=$?"
grep -E "^(FAILED|ERROR)|passed|failed|^/|s call" "$OUT/tests.log" | tail -30
timeout 180 python3 bench/attention.py --sweep-configs --only-sweep --skip-baselines --out "$OUT" 2>&1 | grep config | cut -c1-200
