# shellcheck shell=bash
# Environment for NCCL training jobs on H100/A100 clusters. The only place these are set.
#
# Sourced by launch/run_single.sh and launch/run_multi.sh; `source launch/env.sh` also works in an
# interactive shell before copy-pasting a command printed by `--dry-run`. Every value is a default:
# a variable already set in the environment wins (`VAR=... bash launch/run_single.sh ...`).
# No `set -euo pipefail` here: this file is sourced and must not change the caller's shell options.

# Megatron's tensor/sequence-parallel communication overlap relies on the GPU running kernels in the
# order they were issued; one hardware work queue per device guarantees that (Megatron checks it).
: "${CUDA_DEVICE_MAX_CONNECTIONS:=1}"

# NVLink SHARP (NVLS) needs multicast objects from the fabric manager/IMEX, which many containers and
# VMs lack (communicator init then fails); it also reserves extra GPU memory. Set 1 where it works.
: "${NCCL_NVLS_ENABLE:=0}"

# Same multicast requirement for torch's symmetric-memory collectives; keep them off with NVLS.
: "${TORCH_SYMM_MEM_DISABLE_MULTICAST:=1}"

# On a failed or timed-out collective, abort the communicators and end the process, so that torchrun
# and srun see the failure and stop the job instead of hanging until the wall-clock limit.
: "${TORCH_NCCL_ASYNC_ERROR_HANDLING:=1}"

# torchrun would set 1 thread per rank; instead give each local rank its share of this node's cores
# (data loading, tokenization) without oversubscribing them. GPUS_PER_NODE is set by the launchers.
: "${OMP_NUM_THREADS:=$(( $(nproc) / ${GPUS_PER_NODE:-1} > 0 ? $(nproc) / ${GPUS_PER_NODE:-1} : 1 ))}"

export CUDA_DEVICE_MAX_CONNECTIONS NCCL_NVLS_ENABLE TORCH_SYMM_MEM_DISABLE_MULTICAST \
    TORCH_NCCL_ASYNC_ERROR_HANDLING OMP_NUM_THREADS
