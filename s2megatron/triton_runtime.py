"""Where a Triton kernel runs: compiled on CUDA, or on the CPU under Triton's interpreter.

Triton picks the interpreter when a kernel is decorated (``TRITON_INTERPRET=1`` at import), so whether CPU tensors
can run a module's kernels is a property of the decorated kernel object, read here in one place.
"""
from __future__ import annotations

import contextlib

import torch


def decorated_for_interpreter(kernel) -> bool:
    """``kernel`` was decorated for Triton's CPU interpreter (``TRITON_INTERPRET=1`` when its module was imported)."""
    return type(kernel).__name__ == "InterpretedFunction"


def runs_triton(kernel, x: torch.Tensor) -> bool:
    """``x`` can go through ``kernel``: it is on CUDA, or on the CPU with the kernel under the interpreter."""
    return x.is_cuda or (x.device.type == "cpu" and decorated_for_interpreter(kernel))


def on_device(device: torch.device):
    """A context in which Triton launches on ``device``: Triton launches on the current CUDA device, so a CUDA
    device that is not current is made current; a no-op when it already is (the usual case: one device per rank,
    set at start-up), or on the CPU."""
    if device.type == "cuda" and device.index is not None and device.index != torch.cuda.current_device():
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def launch(kernel, grid, device: torch.device, args, meta, num_warps: int) -> None:
    """``kernel[grid](*args, **meta)`` on ``device``: on CUDA with ``num_warps`` and that device current
    (:func:`on_device`), on the CPU under the interpreter (which takes no launch options)."""
    if device.type == "cuda":
        with on_device(device):
            kernel[grid](*args, **meta, num_warps=num_warps)
    else:
        kernel[grid](*args, **meta)
