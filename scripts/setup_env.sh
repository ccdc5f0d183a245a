#!/usr/bin/env bash
# Create (or refresh) the project's virtual environment at .venv/ and install the project into it.
# - Safe to run twice: an up-to-date .venv is left as it is (stamp file keyed on pyproject.toml).
# - Reuses a torch that is already installed system-wide (NGC images): the venv then sees system packages.
# - On a machine without a GPU, takes the CPU build of torch (torch 2.13.0) instead of a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=.venv
STAMP="$VENV/.s2megatron-installed"
want=$(cat pyproject.toml scripts/setup_env.sh | sha256sum | cut -c1-16)

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ] && "$VENV/bin/python" -c "import s2megatron, torch, megatron.core" 2>/dev/null; then
    exit 0
fi

have_system_torch=0
if "$PYTHON" -c "import torch" 2>/dev/null; then have_system_torch=1; fi

if [ ! -x "$VENV/bin/python" ]; then
    if [ "$have_system_torch" = 1 ]; then
        echo "setup: reusing the installed torch $("$PYTHON" -c 'import torch; print(torch.__version__)')" >&2
        "$PYTHON" -m venv --system-site-packages "$VENV"
    else
        "$PYTHON" -m venv "$VENV"
    fi
fi
PIP=("$VENV/bin/python" -m pip install --disable-pip-version-check -q)

if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
        "${PIP[@]}" "torch>=2.6"
    else
        # CPU-only machine: the CPU build (torch 2.13.0 pins triton 3.7.1 on GPU; keep the same triton here)
        "${PIP[@]}" torch==2.13.0 triton==3.7.1
    fi
fi
# Install the project without letting pip replace the torch that is there.
torch_version=$("$VENV/bin/python" -c "import torch; print(torch.__version__.split('+')[0])")
constraints=$(mktemp)
trap 'rm -f "$constraints"' EXIT
echo "torch==$torch_version" > "$constraints"
if ! "$VENV/bin/python" -c "import triton" 2>/dev/null; then echo "triton==3.7.1" >> "$constraints"; fi
PIP_CONSTRAINT="$constraints" "${PIP[@]}" -e ".[dev,plot]"
echo "$want" > "$STAMP"
echo "setup: $VENV ready (torch $torch_version)" >&2
