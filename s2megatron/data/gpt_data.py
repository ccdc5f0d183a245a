"""Train/valid GPT datasets from indexed datasets, through megatron-core's dataset builder.

Samples are ``seq_len + 1`` consecutive tokens of the (seeded, shuffled) document stream;
``tokens = text[:-1]``, ``labels = text[1:]``. Documents are concatenated across eod tokens
(no position reset, no eod loss masking) and no attention mask is produced: the model applies
its own causal / S2 sparsity pattern. The last, incomplete sample is padded with the tokenizer's
pad id, and padded label positions get ``loss_mask == 0``.

Blends follow Megatron's list form: ``["0.7", "prefix1", "0.3", "prefix2"]`` (weights are
normalized), or a list of prefixes with no weights (each weighted by its size), or one prefix.
Each prefix is split by document into train/valid/test with ``split`` (e.g. ``"98,2,0"``).

Use :class:`~s2megatron.data.microbatch.MicroBatchLoader` (re-exported here) to iterate.
"""

from __future__ import annotations

import os
from typing import Callable, List, Optional, Sequence, Tuple, Union

from s2megatron.data.dist_utils import single_process_group
from s2megatron.data.microbatch import MicroBatchLoader  # noqa: F401  (public re-export)
from s2megatron.data.tokenizer import S2Tokenizer

__all__ = ["build_gpt_datasets", "parse_blend", "MicroBatchLoader"]

Blend = Tuple[List[str], Optional[List[float]]]


def _as_float(item: str) -> Optional[float]:
    try:
        return float(item)
    except ValueError:
        return None


def parse_blend(data_paths: Union[str, Sequence]) -> Blend:
    """Parse a Megatron blend list into ``(prefixes, weights or None)``.

    Accepts a single prefix (str or one-element list), ``[w1, p1, w2, p2, ...]`` (weights as
    numbers or numeric strings, all > 0) or ``[p1, p2, ...]`` (weights from dataset sizes). A
    one-prefix weighted blend is reduced to the prefix. Every prefix must have ``.bin`` and
    ``.idx`` files.

    Raises:
        ValueError: empty list, odd-length or mixed weight/prefix list, weight <= 0, or a prefix
            without its files (the message names the offending item).
    """
    items = [data_paths] if isinstance(data_paths, (str, os.PathLike)) else list(data_paths)
    items = [os.fspath(i) if isinstance(i, os.PathLike) else str(i) for i in items]
    if not items:
        raise ValueError("data_paths is empty; give a dataset prefix or a blend list")
    as_floats = [_as_float(i) for i in items]
    if all(f is None for f in as_floats):
        prefixes, weights = items, None
    else:
        even_ok = all(f is not None for f in as_floats[0::2])
        odd_ok = all(f is None for f in as_floats[1::2])
        if len(items) % 2 or not (even_ok and odd_ok):
            raise ValueError(
                f"data_paths={items!r} is not a blend list; expected "
                '["weight1", "prefix1", "weight2", "prefix2", ...] or a list of prefixes'
            )
        weights = [float(w) for w in as_floats[0::2]]
        prefixes = items[1::2]
        for w, p in zip(weights, prefixes):
            if not w > 0:
                raise ValueError(f"blend weight {w} of {p!r} must be > 0")
        if len(prefixes) == 1:
            weights = None
    for p in prefixes:
        if not (os.path.isfile(p + ".bin") and os.path.isfile(p + ".idx")):
            raise ValueError(
                f"dataset prefix {p!r} has no {p}.bin/{p}.idx (build it with "
                "data_tools/preprocess_data.py)"
            )
    return prefixes, weights


def _check_split_nonempty(prefixes: List[str], split: str) -> List[float]:
    """Parse ``split``; every split with a positive share must get documents of every prefix.

    (megatron-core loops forever building an index over an empty split.)
    """
    from megatron.core.datasets.blended_megatron_dataset_config import (
        convert_split_vector_to_split_matrix,
        parse_and_normalize_split,
    )
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    try:
        vector = parse_and_normalize_split(split)
    except (AssertionError, ZeroDivisionError, TypeError) as err:
        raise ValueError(f'split={split!r} is not a valid split like "98,2,0"') from err
    if not vector[0] > 0:
        raise ValueError(f"split={split!r} gives the train split no documents")
    matrix = convert_split_vector_to_split_matrix(vector)
    for prefix in prefixes:
        num_docs = IndexedDataset(prefix, mmap=True).sequence_lengths.shape[0]
        for i, name in enumerate(("train", "valid", "test")):
            if matrix[i] is None:
                continue
            beg, end = (int(round(b * float(num_docs))) for b in matrix[i])
            if end <= beg:
                raise ValueError(
                    f"split={split!r} leaves the {name} split of {prefix!r} empty "
                    f"({num_docs} documents); add documents or enlarge the {name} share"
                )
    return vector


def build_gpt_datasets(
    *,
    data_paths: Union[str, Sequence],
    split: str = "98,2,0",
    seq_len: int,
    seed: int,
    tokenizer: Union[S2Tokenizer, str],
    num_train_samples: int,
    num_valid_samples: int,
    cache_dir: Optional[str] = None,
    is_built_on_rank: Optional[Callable[[], bool]] = None,
    mid_level_dataset_surplus: float = 0.005,
):
    """Build the train and valid datasets of a blend.

    Args:
        data_paths: blend list or single prefix (see :func:`parse_blend`).
        split: train/valid/test document shares, e.g. ``"98,2,0"`` (normalized). The test share
            is held out and not built.
        seq_len: tokens per sample (each sample reads ``seq_len + 1`` tokens).
        seed: seed of the document/sample shuffling and blending.
        tokenizer: :class:`S2Tokenizer` or the path of its ``.model``; provides eod/pad and the
            cache identity.
        num_train_samples: samples the train dataset must provide (epochs are repeated as needed).
        num_valid_samples: samples the valid dataset must provide (0: no valid dataset).
        cache_dir: where megatron-core caches its index arrays (``.npy``); default
            ``<dir of first prefix>/index_cache``. Safe to share between runs: names are hashes of
            the full dataset description.
        is_built_on_rank: megatron-core's predicate; default: build on every rank (rank 0 first,
            the others then load the cached indices).
        mid_level_dataset_surplus: extra fraction of samples drawn per blended dataset.

    Returns:
        ``(train_ds, valid_ds)``: megatron-core ``GPTDataset`` (one prefix) or ``BlendedDataset``;
        ``len(train_ds) >= num_train_samples`` (a single prefix gives whole epochs, a blend
        exactly the requested count). ``valid_ds`` is None when the valid share or
        ``num_valid_samples`` is 0.
        Items are dicts of 1-D tensors ``tokens``, ``labels`` (int64), ``loss_mask`` (float32),
        ``position_ids`` (int64), each of length ``seq_len`` (plus ``dataset_id`` for blends).

    Raises:
        ValueError: bad blend, split, sizes or an empty split (message names the value).

    With ``torch.distributed`` initialized, every rank must call this (megatron-core builds on
    rank 0, then the other ranks load the cached indices, so ``cache_dir`` must be visible to
    all ranks). Without a group, the build runs inside a temporary 1-process gloo group
    (megatron-core's blending requires ``get_rank()``).
    """
    from megatron.core.datasets.blended_megatron_dataset_builder import (
        BlendedMegatronDatasetBuilder,
    )
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    for name, value, low in (
        ("seq_len", seq_len, 1),
        ("num_train_samples", num_train_samples, 1),
        ("num_valid_samples", num_valid_samples, 0),
    ):
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise ValueError(f"{name}={value!r} must be an int >= {low}")
    if not isinstance(seed, int):
        raise ValueError(f"seed={seed!r} must be an int")
    if isinstance(tokenizer, (str, os.PathLike)):
        tokenizer = S2Tokenizer(tokenizer)
    for attr in ("vocab_size", "eod", "pad", "unique_identifiers"):
        if not hasattr(tokenizer, attr):
            raise ValueError(f"tokenizer {tokenizer!r} lacks attribute {attr!r}")

    prefixes, weights = parse_blend(data_paths)
    split = str(split)
    vector = _check_split_nonempty(prefixes, split)
    if cache_dir is None:
        cache_dir = os.path.join(os.path.dirname(os.path.abspath(prefixes[0])), "index_cache")
    # Megatron needs a size for every split with a share; the test split is never used.
    sizes = [num_train_samples, num_valid_samples, 0]

    config = GPTDatasetConfig(
        random_seed=seed,
        sequence_length=seq_len,
        blend=(prefixes, weights),
        split=split,
        tokenizer=tokenizer,
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        create_attention_mask=False,
        path_to_cache=os.fspath(cache_dir),
        mid_level_dataset_surplus=mid_level_dataset_surplus,
    )
    with single_process_group():
        train_ds, valid_ds, _ = BlendedMegatronDatasetBuilder(
            GPTDataset, sizes, is_built_on_rank or (lambda: True), config
        ).build()
    if vector[1] == 0 or num_valid_samples == 0:
        valid_ds = None
    return train_ds, valid_ds
