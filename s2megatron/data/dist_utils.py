"""Small torch.distributed helpers for the data side (all CPU-safe)."""

from __future__ import annotations

import contextlib
import os
import tempfile
from typing import Iterator


def dist_is_initialized() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def local_rank() -> int:
    """This process's rank on its node (``LOCAL_RANK`` from torchrun), 0 when not launched so."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def barrier() -> None:
    """``torch.distributed.barrier()`` if a process group is initialized, else nothing."""
    if dist_is_initialized():
        import torch.distributed as dist

        dist.barrier()


@contextlib.contextmanager
def single_process_group() -> Iterator[None]:
    """Run the body inside a 1-process gloo group when none is initialized.

    megatron-core's ``BlendedDataset`` calls ``torch.distributed.get_rank()`` unconditionally.
    The group uses a ``FileStore`` in a temporary directory (no TCP port) and is destroyed on
    exit; an already-initialized group is used as-is and left alone.
    """
    if dist_is_initialized():
        yield
        return
    import torch.distributed as dist

    with tempfile.TemporaryDirectory(prefix="s2m-pg-") as tmp:
        store = dist.FileStore(os.path.join(tmp, "store"), 1)
        dist.init_process_group("gloo", store=store, rank=0, world_size=1)
        try:
            yield
        finally:
            dist.destroy_process_group()
