"""Data for S2-Megatron: tokenizer, indexed datasets, built-in corpus, GPT datasets, passkey.

Modules (one job each):
    textio      reading .txt/.jsonl documents
    tokenizer   train_sentencepiece(), S2Tokenizer
    indexed     build_indexed_dataset() -> Megatron .bin/.idx
    corpus      the stdlib-sources corpus
    builtin     ensure_builtin_data(): corpus + tokenizer + dataset, cached
    gpt_data    build_gpt_datasets() (megatron-core GPTDataset/BlendedDataset)
    microbatch  MicroBatchLoader: deterministic, resumable data-parallel micro-batches
    passkey     passkey retrieval samples
    config      cfg.data (Hydra) -> datasets

Names are imported lazily, so ``import s2megatron.data`` does not import megatron-core.
"""

import importlib

_EXPORTS = {
    "train_sentencepiece": "tokenizer",
    "S2Tokenizer": "tokenizer",
    "build_indexed_dataset": "indexed",
    "indexed_dataset_stats": "indexed",
    "write_stdlib_corpus": "corpus",
    "BuiltinData": "builtin",
    "ensure_builtin_data": "builtin",
    "ensure_builtin_data_distributed": "builtin",
    "build_gpt_datasets": "gpt_data",
    "parse_blend": "gpt_data",
    "MicroBatchLoader": "microbatch",
    "PasskeySample": "passkey",
    "make_passkey_sample": "passkey",
    "write_passkey_jsonl": "passkey",
    "resolve_data_config": "config",
    "build_data_from_config": "config",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        module = importlib.import_module(f"{__name__}.{_EXPORTS[name]}")
        return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
