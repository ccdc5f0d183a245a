"""Process group and device set-up for one launch (torchrun or a plain ``python train.py``)."""
from __future__ import annotations

import datetime
import os
import tempfile
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistEnv:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    owns_group: bool = False   # this call created the process group (and so tears it down)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(timeout_minutes: int = 30) -> DistEnv:
    """Initialize ``torch.distributed`` (NCCL on CUDA, gloo on CPU) from torchrun's environment, or a
    1-process group (file store in a temp dir, no port) for a plain ``python train.py``.

    On CUDA it binds this process to GPU ``LOCAL_RANK``. Reuses an already initialized group.
    """
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if torch.cuda.is_available():
        if local_rank >= torch.cuda.device_count():
            raise RuntimeError(f"LOCAL_RANK={local_rank} but only {torch.cuda.device_count()} GPUs are visible")
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
        backend = "nccl"
    else:
        device = torch.device("cpu")
        backend = "gloo"
    owns_group = not dist.is_initialized()
    if owns_group:
        timeout = datetime.timedelta(minutes=timeout_minutes)
        if "MASTER_ADDR" in os.environ and world_size > 1 or "TORCHELASTIC_RUN_ID" in os.environ:
            dist.init_process_group(backend, rank=rank, world_size=world_size, timeout=timeout,
                                    **({"device_id": device} if backend == "nccl" else {}))
        else:
            if world_size != 1:
                raise RuntimeError(f"WORLD_SIZE={world_size} without MASTER_ADDR: launch with torchrun")
            store_dir = tempfile.mkdtemp(prefix="s2m-pg-")
            store = dist.FileStore(os.path.join(store_dir, "store"), 1)
            dist.init_process_group(backend, store=store, rank=0, world_size=1, timeout=timeout,
                                    **({"device_id": device} if backend == "nccl" else {}))
    return DistEnv(rank=dist.get_rank(), local_rank=local_rank, world_size=dist.get_world_size(), device=device,
                   owns_group=owns_group)


def destroy_distributed(env: DistEnv):
    """Tear down the process group if ``init_distributed`` created it (a caller's group is left alone)."""
    if env.owns_group and dist.is_initialized():
        dist.destroy_process_group()
