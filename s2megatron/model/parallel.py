"""Model-parallel setup: megatron-core's process groups and RNG seeds (GPU with NCCL, or CPU with gloo)."""
from __future__ import annotations

import random
from typing import Optional

import torch

from .cpu_compat import install_cpu_compat


def initialize_parallel(tp: int = 1, pp: int = 1, vpp: Optional[int] = None, *, seed: int = 1234) -> None:
    """Create megatron's tensor/pipeline/data-parallel groups and seed the RNGs.

    Call after ``torch.distributed.init_process_group`` (and, on GPUs, ``torch.cuda.set_device``). Without CUDA
    it first installs the CPU compatibility layer and uses megatron's no-op RNG tracker (there is no CUDA
    generator to fork; dropout draws from the CPU generator). The CPU generator is seeded identically on every
    rank, so ``use_cpu_initialization`` gives TP-invariant weights. Raises ValueError for sizes that do not
    divide the world, RuntimeError when torch.distributed is not initialised.
    """
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        raise RuntimeError("initialize_parallel needs torch.distributed.init_process_group to be called first")
    world = torch.distributed.get_world_size()
    for name, value in (("tp", tp), ("pp", pp)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}={value!r} is invalid; valid: an integer >= 1")
    if world % (tp * pp):
        raise ValueError(f"tp * pp = {tp * pp} must divide the world size {world}")
    if vpp is not None and (pp == 1 or vpp < 1):
        raise ValueError(f"vpp={vpp!r} is invalid; valid: None, or >= 1 with pp > 1")
    on_cpu = install_cpu_compat()
    from megatron.core import parallel_state, tensor_parallel
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                                             virtual_pipeline_model_parallel_size=vpp)
    random.seed(seed)
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed, inference_rng_tracker=on_cpu, force_reset_rng=True)


def destroy_parallel() -> None:
    """Drop megatron's model-parallel groups (torch.distributed itself stays initialised)."""
    from megatron.core import parallel_state
    parallel_state.destroy_model_parallel()
