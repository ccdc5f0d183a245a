"""Where a Triton kernel runs: compiled on CUDA, or on the CPU under Triton's interpreter.

Triton picks the interpreter when a kernel is decorated (``TRITON_INTERPRET=1`` at import), so whether CPU tensors
can run a module's kernels is a property of the decorated kernel object, read here in one place.
"""
from __future__ import annotations

import torch


def decorated_for_interpreter(kernel) -> bool:
    """``kernel`` was decorated for Triton's CPU interpreter (``TRITON_INTERPRET=1`` when its module was imported)."""
    return type(kernel).__name__ == "InterpretedFunction"


def runs_triton(kernel, x: torch.Tensor) -> bool:
    """``x`` can go through ``kernel``: it is on CUDA, or on the CPU with the kernel under the interpreter."""
    return x.is_cuda or (x.device.type == "cpu" and decorated_for_interpreter(kernel))


def launch(kernel, grid, device: torch.device, args, meta, num_warps: int) -> None:
    """``kernel[grid](*args, **meta)`` on ``device``: on CUDA with ``num_warps`` and that device current (Triton
    launches on the current device), on the CPU under the interpreter (which takes no launch options)."""
    if device.type == "cuda":
        with torch.cuda.device(device):
            kernel[grid](*args, **meta, num_warps=num_warps)
    else:
        kernel[grid](*args, **meta)
