"""Shared set-up for the training-application tests (no tests here).

Configs are composed from conf/ with Hydra's compose API and shrunk to CPU size: the tiny model at 64 tokens with
a sparse S2 layout (block 16, 2 local blocks, stride 2), a 300 kB built-in corpus with a 512-piece tokenizer built
once per test session, one-step logging and nothing else unless a test asks for it.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

REPO = Path(__file__).resolve().parents[1]
CONF_DIR = str(REPO / "conf")

SMALL = [
    "train.seq_len=64", "train.micro_batch=4", "train.global_batch=4", "train.log_interval=1",
    "train.save_interval=0", "train.eval_interval=0", "train.eval_iters=1", "train.save_on_exit=false",
    "sparsity.default.block_size=16", "sparsity.default.local_blocks=2", "sparsity.default.vert_stride=2",
    "optim.lr=3e-3", "optim.min_lr=3e-4", "optim.warmup_steps=2",
    "data.corpus_bytes=300000", "data.vocab_size=512", "data.split='80,20,0'",
    "eval.passkey.enabled=false",
]


def data_cache(base: Path) -> str:
    """One built-in data build per test session (ensure_builtin_data caches and serializes builds)."""
    return str(base / "s2m_builtin_cache")


def compose(overrides: Sequence[str] = (), *, out_dir, cache_dir: str, small: bool = True):
    """The composed config (DictConfig) of ``python train.py <SMALL> <overrides>``."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    base = (SMALL if small else []) + [f"train.out_dir={out_dir}", f"data.cache_dir={cache_dir}"]
    with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
        return hydra_compose("config", overrides=base + list(overrides))


def train(overrides: Sequence[str] = (), *, out_dir, cache_dir: str):
    """Run the loop in this process; returns the TrainResult."""
    from s2megatron.training import run

    return run(compose(overrides, out_dir=out_dir, cache_dir=cache_dir))


def read_metrics(out_dir) -> list:
    import json
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]
