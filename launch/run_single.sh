#!/usr/bin/env bash
# Train on the GPUs of one node with torchrun; extra arguments are Hydra overrides for train.py.
# shellcheck source-path=SCRIPTDIR
set -euo pipefail

USAGE="usage: bash launch/run_single.sh [--dry-run] [HYDRA_OVERRIDE ...]

  --dry-run   print the torchrun command (shell-quoted) and exit without running it

Environment: GPUS_PER_NODE (default: detected), TORCHRUN (default: torchrun), and the NCCL/OpenMP
defaults in launch/env.sh.
Example: bash launch/run_single.sh model=125m sparsity=l16v16 train.steps=1000"

source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
s2_parse_args "$USAGE" "$@"

GPUS_PER_NODE=$(s2_gpus_per_node)
source "$S2_LAUNCH_DIR/env.sh"

# --standalone: c10d rendezvous on localhost with a free port, so concurrent runs on one node don't clash.
s2_torchrun --standalone --nnodes=1 --nproc_per_node="$GPUS_PER_NODE" \
    "$S2_TRAIN_SCRIPT" "${S2_OVERRIDES[@]}"
