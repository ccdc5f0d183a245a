"""Learning-rate schedule: linear warmup, then cosine (or linear/constant) decay to ``min_lr``.

The rate is a pure function of the step index, so resuming needs only the step count. Step ``s`` (0-based,
the step about to be taken) uses ``lr_at(s)``: warmup ``lr * (s + 1) / warmup_steps`` for ``s < warmup_steps``
(the first step already learns), then decay over ``[warmup_steps, decay_steps]``, ``min_lr`` afterwards.
"""
from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class LRSchedule:
    lr: float
    min_lr: float
    warmup_steps: int
    decay_steps: int
    decay_style: str = "cosine"   # cosine | linear | constant
    weight_decay: float = 0.0

    def lr_at(self, step: int, max_lr: float = None, min_lr: float = None) -> float:
        """Learning rate of 0-based step ``step``; ``max_lr``/``min_lr`` override the peak and floor (per group)."""
        peak = self.lr if max_lr is None else max_lr
        floor = self.min_lr if min_lr is None else min_lr
        if step < self.warmup_steps:
            return peak * (step + 1) / self.warmup_steps
        if self.decay_style == "constant":
            return peak
        span = self.decay_steps - self.warmup_steps
        if span <= 0 or step >= self.decay_steps:
            return floor
        ratio = (step - self.warmup_steps) / span
        coeff = 0.5 * (1.0 + math.cos(math.pi * ratio)) if self.decay_style == "cosine" else 1.0 - ratio
        return floor + coeff * (peak - floor)

    def apply(self, optimizer, step: int) -> float:
        """Set lr and weight decay of every param group of a (megatron) optimizer for ``step``; returns the
        default group's lr. Groups keep megatron's per-group ``max_lr``/``min_lr``/``lr_mult``/``wd_mult``
        (biases and norm weights have ``wd_mult`` 0)."""
        lr = self.lr_at(step)
        for group in optimizer.param_groups:
            group_lr = self.lr_at(step, group.get("max_lr", self.lr), group.get("min_lr", self.min_lr))
            group["lr"] = group_lr * group.get("lr_mult", 1.0)
            group["weight_decay"] = self.weight_decay * group.get("wd_mult", 1.0)
        return lr
