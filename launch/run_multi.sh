#!/usr/bin/env bash
# Train on several nodes with torchrun and c10d rendezvous; run once per node (srun does that under
# SLURM, see launch/slurm.sbatch). Extra arguments are Hydra overrides for train.py.
# shellcheck source-path=SCRIPTDIR
set -euo pipefail

USAGE="usage: bash launch/run_multi.sh [--dry-run] [HYDRA_OVERRIDE ...]

  --dry-run   print this node's torchrun command (shell-quoted) and exit without running it

Environment (SLURM fallback in brackets):
  NNODES       number of nodes               [SLURM_NNODES]
  NODE_RANK    this node's rank, 0..NNODES-1 [SLURM_NODEID]
  MASTER_ADDR  rendezvous host               [first host of SLURM_JOB_NODELIST]
  MASTER_PORT  rendezvous port (default 29500)
  RDZV_ID      rendezvous id                 [SLURM_JOB_ID] (default s2megatron)
  GPUS_PER_NODE (default: detected), TORCHRUN (default: torchrun), and launch/env.sh."

source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
s2_parse_args "$USAGE" "$@"

NNODES="${NNODES:-${SLURM_NNODES:-}}"
NODE_RANK="${NODE_RANK:-${SLURM_NODEID:-}}"
MASTER_PORT="${MASTER_PORT:-29500}"
RDZV_ID="${RDZV_ID:-${SLURM_JOB_ID:-s2megatron}}"

[[ -n $NNODES ]] || s2_die "set NNODES (or run under SLURM, which sets SLURM_NNODES)"
[[ -n $NODE_RANK ]] || s2_die "set NODE_RANK (or run under srun, which sets SLURM_NODEID)"
s2_require_int NNODES "$NNODES" 1
s2_require_int NODE_RANK "$NODE_RANK" 0
((NODE_RANK < NNODES)) || s2_die "NODE_RANK must be in 0..$((NNODES - 1)), got $NODE_RANK"
s2_require_int MASTER_PORT "$MASTER_PORT" 1

if [[ -z ${MASTER_ADDR:-} ]]; then
    [[ -n ${SLURM_JOB_NODELIST:-} ]] \
        || s2_die "set MASTER_ADDR (or run under SLURM, which sets SLURM_JOB_NODELIST)"
    command -v scontrol > /dev/null 2>&1 || s2_die "scontrol not found; set MASTER_ADDR"
    mapfile -t hosts < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
    [[ ${#hosts[@]} -gt 0 && -n ${hosts[0]} ]] \
        || s2_die "scontrol gave no hosts for SLURM_JOB_NODELIST='$SLURM_JOB_NODELIST'; set MASTER_ADDR"
    MASTER_ADDR=${hosts[0]}
fi

GPUS_PER_NODE=$(s2_gpus_per_node)
source "$S2_LAUNCH_DIR/env.sh"

# c10d assigns ranks at rendezvous; --node_rank is passed too so logs and the static backend agree.
s2_torchrun --nnodes="$NNODES" --nproc_per_node="$GPUS_PER_NODE" --node_rank="$NODE_RANK" \
    --rdzv_backend=c10d --rdzv_endpoint="$MASTER_ADDR:$MASTER_PORT" --rdzv_id="$RDZV_ID" \
    "$S2_TRAIN_SCRIPT" "${S2_OVERRIDES[@]}"
