"""GPU parallel equivalence (4 GPUs, NCCL, Triton kernels): runs tests/gpu/parallel_equivalence.py under torchrun.

The log (every loss and error) goes to ``$S2M_GPU_LOG`` when set, else into pytest's tmp dir, with torchrun's own
output beside it (``.out``); ``$S2M_GPU_TIMEOUT_S`` bounds the run (default 900 s). Results of past runs are kept in
tests/gpu/results/.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parent / "parallel_equivalence.py"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 4, reason="needs 4 CUDA GPUs")
def test_tp_pp_sp_layouts_match_tp1_on_gpus(tmp_path):
    log = Path(os.environ.get("S2M_GPU_LOG", tmp_path / "parallel_equivalence.log"))
    env = dict(os.environ, NCCL_NVLS_ENABLE="0", TORCH_SYMM_MEM_DISABLE_MULTICAST="1", CUDA_DEVICE_MAX_CONNECTIONS="1")
    timeout_s = float(os.environ.get("S2M_GPU_TIMEOUT_S", 900))
    with open(log.with_suffix(".out"), "w") as out:  # torchrun's own output, for post-mortems
        proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=4",
                               str(SCRIPT), "--results", str(log)], env=env, stdout=out, stderr=subprocess.STDOUT,
                              timeout=timeout_s)
    text = log.read_text() if log.exists() else ""
    tail = log.with_suffix(".out").read_text()[-4000:]
    assert proc.returncode == 0 and "RESULT: PASS" in text, text + "\n" + tail
