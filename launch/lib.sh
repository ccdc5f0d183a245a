# shellcheck shell=bash
# Helpers shared by the launchers (sourced, never run). Environment variables live in launch/env.sh.
# No `set -euo pipefail` here: the sourcing script sets it.

S2_LAUNCH_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
S2_ROOT="${S2_ROOT:-$(dirname "$S2_LAUNCH_DIR")}"
# The training entry point; overridable for wrappers that stage the code elsewhere.
S2_TRAIN_SCRIPT="${S2_TRAIN_SCRIPT:-$S2_ROOT/train.py}"

s2_die() {
    echo "$(basename "$0"): error: $*" >&2
    exit 2
}

# Quote one word exactly as Python's shlex.quote does, so printed commands can be pasted into a shell.
s2_quote() {
    local word=$1
    if [[ -z $word ]]; then
        printf "''"
    elif [[ $word =~ ^[a-zA-Z0-9_@%+=:,./-]+$ ]]; then
        printf '%s' "$word"
    else
        printf "'%s'" "${word//\'/\'\"\'\"\'}"
    fi
}

# Print a command on one line, each word shell-quoted.
s2_print_cmd() {
    local word sep=""
    for word in "$@"; do
        printf '%s' "$sep"
        s2_quote "$word"
        sep=" "
    done
    printf '\n'
}

# With --dry-run print the command on stdout; otherwise echo it on stderr and replace this shell with it
# (signals from srun/torchrun then reach it directly).
s2_run() {
    if [[ $S2_DRY_RUN == 1 ]]; then
        s2_print_cmd "$@"
    else
        printf '+ ' >&2
        s2_print_cmd "$@" >&2
        exec "$@"
    fi
}

# Run (or print) torchrun from TORCHRUN (default: torchrun on PATH) with the given arguments.
s2_torchrun() {
    s2_run "${TORCHRUN:-torchrun}" "$@"
}

s2_require_int() { # name value min
    if ! [[ $2 =~ ^[0-9]+$ ]] || ((10#$2 < $3)); then
        s2_die "$1 must be an integer >= $3, got '$2'"
    fi
}

# Parse the launcher's own leading options; the remaining words are Hydra overrides for train.py.
# Sets S2_DRY_RUN (0|1) and the array S2_OVERRIDES. $1 is the usage text.
s2_parse_args() {
    local usage=$1
    shift
    S2_DRY_RUN=0
    while (($#)); do
        case $1 in
            --dry-run) S2_DRY_RUN=1; shift ;;
            -h | --help) printf '%s\n' "$usage"; exit 0 ;;
            --) shift; break ;;
            *) break ;;
        esac
    done
    S2_OVERRIDES=("$@")
    local word
    for word in "${S2_OVERRIDES[@]}"; do
        case $word in
            -m | --multirun)
                s2_die "Hydra multirun inside torchrun is not supported; sweep with launch/sweep.py" ;;
        esac
    done
}

# GPUs on this node: GPUS_PER_NODE, else CUDA_VISIBLE_DEVICES, else nvidia-smi, else torch.
s2_gpus_per_node() {
    local count=""
    if [[ -n ${GPUS_PER_NODE:-} ]]; then
        s2_require_int GPUS_PER_NODE "$GPUS_PER_NODE" 1
        count=$GPUS_PER_NODE
    elif [[ -n ${CUDA_VISIBLE_DEVICES:-} ]]; then
        local -a visible
        IFS=, read -ra visible <<< "$CUDA_VISIBLE_DEVICES"
        count=${#visible[@]}
    elif command -v nvidia-smi > /dev/null 2>&1 \
        && count=$(nvidia-smi --query-gpu=index --format=csv,noheader 2> /dev/null | grep -c .); then
        :
    else
        count=$("${PYTHON:-python}" -c 'import torch; print(torch.cuda.device_count())' 2> /dev/null) \
            || count=0
    fi
    if ! [[ $count =~ ^[0-9]+$ ]] || ((count == 0)); then
        s2_die "no GPUs found (got '$count'); set GPUS_PER_NODE to the number of GPUs per node"
    fi
    echo "$count"
}
