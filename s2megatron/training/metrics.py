"""Training metrics: the progress line, ``metrics.jsonl`` and TensorBoard, plus MFU and memory.

Only the process that owns the outputs (global rank 0) creates a :class:`MetricsLogger` with files; the
others get one with ``enabled=False`` whose calls do nothing.
"""
from __future__ import annotations

import json
import logging
import math
import os
import time
from typing import Dict, Optional

import torch

log = logging.getLogger("s2megatron")

# Dense peak FLOP/s per GPU (no sparsity), by compute dtype: bf16/fp16 tensor cores and fp32 via TF32.
# Matched against torch.cuda.get_device_name() in order (first substring hit wins).
PEAK_FLOPS = (
    ("H200", {"bf16": 989.4e12, "fp16": 989.4e12, "fp32": 494.7e12}),
    ("H100 PCIe", {"bf16": 756.0e12, "fp16": 756.0e12, "fp32": 378.0e12}),
    ("H100 NVL", {"bf16": 835.5e12, "fp16": 835.5e12, "fp32": 417.8e12}),
    ("H100", {"bf16": 989.4e12, "fp16": 989.4e12, "fp32": 494.7e12}),   # SXM (HBM3)
    ("A100", {"bf16": 312.0e12, "fp16": 312.0e12, "fp32": 156.0e12}),
)


def peak_flops_per_s(device: torch.device, precision: str) -> Optional[float]:
    """Peak dense FLOP/s of one ``device`` for ``precision`` (bf16|fp16|fp32); None on CPU or unknown GPUs."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, peaks in PEAK_FLOPS:
        if key in name:
            return peaks[precision]
    return None


def memory_gib(device: torch.device) -> float:
    """CUDA max allocated memory of ``device`` (GiB), or this process's resident set size on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import psutil
    return psutil.Process().memory_info().rss / 2**30


def format_duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class MetricsLogger:
    """Writes one record per logging step to ``<out_dir>/metrics.jsonl`` (appending, so a resumed run
    continues the file) and ``<out_dir>/tb/``, and prints the progress line.

    ``log_train(step, loss=..., lr=..., grad_norm=..., tokens_per_s=..., mfu=..., mem_gib=...)`` takes any
    scalar keyword; ``None`` values are written as JSON null and skipped in TensorBoard.
    """

    def __init__(self, out_dir: str, *, total_steps: int, enabled: bool = True, tensorboard: bool = True):
        self.total_steps = total_steps
        self.enabled = enabled
        self._jsonl = None
        self._tb = None
        if not enabled:
            return
        os.makedirs(out_dir, exist_ok=True)
        self.path = os.path.join(out_dir, "metrics.jsonl")
        self._jsonl = open(self.path, "a", buffering=1)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            self._tb = SummaryWriter(os.path.join(out_dir, "tb"))

    def _write(self, record: Dict, prefix: str):
        self._jsonl.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for key, value in record.items():
                if key not in ("step", "kind") and isinstance(value, (int, float)) and value is not None \
                        and math.isfinite(value):
                    self._tb.add_scalar(f"{prefix}/{key}", value, record["step"])

    def log_train(self, step: int, *, eta_s: Optional[float] = None, **values):
        if not self.enabled:
            return
        record = {"step": step, "kind": "train", **values, "time": time.time()}
        self._write(record, "train")
        v = values
        mfu = v.get("mfu")
        line = (f"step {step:>{len(str(self.total_steps))}}/{self.total_steps} | loss {v['loss']:.4f} | "
                f"lr {v['lr']:.3e} | grad norm {v['grad_norm']:.3f} | {v['tokens_per_s']:,.0f} tok/s | "
                f"MFU {'n/a' if mfu is None else f'{100 * mfu:.1f}%'} | mem {v['mem_gib']:.2f} GiB"
                + ("" if eta_s is None else f" | ETA {format_duration(eta_s)}"))
        log.info(line)

    def log_eval(self, step: int, **values):
        if not self.enabled:
            return
        self._write({"step": step, "kind": "valid", **values, "time": time.time()}, "valid")
        log.info(f"validation at step {step}: " + " | ".join(
            f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in values.items()))

    def log_scalars(self, step: int, kind: str, **values):
        """Other records (e.g. the passkey summary) in the same file and TensorBoard namespace ``kind``."""
        if not self.enabled:
            return
        self._write({"step": step, "kind": kind, **values, "time": time.time()}, kind)

    def close(self):
        if self._tb is not None:
            self._tb.flush()
            self._tb.close()
            self._tb = None
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
