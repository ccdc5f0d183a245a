"""Tokenize text/jsonl documents into a megatron-core indexed dataset (``.bin`` + ``.idx``).

Each non-empty document becomes one sequence and one document in the index (megatron-core's
GPT datasets are split by sequence), followed by the eod id when ``append_eod``. Documents whose
text tokenizes to nothing (empty strings) are skipped, as Megatron-LM's preprocessing does.

Atomicity: ``.bin`` and ``.idx`` are written under ``<prefix>.tmp-<pid>`` and renamed into place
when complete, the ``.idx`` last (after removing any previous ``.idx``). A crash therefore never
leaves an ``.idx`` under the final name that does not describe the final ``.bin``; readers (and
megatron-core's ``IndexedDataset.exists``) treat a prefix without ``.idx`` as absent.
"""

from __future__ import annotations

import multiprocessing
import os
from typing import Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np

from s2megatron.data.progress import Progress
from s2megatron.data.textio import (
    PathLike,
    iter_documents,
    normalize_input_paths,
    total_input_bytes,
)
from s2megatron.data.tokenizer import S2Tokenizer

# Largest vocabulary stored as uint16; above it tokens are int32 (as the task and Megatron agree).
UINT16_MAX_VOCAB = 65500
DOCS_PER_TASK = 32

_worker_tokenizer: Optional[S2Tokenizer] = None


def token_dtype(vocab_size: int) -> type:
    """``np.uint16`` when ``vocab_size < 65500`` else ``np.int32``."""
    return np.uint16 if vocab_size < UINT16_MAX_VOCAB else np.int32


def _init_worker(model_path: str) -> None:
    global _worker_tokenizer
    _worker_tokenizer = S2Tokenizer(model_path)


def _encode_chunk(
    chunk: List[Tuple[str, int]], append_eod: bool, dtype: type
) -> Tuple[List[np.ndarray], int, int]:
    """Worker task: returns (token arrays of the non-empty docs, input bytes, skipped docs)."""
    tok = _worker_tokenizer
    texts = [text for text, _ in chunk]
    arrays = []
    skipped = 0
    for ids in tok.tokenize_batch(texts):
        if not ids:
            skipped += 1
            continue
        if append_eod:
            ids.append(tok.eod)
        arrays.append(np.asarray(ids, dtype=dtype))
    return arrays, sum(n for _, n in chunk), skipped


def _chunks(docs: Iterator[Tuple[str, int]], size: int) -> Iterator[List[Tuple[str, int]]]:
    chunk: List[Tuple[str, int]] = []
    for doc in docs:
        chunk.append(doc)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _remove_quietly(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


def build_indexed_dataset(
    input_paths: Union[PathLike, Sequence[PathLike]],
    tokenizer_model: Union[PathLike, S2Tokenizer],
    output_prefix: PathLike,
    *,
    text_key: str = "text",
    workers: Optional[int] = None,
    append_eod: bool = True,
    show_progress: bool = True,
    docs_per_task: int = DOCS_PER_TASK,
) -> str:
    """Tokenize documents into ``<output_prefix>.bin`` / ``<output_prefix>.idx``.

    Args:
        input_paths: ``.txt`` (one document per file) and/or ``.jsonl`` files (one document per
            line, text in ``text_key``); see :mod:`s2megatron.data.textio`.
        tokenizer_model: SentencePiece ``.model`` path or an :class:`S2Tokenizer`.
        output_prefix: path prefix of the dataset (no suffix).
        workers: tokenizer processes (default ``min(os.cpu_count(), 8)``); ``<= 1`` tokenizes in
            this process. Document order is preserved either way.
        append_eod: append the tokenizer's eod id to every document.
        show_progress: print a progress line (docs/s, tokens/s, ETA) to stderr.
        docs_per_task: documents per worker task.

    Returns:
        str: ``output_prefix``. Tokens are stored as uint16 when the vocabulary has fewer than
        65500 pieces, else int32.

    Raises:
        ValueError: bad input paths, tokenizer model, ``workers``/``docs_per_task``, or no
            non-empty document in the inputs.
        Any error while reading/tokenizing is re-raised after the temporary files are removed.
    """
    from megatron.core.datasets.indexed_dataset import (
        IndexedDatasetBuilder,
        get_bin_path,
        get_idx_path,
    )

    paths = normalize_input_paths(input_paths)
    model_path = (
        tokenizer_model.model_path
        if isinstance(tokenizer_model, S2Tokenizer)
        else os.fspath(tokenizer_model)
    )
    tokenizer = S2Tokenizer(model_path)
    if workers is None:
        workers = min(os.cpu_count() or 1, 8)
    if not isinstance(workers, int) or workers < 0:
        raise ValueError(f"workers={workers!r} must be a non-negative int")
    if not isinstance(docs_per_task, int) or docs_per_task < 1:
        raise ValueError(f"docs_per_task={docs_per_task!r} must be a positive int")

    output_prefix = os.fspath(output_prefix)
    os.makedirs(os.path.dirname(os.path.abspath(output_prefix)), exist_ok=True)
    tmp_prefix = f"{output_prefix}.tmp-{os.getpid()}"
    dtype = token_dtype(tokenizer.vocab_size)
    progress = Progress(total_input_bytes(paths), label="tokenize", enabled=show_progress)
    chunks = _chunks(iter_documents(paths, text_key), docs_per_task)

    builder = IndexedDatasetBuilder(get_bin_path(tmp_prefix), dtype=dtype)
    pool = None
    try:
        if workers > 1:
            pool = multiprocessing.get_context().Pool(
                workers, initializer=_init_worker, initargs=(model_path,)
            )
            results = pool.imap(_encode_task, ((c, append_eod, dtype) for c in chunks))
        else:
            _init_worker(model_path)
            results = (_encode_chunk(c, append_eod, dtype) for c in chunks)
        num_docs = skipped = 0
        for arrays, num_bytes, num_skipped in results:
            for arr in arrays:
                builder.add_document(arr, [arr.size])
            num_docs += len(arrays)
            skipped += num_skipped
            progress.update(len(arrays), sum(a.size for a in arrays), num_bytes)
        if num_docs == 0:
            raise ValueError(f"no non-empty documents in {paths} (text_key={text_key!r})")
        builder.finalize(get_idx_path(tmp_prefix))
        if pool is not None:
            pool.close()
            pool.join()
            pool = None
        # Commit: drop the old index first, then data, then the new index.
        _remove_quietly(get_idx_path(output_prefix))
        os.replace(get_bin_path(tmp_prefix), get_bin_path(output_prefix))
        os.replace(get_idx_path(tmp_prefix), get_idx_path(output_prefix))
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
        if not builder.data_file.closed:
            builder.data_file.close()
        _remove_quietly(get_bin_path(tmp_prefix))
        _remove_quietly(get_idx_path(tmp_prefix))
    progress.close()
    if show_progress and skipped:
        progress.stream.write(f"tokenize | skipped {skipped} empty documents\n")
    return output_prefix


def _encode_task(args: Tuple[List[Tuple[str, int]], bool, type]):
    return _encode_chunk(*args)


def indexed_dataset_stats(prefix: PathLike) -> Tuple[int, int]:
    """Return ``(num_documents, num_tokens)`` of an indexed dataset (reads only the ``.idx``)."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    prefix = os.fspath(prefix)
    if not IndexedDataset.exists(prefix):
        raise ValueError(f"no indexed dataset at prefix {prefix!r} (.bin/.idx missing)")
    ds = IndexedDataset(prefix, mmap=True)
    return int(ds.document_indices.shape[0] - 1), int(ds.sequence_lengths.sum(dtype=np.int64))
