"""Built-in training data: stdlib corpus -> SentencePiece tokenizer -> indexed dataset, cached.

Layout of one build (``<cache_dir>/<build_name>/``)::

    corpus.jsonl            the stdlib documents (see s2megatron.data.corpus)
    tokenizer.model/.vocab  SentencePiece BPE model trained on the corpus
    text_document.bin/.idx  the tokenized corpus, eod after every document
    COMPLETE.json           marker, written last and atomically

``build_name`` encodes the Python version, corpus size and vocab size, so different settings do
not collide. A build without its marker (killed midway) is redone from scratch.

Concurrency: builds of the same ``build_name`` are serialized with an exclusive ``fcntl.flock``
on ``<cache_dir>/<build_name>.lock``; a process that waited finds the marker and returns at once.
So any number of processes may call :func:`ensure_builtin_data` at the same time. Under
torchrun, :func:`ensure_builtin_data_distributed` lets only local rank 0 build while the other
ranks wait at a barrier (and then read the marker).
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass
from typing import Optional

from s2megatron.data.corpus import DEFAULT_MAX_BYTES, write_stdlib_corpus

MARKER_NAME = "COMPLETE.json"
DATA_PREFIX_NAME = "text_document"
TOKENIZER_PREFIX_NAME = "tokenizer"
CORPUS_NAME = "corpus.jsonl"
_FORMAT_VERSION = 1


@dataclass(frozen=True)
class BuiltinData:
    """Paths and size of the built-in dataset.

    Attributes:
        data_prefix: indexed-dataset prefix (``.bin``/``.idx``), usable as a Megatron blend path.
        tokenizer_model: SentencePiece ``.model`` path (load with ``S2Tokenizer``).
        num_tokens: tokens in the dataset, eod tokens included.
        num_documents: documents in the dataset.
        build_dir: directory holding the build.
    """

    data_prefix: str
    tokenizer_model: str
    num_tokens: int
    num_documents: int = 0
    build_dir: str = ""


def default_cache_dir() -> str:
    """``$S2M_CACHE`` if set, else ``~/.cache/s2megatron/builtin``."""
    return os.environ.get("S2M_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "s2megatron", "builtin"
    )


def build_name(vocab_size: int, corpus_bytes: int) -> str:
    """Directory name of a build with these settings."""
    py = "{}.{}.{}".format(*sys.version_info[:3])
    return f"stdlib-py{py}-{corpus_bytes}B-vocab{vocab_size}-v{_FORMAT_VERSION}"


def _read_marker(build_dir: str) -> Optional[BuiltinData]:
    """The build described by the marker, or None when the marker or a file it names is missing."""
    try:
        with open(os.path.join(build_dir, MARKER_NAME)) as f:
            info = json.load(f)
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    data = BuiltinData(
        data_prefix=os.path.join(build_dir, DATA_PREFIX_NAME),
        tokenizer_model=os.path.join(build_dir, TOKENIZER_PREFIX_NAME + ".model"),
        num_tokens=int(info["num_tokens"]),
        num_documents=int(info["num_documents"]),
        build_dir=build_dir,
    )
    needed = [data.tokenizer_model, data.data_prefix + ".bin", data.data_prefix + ".idx"]
    return data if all(os.path.isfile(p) for p in needed) else None


def _build(build_dir: str, vocab_size: int, corpus_bytes: int, workers, show_progress) -> None:
    from s2megatron.data.indexed import build_indexed_dataset, indexed_dataset_stats
    from s2megatron.data.tokenizer import train_sentencepiece

    t0 = time.monotonic()
    corpus = os.path.join(build_dir, CORPUS_NAME)
    num_docs_in, num_bytes = write_stdlib_corpus(corpus, max_bytes=corpus_bytes)
    t1 = time.monotonic()
    model = train_sentencepiece(
        [corpus], os.path.join(build_dir, TOKENIZER_PREFIX_NAME), vocab_size, num_threads=workers
    )
    t2 = time.monotonic()
    prefix = build_indexed_dataset(
        [corpus],
        model,
        os.path.join(build_dir, DATA_PREFIX_NAME),
        workers=workers,
        show_progress=show_progress,
    )
    t3 = time.monotonic()
    num_documents, num_tokens = indexed_dataset_stats(prefix)
    info = {
        "num_tokens": num_tokens,
        "num_documents": num_documents,
        "corpus_documents": num_docs_in,
        "corpus_bytes": num_bytes,
        "vocab_size": vocab_size,
        "python": sys.version.split()[0],
        "seconds": {"corpus": t1 - t0, "tokenizer": t2 - t1, "tokenize": t3 - t2},
    }
    tmp_marker = os.path.join(build_dir, MARKER_NAME + ".tmp")
    with open(tmp_marker, "w") as f:
        json.dump(info, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp_marker, os.path.join(build_dir, MARKER_NAME))


def ensure_builtin_data(
    cache_dir: Optional[str] = None,
    vocab_size: int = 4096,
    *,
    corpus_bytes: int = DEFAULT_MAX_BYTES,
    workers: Optional[int] = None,
    show_progress: bool = True,
) -> BuiltinData:
    """Return the built-in dataset, building it on first use.

    Args:
        cache_dir: root of the cache (default :func:`default_cache_dir`).
        vocab_size: SentencePiece vocabulary size (>= 300).
        corpus_bytes: size of the stdlib text corpus in bytes (default 10 MB: about 3 M tokens
            at vocab 4096; builds in a few seconds on 2 cores).
        workers: tokenizer processes/threads (default: all cores, at most 8).
        show_progress: print build messages and a tokenization progress line to stderr.

    Returns:
        BuiltinData with absolute paths.

    Raises:
        ValueError: bad ``vocab_size`` or ``corpus_bytes``.
        OSError: the cache directory is not writable.
    """
    if not isinstance(vocab_size, int) or vocab_size < 300:
        raise ValueError(f"vocab_size={vocab_size!r} must be an int >= 300")
    if not isinstance(corpus_bytes, int) or corpus_bytes <= 0:
        raise ValueError(f"corpus_bytes={corpus_bytes!r} must be a positive int")
    root = os.path.abspath(os.path.expanduser(cache_dir or default_cache_dir()))
    name = build_name(vocab_size, corpus_bytes)
    build_dir = os.path.join(root, name)

    data = _read_marker(build_dir)
    if data is not None:
        return data

    os.makedirs(root, exist_ok=True)
    with open(os.path.join(root, name + ".lock"), "a+") as lock_file:
        fcntl.flock(lock_file.fileno(), fcntl.LOCK_EX)
        try:
            data = _read_marker(build_dir)  # another process may have finished meanwhile
            if data is not None:
                return data
            if show_progress:
                print(f"[s2megatron.data] building built-in data in {build_dir}", file=sys.stderr)
            shutil.rmtree(build_dir, ignore_errors=True)  # leftovers of a killed build
            os.makedirs(build_dir)
            _build(build_dir, vocab_size, corpus_bytes, workers, show_progress)
        finally:
            fcntl.flock(lock_file.fileno(), fcntl.LOCK_UN)
    data = _read_marker(build_dir)
    assert data is not None, f"built-in data build in {build_dir} left no valid marker"
    return data


def ensure_builtin_data_distributed(
    cache_dir: Optional[str] = None, vocab_size: int = 4096, **kwargs
) -> BuiltinData:
    """:func:`ensure_builtin_data` for multi-process jobs.

    With an initialized ``torch.distributed`` group, local rank 0 (``LOCAL_RANK``; one builder
    per node, so node-local caches work too) builds while the other ranks wait at a barrier,
    then they read the finished build. Must be called by every rank. Without a process group it
    is :func:`ensure_builtin_data`.
    """
    from s2megatron.data.dist_utils import barrier, dist_is_initialized, local_rank

    if not dist_is_initialized():
        return ensure_builtin_data(cache_dir, vocab_size, **kwargs)
    data = error = None
    if local_rank() == 0:
        try:
            data = ensure_builtin_data(cache_dir, vocab_size, **kwargs)
        except BaseException as err:  # still reach the barrier so other ranks do not hang
            error = err
    barrier()
    if error is not None:
        raise error
    if data is None:
        kwargs = dict(kwargs, show_progress=False)
        data = ensure_builtin_data(cache_dir, vocab_size, **kwargs)
    return data

