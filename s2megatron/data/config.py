"""From the Hydra ``data`` group (``cfg.data``, see conf/data/*.yaml) to datasets.

Typical use in a training script (every rank calls it)::

    tokenizer, train_ds, valid_ds = build_data_from_config(
        cfg.data, seq_len=..., seed=..., num_train_samples=..., num_valid_samples=...)
    loader = MicroBatchLoader(train_ds, micro_batch, dp_rank, dp_size, consumed_samples,
                              num_workers=cfg.data.num_workers)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Tuple

KINDS = ("builtin", "indexed")


@dataclass(frozen=True)
class DataSources:
    """Resolved data settings.

    Attributes:
        data_paths: Megatron blend list (or one prefix in a list).
        tokenizer_model: SentencePiece ``.model`` path.
        split: train/valid/test shares, e.g. ``"98,2,0"``.
        index_cache_dir: megatron-core index cache (None: next to the first dataset).
        num_workers: DataLoader workers for :class:`MicroBatchLoader`.
    """

    data_paths: List[str]
    tokenizer_model: str
    split: str
    index_cache_dir: Optional[str]
    num_workers: int


def _get(cfg, key, default=None):
    value = cfg.get(key, default) if hasattr(cfg, "get") else getattr(cfg, key, default)
    return default if value is None else value


def resolve_data_config(cfg_data) -> DataSources:
    """Resolve ``cfg.data``; for ``kind: builtin`` builds the built-in data on first use.

    Must be called on every rank when ``torch.distributed`` is initialized (the built-in build
    runs on local rank 0 behind a barrier).

    Raises:
        ValueError: unknown ``kind`` or missing ``paths``/``tokenizer_model`` for ``indexed``.
    """
    kind = _get(cfg_data, "kind")
    split = str(_get(cfg_data, "split", "98,2,0"))
    index_cache_dir = _get(cfg_data, "index_cache_dir")
    num_workers = int(_get(cfg_data, "num_workers", 0))
    if kind == "builtin":
        from s2megatron.data.builtin import ensure_builtin_data_distributed
        from s2megatron.data.corpus import DEFAULT_MAX_BYTES

        data = ensure_builtin_data_distributed(
            _get(cfg_data, "cache_dir"),
            int(_get(cfg_data, "vocab_size", 4096)),
            corpus_bytes=int(_get(cfg_data, "corpus_bytes", DEFAULT_MAX_BYTES)),
        )
        return DataSources([data.data_prefix], data.tokenizer_model, split, index_cache_dir,
                           num_workers)
    if kind == "indexed":
        paths = _get(cfg_data, "paths")
        model = _get(cfg_data, "tokenizer_model")
        if not paths or not model:
            raise ValueError(
                f"data.kind=indexed needs data.paths (blend list or prefix) and "
                f"data.tokenizer_model; got paths={paths!r}, tokenizer_model={model!r}"
            )
        paths = [str(paths)] if isinstance(paths, str) else [str(p) for p in paths]
        return DataSources(paths, str(model), split, index_cache_dir, num_workers)
    raise ValueError(f"data.kind={kind!r} is not supported; valid: {KINDS}")


def build_data_from_config(
    cfg_data, *, seq_len: int, seed: int, num_train_samples: int, num_valid_samples: int
) -> Tuple[object, object, object]:
    """``(tokenizer, train_ds, valid_ds)`` from ``cfg.data`` (see :func:`build_gpt_datasets`)."""
    from s2megatron.data.gpt_data import build_gpt_datasets
    from s2megatron.data.tokenizer import S2Tokenizer

    sources = resolve_data_config(cfg_data)
    tokenizer = S2Tokenizer(sources.tokenizer_model)
    train_ds, valid_ds = build_gpt_datasets(
        data_paths=sources.data_paths,
        split=sources.split,
        seq_len=seq_len,
        seed=seed,
        tokenizer=tokenizer,
        num_train_samples=num_train_samples,
        num_valid_samples=num_valid_samples,
        cache_dir=sources.index_cache_dir,
    )
    return tokenizer, train_ds, valid_ds
