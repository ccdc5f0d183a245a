"""Comparing a kernel's result with its float64 reference, and seeded inputs, for the kernel test modules."""
from __future__ import annotations

import torch


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    """max |got - ref| / max |ref| (the reference in float64)."""
    return ((got.double() - ref).abs().max() / ref.abs().max().clamp_min(1e-12)).item()


def gen(seed: int) -> torch.Generator:
    """A CPU generator seeded with ``seed`` (inputs are drawn on the CPU, then moved, so every device sees the same
    values)."""
    return torch.Generator(device="cpu").manual_seed(seed)
