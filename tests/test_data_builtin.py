"""Built-in data: build on first use, cache, rebuild after an interrupted build, races."""

import json
import multiprocessing
import os
import time

import pytest

from s2megatron.data import builtin
from s2megatron.data.builtin import (
    MARKER_NAME,
    default_cache_dir,
    ensure_builtin_data,
    ensure_builtin_data_distributed,
)
from s2megatron.data.corpus import iter_stdlib_sources, write_stdlib_corpus
from s2megatron.data.indexed import indexed_dataset_stats
from s2megatron.data.tokenizer import S2Tokenizer

SMALL = dict(vocab_size=512, corpus_bytes=300_000, show_progress=False)


@pytest.fixture
def count_builds(monkeypatch, tmp_path):
    """Wrap the real build so every run appends a line to a log (works across fork)."""
    log = tmp_path / "builds.log"
    real = builtin._build

    def counting(*args, **kwargs):
        with open(log, "a") as f:
            f.write(f"{os.getpid()}\n")
        return real(*args, **kwargs)

    monkeypatch.setattr(builtin, "_build", counting)
    return lambda: len(log.read_text().splitlines()) if log.exists() else 0


@pytest.mark.slow
def test_builds_caches_and_rebuilds_without_marker(tmp_path, count_builds):
    cache = tmp_path / "cache"
    data = ensure_builtin_data(str(cache), **SMALL)
    assert count_builds() == 1
    tok = S2Tokenizer(data.tokenizer_model)
    assert tok.vocab_size == 512
    assert indexed_dataset_stats(data.data_prefix) == (data.num_documents, data.num_tokens)
    assert data.num_tokens > 50_000 and data.num_documents > 3
    marker = json.loads((cache / os.path.basename(data.build_dir) / MARKER_NAME).read_text())
    assert marker["num_tokens"] == data.num_tokens

    t0 = time.perf_counter()
    again = ensure_builtin_data(str(cache), **SMALL)
    assert time.perf_counter() - t0 < 0.5
    assert again == data and count_builds() == 1

    os.remove(os.path.join(data.build_dir, MARKER_NAME))
    rebuilt = ensure_builtin_data(str(cache), **SMALL)
    assert count_builds() == 2 and rebuilt == data

    other = ensure_builtin_data(str(cache), vocab_size=400, corpus_bytes=300_000,
                                show_progress=False)
    assert other.build_dir != data.build_dir
    assert S2Tokenizer(other.tokenizer_model).vocab_size == 400


def test_interrupted_build_is_redone(tmp_path, count_builds):
    cache = tmp_path / "cache"
    build_dir = cache / builtin.build_name(SMALL["vocab_size"], SMALL["corpus_bytes"])
    build_dir.mkdir(parents=True)
    (build_dir / "corpus.jsonl").write_text('{"text": "trunc')
    (build_dir / "text_document.bin").write_bytes(b"\x00" * 10)
    data = ensure_builtin_data(str(cache), **SMALL)
    assert count_builds() == 1
    assert sorted(os.listdir(build_dir)) == sorted(
        ["COMPLETE.json", "corpus.jsonl", "text_document.bin", "text_document.idx",
         "tokenizer.model", "tokenizer.vocab"])
    assert indexed_dataset_stats(data.data_prefix)[1] == data.num_tokens


def _racer(cache, queue):
    data = ensure_builtin_data(cache, **SMALL)
    queue.put(data.data_prefix)


@pytest.mark.slow
def test_concurrent_builders_build_once(tmp_path, count_builds):
    ctx = multiprocessing.get_context("fork")  # children inherit the counting wrapper
    queue = ctx.Queue()
    procs = [ctx.Process(target=_racer, args=(str(tmp_path / "cache"), queue)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
        assert p.exitcode == 0
    prefixes = {queue.get(timeout=5) for _ in procs}
    assert len(prefixes) == 1 and count_builds() == 1


def test_distributed_variant(tmp_path):
    import torch.distributed as dist

    cache = str(tmp_path / "cache")
    plain = ensure_builtin_data_distributed(cache, **SMALL)
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1),
                            rank=0, world_size=1)
    try:
        assert ensure_builtin_data_distributed(cache, **SMALL) == plain
    finally:
        dist.destroy_process_group()


def test_default_cache_dir_and_corpus_bounds(tmp_path, monkeypatch):
    monkeypatch.setenv("S2M_CACHE", str(tmp_path / "env_cache"))
    assert default_cache_dir() == str(tmp_path / "env_cache")
    monkeypatch.delenv("S2M_CACHE")
    assert default_cache_dir().endswith(os.path.join(".cache", "s2megatron", "builtin"))

    rel_paths = [rel for rel, _ in iter_stdlib_sources()]
    assert rel_paths == sorted(rel_paths) and rel_paths
    parts = {part for rel in rel_paths for part in rel.split("/")[:-1]}
    assert not parts & {"test", "tests", "idlelib", "site-packages", "__pycache__"}
    n_docs, n_bytes = write_stdlib_corpus(tmp_path / "c.jsonl", max_bytes=100_000)
    lines = (tmp_path / "c.jsonl").read_text(encoding="utf-8").splitlines()
    assert len(lines) == n_docs and n_bytes >= 100_000
    last = len(json.loads(lines[-1])["text"].encode("utf-8"))
    assert n_bytes - last < 100_000  # stops right after crossing the bound
    with pytest.raises(ValueError, match="max_bytes"):
        write_stdlib_corpus(tmp_path / "d.jsonl", max_bytes=0)
    with pytest.raises(ValueError, match="vocab_size"):
        ensure_builtin_data(str(tmp_path), vocab_size=10)
