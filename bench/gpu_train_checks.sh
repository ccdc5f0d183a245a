#!/usr/bin/env bash
# Training checks on GPUs, one command each (run from the repository root):
#
#   bash bench/gpu_train_checks.sh 1gpu      # 1.3b preset at 8k tokens on 1 GPU with the Triton S2 kernels, 6 steps
#   bash bench/gpu_train_checks.sh reshard   # 125m at TP2 x PP2 on 4 GPUs: 8 steps uninterrupted; 4 steps + save;
#                                            # resume that checkpoint at TP4 x PP1 to step 8; losses must agree
#   bash bench/gpu_train_checks.sh all       # both (needs 4 GPUs)
#
# Outputs (metrics.jsonl, summary.json, checkpoints, logs) go under $OUT (default outputs/gpu_checks). Each check
# prints PASS/FAIL lines and the script exits non-zero on the first failure. Environment: PYTHON (default
# python3), NCCL defaults from launch/env.sh.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

PY=${PYTHON:-python3}
OUT=${OUT:-outputs/gpu_checks}
export GPUS_PER_NODE=${GPUS_PER_NODE:-4}
# shellcheck source=launch/env.sh
source launch/env.sh
mkdir -p "$OUT"

# Shared settings: short runs, one log line per step, no passkey/validation unless asked.
COMMON=(train.log_interval=1 train.eval_interval=0 train.eval_iters=1 optim.lr=3e-4 optim.min_lr=3e-5
        optim.warmup_steps=2 eval.passkey.enabled=false)

check_1gpu() {
    local dir="$OUT/1.3b_8k"
    rm -rf "$dir"
    "$PY" train.py model=1.3b sparsity=l16v16 attention.backend=triton train.seq_len=8192 train.micro_batch=1 \
        train.global_batch=1 train.steps=6 train.save_interval=0 train.save_on_exit=false "${COMMON[@]}" \
        train.out_dir="$dir" 2>&1 | tee "$OUT/1gpu.log"
    "$PY" - "$dir" <<'EOF'
import json, math, sys
rows = [json.loads(l) for l in open(f"{sys.argv[1]}/metrics.jsonl") if '"kind": "train"' in l]
assert len(rows) == 6 and all(math.isfinite(r["loss"]) for r in rows), rows
print(f"PASS 1gpu: 1.3b @ 8192 tokens, loss {rows[0]['loss']:.3f} -> {rows[-1]['loss']:.3f}, "
      f"{rows[-1]['tokens_per_s']:,.0f} tok/s, MFU {rows[-1]['mfu']:.1%}, max mem {rows[-1]['mem_gib']:.1f} GiB")
EOF
}

check_reshard() {
    local ref="$OUT/125m_tp2pp2_ref" run="$OUT/125m_reshard"
    local args=(model=125m sparsity=l16v16 train.seq_len=2048 train.micro_batch=2 train.global_batch=8
                "${COMMON[@]}")
    rm -rf "$ref" "$run"
    local torchrun=("$PY" -m torch.distributed.run --standalone --nnodes=1 --nproc_per_node=4)
    # uninterrupted reference, TP2 x PP2
    "${torchrun[@]}" train.py "${args[@]}" parallel=tp2pp2 train.steps=8 train.save_interval=0 \
        train.save_on_exit=false train.out_dir="$ref" 2>&1 | tee "$OUT/reshard_ref.log"
    # 4 steps at TP2 x PP2 and save, then resume the same out_dir at TP4 x PP1 up to step 8
    "${torchrun[@]}" train.py "${args[@]}" parallel=tp2pp2 train.steps=4 optim.decay_steps=8 \
        train.out_dir="$run" 2>&1 | tee "$OUT/reshard_save.log"
    "${torchrun[@]}" train.py "${args[@]}" parallel=tp2pp2 parallel.tp=4 parallel.pp=1 train.steps=8 \
        train.out_dir="$run" 2>&1 | tee "$OUT/reshard_resume.log"
    "$PY" - "$ref" "$run" <<'EOF'
import json, sys
def losses(d):
    return {r["step"]: r["loss"] for r in map(json.loads, open(f"{d}/metrics.jsonl")) if r["kind"] == "train"}
ref, run = losses(sys.argv[1]), losses(sys.argv[2])
summary = json.load(open(f"{sys.argv[2]}/summary.json"))
assert (summary["resumed_from"] or "").endswith("iter_0000004"), summary
bad = {s: (ref[s], run[s]) for s in range(1, 9) if abs(run[s] - ref[s]) > 0.02 * abs(ref[s])}  # bf16 tolerance
assert not bad, f"resumed losses differ from the uninterrupted run: {bad}"
print("PASS reshard: TP2xPP2 -> TP4xPP1 resume; step: reference / resharded run")
for s in range(1, 9):
    print(f"  {s}: {ref[s]:.4f} / {run[s]:.4f}")
EOF
}

case "${1:-all}" in
    1gpu) check_1gpu ;;
    reshard) check_reshard ;;
    all) check_1gpu; check_reshard ;;
    *) echo "usage: bash bench/gpu_train_checks.sh [1gpu|reshard|all]" >&2; exit 2 ;;
esac
