"""Deterministic, resumable micro-batches for one data-parallel rank.

Sample order (Megatron's ``MegatronPretrainingSampler`` semantics): the dataset is read in index
order from ``consumed_samples``. Each micro-step takes the next ``micro_batch * dp_size`` global
indices; data-parallel rank ``r`` gets the slice ``[r * micro_batch, (r + 1) * micro_batch)`` of
it. So micro-step ``s`` (counted from the start position ``c0``) gives rank ``r`` the samples

    c0 + s * micro_batch * dp_size + r * micro_batch + i,   i = 0 .. micro_batch - 1,

and ``consumed_samples`` (global, the same on every rank) grows by ``micro_batch * dp_size`` per
micro-batch yielded. A global batch of ``global_batch`` samples is
``global_batch / (micro_batch * dp_size)`` consecutive micro-steps. Saving ``consumed_samples``
with a checkpoint and passing it back on resume reproduces exactly the batches an uninterrupted
run would have seen. The order of the dataset itself (shuffling) is fixed by its seed.

Iteration stops (``StopIteration``) when fewer than ``micro_batch * dp_size`` samples remain.
"""

from __future__ import annotations

import operator
from typing import Dict, Iterator, List, Optional

import torch
from torch.utils.data import DataLoader, Sampler, default_collate

BATCH_KEYS = ("tokens", "labels", "loss_mask", "position_ids")
_OPTIONAL_KEYS = ("attention_mask", "dataset_id")


def _as_int(name: str, value, low: int) -> int:
    """``value`` as a Python int >= ``low`` (numpy/torch integers accepted)."""
    try:
        result = operator.index(value)
    except TypeError:
        raise ValueError(f"{name}={value!r} must be an int >= {low}") from None
    if isinstance(value, bool) or result < low:
        raise ValueError(f"{name}={value!r} must be an int >= {low}")
    return result


class _RankSliceSampler(Sampler[List[int]]):
    """Batch sampler yielding this rank's index slices from ``start`` on."""

    def __init__(self, total: int, start: int, micro_batch: int, dp_rank: int, dp_size: int):
        self.total, self.start = total, start
        self.micro_batch, self.dp_rank, self.dp_size = micro_batch, dp_rank, dp_size

    def __iter__(self) -> Iterator[List[int]]:
        step = self.micro_batch * self.dp_size
        base = self.start
        while base + step <= self.total:
            first = base + self.dp_rank * self.micro_batch
            yield list(range(first, first + self.micro_batch))
            base += step

    def __len__(self) -> int:
        return max(self.total - self.start, 0) // (self.micro_batch * self.dp_size)


def _collate(samples: List[Dict]) -> Dict[str, torch.Tensor]:
    keys = [k for k in BATCH_KEYS + _OPTIONAL_KEYS if k in samples[0]]
    batch = default_collate([{k: s[k] for k in keys} for s in samples])
    for k in ("tokens", "labels", "position_ids"):
        batch[k] = batch[k].long()
    batch["loss_mask"] = batch["loss_mask"].float()
    return batch


class MicroBatchLoader:
    """Iterator of micro-batches for data-parallel rank ``dp_rank`` (see the module docstring).

    Args:
        dataset: map-style dataset whose items are dicts with at least ``tokens``, ``labels``,
            ``loss_mask``, ``position_ids`` (1-D tensors of length seq_len), e.g. a megatron-core
            ``GPTDataset``/``BlendedDataset``.
        micro_batch: samples per micro-batch on this rank (>= 1).
        dp_rank: this rank's index in the data-parallel group, ``0 <= dp_rank < dp_size``.
        dp_size: data-parallel world size (>= 1).
        consumed_samples: global samples consumed before the first micro-batch (resume point),
            ``0 <= consumed_samples <= len(dataset)``.
        num_workers: DataLoader worker processes (0: load in this process).

    Yields:
        dict with ``tokens`` [micro_batch, seq_len] int64, ``labels`` [micro_batch, seq_len]
        int64, ``loss_mask`` [micro_batch, seq_len] float32, ``position_ids`` [micro_batch,
        seq_len] int64; plus ``attention_mask`` / ``dataset_id`` when the dataset provides them.

    Raises:
        ValueError: on an invalid argument (named in the message).
    """

    def __init__(
        self,
        dataset,
        micro_batch: int,
        dp_rank: int = 0,
        dp_size: int = 1,
        consumed_samples: int = 0,
        *,
        num_workers: int = 0,
    ) -> None:
        micro_batch = _as_int("micro_batch", micro_batch, 1)
        dp_size = _as_int("dp_size", dp_size, 1)
        consumed_samples = _as_int("consumed_samples", consumed_samples, 0)
        num_workers = _as_int("num_workers", num_workers, 0)
        dp_rank = _as_int("dp_rank", dp_rank, 0)
        if dp_rank >= dp_size:
            raise ValueError(f"dp_rank={dp_rank} must be in [0, dp_size={dp_size})")
        if dataset is None:
            raise ValueError("dataset is None (was this split built on this rank?)")
        if consumed_samples > len(dataset):
            raise ValueError(
                f"consumed_samples={consumed_samples} exceeds the dataset length {len(dataset)}"
            )
        self.dataset = dataset
        self.micro_batch = micro_batch
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self.num_workers = num_workers
        self._consumed_samples = consumed_samples
        self._iterator: Optional[Iterator] = None

    @property
    def consumed_samples(self) -> int:
        """Global samples consumed so far (start position plus all yielded micro-steps)."""
        return self._consumed_samples

    @property
    def samples_per_step(self) -> int:
        """Global samples per micro-step: ``micro_batch * dp_size``."""
        return self.micro_batch * self.dp_size

    def __len__(self) -> int:
        """Micro-batches left."""
        return max(len(self.dataset) - self._consumed_samples, 0) // self.samples_per_step

    def __iter__(self) -> "MicroBatchLoader":
        return self

    def __next__(self) -> Dict[str, torch.Tensor]:
        if self._iterator is None:
            self._iterator = iter(self._make_loader())
        batch = next(self._iterator)
        self._consumed_samples += self.samples_per_step
        return batch

    def _make_loader(self) -> DataLoader:
        sampler = _RankSliceSampler(
            len(self.dataset), self._consumed_samples, self.micro_batch, self.dp_rank, self.dp_size
        )
        return DataLoader(
            self.dataset,
            batch_sampler=sampler,
            num_workers=self.num_workers,
            collate_fn=_collate,
            persistent_workers=False,
        )

    def state_dict(self) -> Dict[str, int]:
        """``{"consumed_samples": ...}`` for checkpoints."""
        return {"consumed_samples": self._consumed_samples}

    def load_state_dict(self, state: Dict[str, int]) -> None:
        """Restart from ``state["consumed_samples"]`` (discards prefetched batches)."""
        consumed = _as_int("consumed_samples", state["consumed_samples"], 0)
        if consumed > len(self.dataset):
            raise ValueError(
                f"consumed_samples={consumed} exceeds the dataset length {len(self.dataset)}"
            )
        self._consumed_samples = consumed
        self._iterator = None
