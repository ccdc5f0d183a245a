"""Graceful stop on SIGINT/SIGTERM: the loop finishes its current step, saves a checkpoint and exits.

The handler only sets a flag; the loop polls :meth:`StopSignal.requested` once per step. Under torchrun a
signal may reach some ranks only, so the flag is agreed on by all ranks (max-reduce) before anyone acts on it.
A second signal restores the default handler's behaviour (immediate KeyboardInterrupt / termination).
"""
from __future__ import annotations

import logging
import signal
import threading

import torch
import torch.distributed as dist

log = logging.getLogger("s2megatron")


class StopSignal:
    """Install with ``with StopSignal() as stop: ... if stop.requested(): ...``."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, device: torch.device = torch.device("cpu")):
        self.device = device
        self.received = None
        self._previous = {}

    def _handle(self, signum, frame):
        if self.received is not None:  # second signal: give up gracefully stopping
            self.__exit__(None, None, None)
            signal.raise_signal(signum)
            return
        self.received = signal.Signals(signum).name
        log.warning(f"{self.received} received: finishing the current step, then saving a checkpoint and exiting "
                    "(send it again to stop at once)")

    def __enter__(self) -> "StopSignal":
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}
        return False

    def requested(self) -> bool:
        """True on every rank if any rank received a signal (collective when distributed)."""
        flag = self.received is not None
        if dist.is_initialized() and dist.get_world_size() > 1:
            t = torch.tensor([int(flag)], dtype=torch.int32, device=self.device)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            flag = bool(t.item())
        return flag
