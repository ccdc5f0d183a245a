"""CPU compatibility layer: lets megatron-core run on a machine without CUDA (gloo, CPU tensors).

megatron-core calls CUDA unconditionally in many places (``device=torch.cuda.current_device()`` allocations,
``device="cuda"`` literals in the pipeline schedules and the optimizer, ``torch.cuda.synchronize()`` around p2p
and checkpoint saves, the CUDA RNG tracker, ``param.type() == 'torch.cuda.FloatTensor'`` checks). This module is
the one place that redirects those calls to the CPU, so that tensor/pipeline/sequence parallelism, DDP, the
distributed optimizer and dist_checkpointing run over gloo in CI. Every patch names the megatron call it serves.

:func:`install_cpu_compat` is a no-op when CUDA is available; nothing here runs on a GPU machine. It is
process-wide and idempotent; call it after ``torch.distributed.init_process_group`` and before megatron builds
anything (:func:`s2megatron.model.initialize_parallel` does).
"""
from __future__ import annotations

import contextlib

import torch
from torch.overrides import TorchFunctionMode

_INSTALLED = False
_MODE = None
_CPU = torch.device("cpu")


def _is_cuda(device) -> bool:
    if isinstance(device, str):
        return device.startswith("cuda")
    if isinstance(device, torch.device):
        return device.type == "cuda"
    # A bare int device index means a CUDA device (CPU has no index).
    return isinstance(device, int) and not isinstance(device, bool)


class _DummyStream:
    """Stands in for ``torch.cuda.Stream``: on the CPU every op is synchronous, so waits are no-ops."""

    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, stream):
        pass

    def wait_event(self, event):
        pass

    def record_event(self, event=None):
        return event if event is not None else _DummyEvent()

    def synchronize(self):
        pass

    def query(self):
        return True


class _DummyEvent:
    """Stands in for ``torch.cuda.Event`` (timers and stream ordering; synchronous on the CPU)."""

    def __init__(self, *args, **kwargs):
        pass

    def record(self, stream=None):
        pass

    def wait(self, stream=None):
        pass

    def synchronize(self):
        pass

    def query(self):
        return True

    def elapsed_time(self, other):
        return 0.0


class _CudaToCpuMode(TorchFunctionMode):
    """Rewrites CUDA device requests to the CPU for every torch call on this thread.

    Serves the ``device="cuda"`` literals megatron-core allocates with: ``total_num_tokens`` in every pipeline
    schedule (``schedules.py``), ``found_inf``/``_scale`` in the optimizers (``optimizer.py``,
    ``grad_scaler.py``), grad-norm buffers (``clip_grads.py``), and ``.cuda()`` calls on tensors
    (``rotary_pos_embedding``/``rope_utils``, optimizer state loading). It also answers ``Tensor.type()`` with
    the CUDA type name (``torch.cuda.FloatTensor``, ...) because ``clip_grads.py`` and ``optimizer.py`` /
    ``distrib_optimizer.py`` assert that gradients and parameters are CUDA tensors by comparing those names.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.cuda:  # x.cuda() -> x (already on the only device)
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = func(*args)
            return name.replace("torch.", "torch.cuda.", 1) if args[0].device.type == "cpu" else name
        if "device" in kwargs and _is_cuda(kwargs["device"]):
            kwargs = dict(kwargs, device=_CPU)
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda(args[1]):  # x.to("cuda") / x.to(0)
            args = (args[0], _CPU) + tuple(args[2:])
        return func(*args, **kwargs)


def _empty_rng_state(*args, **kwargs) -> torch.Tensor:
    return torch.empty(0, dtype=torch.uint8)


def install_cpu_compat() -> bool:
    """Make megatron-core's CUDA calls work on the CPU. No-op (returns False) when CUDA is available.

    Returns True when the layer is active. Safe to call more than once. The function mode that rewrites
    ``device="cuda"`` is pushed on the calling thread's mode stack (run megatron from that thread, as
    torchrun/spawn workers do).
    """
    global _INSTALLED, _MODE
    if torch.cuda.is_available():
        return False
    if _INSTALLED:
        return True

    # ``device=torch.cuda.current_device()``: ~50 allocation sites (tensor_parallel mappings and layers,
    # p2p_communication, param_and_grad_buffer, GlobalMemoryBuffer, dist_checkpointing's save flags).
    torch.cuda.current_device = lambda: _CPU
    # ``torch.cuda.synchronize()``: p2p_communication (batched p2p, variable shapes), dist_checkpointing
    # (filesystem_async preload, fully_parallel), DDP buffer (re)allocation.
    torch.cuda.synchronize = lambda device=None: None
    # Streams/events: DDP's communication stream and ``current_stream().wait_event`` (param_and_grad_buffer in
    # mcore 0.19), pipeline timers. Work on the CPU is synchronous, so waiting is a no-op.
    torch.cuda.current_stream = lambda device=None: _DummyStream()
    torch.cuda.default_stream = lambda device=None: _DummyStream()
    torch.cuda.Stream = _DummyStream
    torch.cuda.Event = _DummyEvent
    torch.cuda.stream = lambda stream=None: contextlib.nullcontext()
    # CUDA RNG state: tensor_parallel.random.CheckpointFunction (activation recompute) saves and restores it
    # around the recomputed forward. There is no CUDA generator; the CPU generator is saved by the same code.
    torch.cuda.get_rng_state = _empty_rng_state
    torch.cuda.random.get_rng_state = _empty_rng_state
    from megatron.core.tensor_parallel import random as mcore_random
    mcore_random._set_cuda_rng_state = lambda *args, **kwargs: None
    # torch.cuda.empty_cache: DDP.free_overlap_buffers and the optimizer's offload paths.
    torch.cuda.empty_cache = lambda: None

    _MODE = _CudaToCpuMode()
    _MODE.__enter__()  # stays pushed for the life of the process (this thread)
    _INSTALLED = True
    return True


def cpu_compat_active() -> bool:
    """True when :func:`install_cpu_compat` has patched this process."""
    return _INSTALLED
