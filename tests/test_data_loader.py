"""MicroBatchLoader: Megatron sampler semantics, resume, data-parallel slicing."""

import numpy as np
import pytest
import torch

from s2megatron.data.microbatch import MicroBatchLoader

SEQ = 6


class IndexDataset(torch.utils.data.Dataset):
    """Sample ``i`` has tokens filled with ``i`` (so batches reveal their sample indices)."""

    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return {
            "tokens": torch.full((SEQ,), i, dtype=torch.int64),
            "labels": torch.full((SEQ,), i + 1, dtype=torch.int64),
            "loss_mask": torch.ones(SEQ, dtype=torch.float32),
            "position_ids": torch.arange(SEQ, dtype=torch.int64),
        }


def _indices(batch):
    return batch["tokens"][:, 0].tolist()


def test_batch_layout_and_dtypes():
    loader = MicroBatchLoader(IndexDataset(20), micro_batch=3)
    batch = next(loader)
    assert batch["tokens"].shape == (3, SEQ) and batch["tokens"].dtype == torch.int64
    assert batch["labels"].dtype == torch.int64 and batch["position_ids"].dtype == torch.int64
    assert batch["loss_mask"].dtype == torch.float32
    assert _indices(batch) == [0, 1, 2]
    assert loader.consumed_samples == 3


@pytest.mark.parametrize("micro_batch,dp_size", [(1, 1), (2, 3), (4, 2)])
def test_megatron_index_scheme_and_disjoint_ranks(micro_batch, dp_size):
    n, c0 = 53, 4
    step = micro_batch * dp_size
    per_rank = [
        [_indices(b) for b in MicroBatchLoader(IndexDataset(n), micro_batch, r, dp_size, c0)]
        for r in range(dp_size)
    ]
    num_steps = (n - c0) // step
    for r, batches in enumerate(per_rank):
        assert len(batches) == num_steps
        for s, idx in enumerate(batches):
            assert idx == [c0 + s * step + r * micro_batch + i for i in range(micro_batch)]
    flat = [i for batches in per_rank for b in batches for i in b]
    assert len(flat) == len(set(flat)) == num_steps * step
    assert sorted(flat) == list(range(c0, c0 + num_steps * step))


@pytest.mark.parametrize("num_workers", [0, 1])
def test_resume_gives_exactly_the_remaining_batches(num_workers):
    ds, mb, dp = IndexDataset(41), 2, 2
    for rank in range(dp):
        full = MicroBatchLoader(ds, mb, rank, dp, num_workers=num_workers)
        batches, consumed = [], []
        for b in full:
            batches.append(b)
            consumed.append(full.consumed_samples)
        assert consumed == [(k + 1) * mb * dp for k in range(len(batches))]
        for k in (1, 3, len(batches) - 1):
            resumed = MicroBatchLoader(ds, mb, rank, dp, consumed_samples=consumed[k - 1],
                                       num_workers=num_workers)
            rest = list(resumed)
            assert len(rest) == len(batches) - k
            for a, b in zip(rest, batches[k:]):
                for key in a:
                    assert torch.equal(a[key], b[key])
            assert resumed.consumed_samples == full.consumed_samples


def test_state_dict_round_trip_mid_stream():
    ds = IndexDataset(30)
    a = MicroBatchLoader(ds, 2, 1, 2)
    for _ in range(3):
        next(a)
    state = a.state_dict()
    assert state == {"consumed_samples": 12}
    expected = [_indices(b) for b in a]
    b = MicroBatchLoader(ds, 2, 1, 2)
    next(b)
    b.load_state_dict({"consumed_samples": np.int64(12)})
    assert [_indices(x) for x in b] == expected
    assert len(MicroBatchLoader(ds, 2, 0, 2, consumed_samples=12)) == len(expected)


def test_stops_when_a_full_step_no_longer_fits():
    loader = MicroBatchLoader(IndexDataset(10), micro_batch=2, dp_rank=0, dp_size=2)
    assert len(loader) == 2
    assert len(list(loader)) == 2
    with pytest.raises(StopIteration):
        next(loader)
    assert loader.consumed_samples == 8


def test_invalid_arguments():
    ds = IndexDataset(10)
    with pytest.raises(ValueError, match="micro_batch"):
        MicroBatchLoader(ds, 0)
    with pytest.raises(ValueError, match="dp_rank"):
        MicroBatchLoader(ds, 1, dp_rank=2, dp_size=2)
    with pytest.raises(ValueError, match="consumed_samples"):
        MicroBatchLoader(ds, 1, consumed_samples=-1)
    with pytest.raises(ValueError, match="consumed_samples"):
        MicroBatchLoader(ds, 1, consumed_samples=11)
    with pytest.raises(ValueError, match="micro_batch"):
        MicroBatchLoader(ds, 1.5)
    with pytest.raises(ValueError, match="dataset is None"):
        MicroBatchLoader(None, 1)
