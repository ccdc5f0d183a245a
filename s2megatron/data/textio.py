"""Reading raw text documents from ``.txt`` and ``.jsonl`` files.

Document convention (shared by tokenizer training and indexed-dataset building):

* ``.jsonl`` / ``.json`` (one JSON object per line): each line is one document, its text is the
  string field ``text_key`` (default ``"text"``). Blank lines are skipped.
* ``.txt``: the whole file is one document (source files, books, articles). Corpora with many
  documents belong in ``.jsonl``, where document boundaries are explicit.

Documents are yielded in the order of ``input_paths`` and, inside a ``.jsonl`` file, in line order.
"""

from __future__ import annotations

import json
import os
from typing import Iterable, Iterator, List, Sequence, Tuple, Union

PathLike = Union[str, os.PathLike]

TEXT_SUFFIXES = (".txt",)
JSONL_SUFFIXES = (".jsonl", ".json")


def normalize_input_paths(input_paths: Union[PathLike, Sequence[PathLike]]) -> List[str]:
    """Return ``input_paths`` as a list of existing file paths.

    Raises:
        ValueError: when the list is empty, a path does not exist, or its suffix is not one of
            ``.txt``, ``.jsonl``, ``.json``.
    """
    if isinstance(input_paths, (str, os.PathLike)):
        input_paths = [input_paths]
    paths = [os.fspath(p) for p in input_paths]
    if not paths:
        raise ValueError("input_paths is empty; give at least one .txt or .jsonl file")
    for path in paths:
        if not path.endswith(TEXT_SUFFIXES + JSONL_SUFFIXES):
            raise ValueError(
                f"input file {path!r} has an unsupported suffix; valid: "
                f"{', '.join(TEXT_SUFFIXES + JSONL_SUFFIXES)}"
            )
        if not os.path.isfile(path):
            raise ValueError(f"input file {path!r} does not exist")
    return paths


def total_input_bytes(paths: Iterable[str]) -> int:
    """Sum of the file sizes in bytes (used for progress/ETA)."""
    return sum(os.path.getsize(p) for p in paths)


def iter_documents(
    input_paths: Union[PathLike, Sequence[PathLike]], text_key: str = "text"
) -> Iterator[Tuple[str, int]]:
    """Yield ``(text, num_input_bytes)`` for every document, in file order.

    ``num_input_bytes`` is the number of bytes of the input file the document occupied, so that a
    consumer can report progress against :func:`total_input_bytes`.

    Raises:
        ValueError: on a malformed JSON line or a line whose ``text_key`` is missing or not a
            string (the message names file and line number).
    """
    for path in normalize_input_paths(input_paths):
        if path.endswith(TEXT_SUFFIXES):
            with open(path, "rb") as f:
                raw = f.read()
            yield raw.decode("utf-8", errors="replace"), len(raw)
            continue
        with open(path, "rb") as f:
            for line_no, raw in enumerate(f, start=1):
                if not raw.strip():
                    continue
                try:
                    record = json.loads(raw)
                except json.JSONDecodeError as err:
                    raise ValueError(f"{path}:{line_no}: not valid JSON ({err})") from err
                if not isinstance(record, dict):
                    raise ValueError(f"{path}:{line_no}: expected a JSON object per line")
                text = record.get(text_key)
                if not isinstance(text, str):
                    raise ValueError(
                        f"{path}:{line_no}: field {text_key!r} missing or not a string; "
                        f"keys present: {sorted(record)}"
                    )
                yield text, len(raw)


def iter_text_lines(
    input_paths: Union[PathLike, Sequence[PathLike]],
    text_key: str = "text",
    max_line_bytes: int = 4192,
) -> Iterator[str]:
    """Yield the non-empty lines of every document, each at most ``max_line_bytes`` UTF-8 bytes.

    SentencePiece trains on "sentences"; lines are the natural unit for both prose and code.
    Longer lines are cut into pieces (at character boundaries) instead of being dropped.
    """
    for text, _ in iter_documents(input_paths, text_key):
        for line in text.splitlines():
            if not line.strip():
                continue
            encoded = line.encode("utf-8")
            if len(encoded) <= max_line_bytes:
                yield line
                continue
            start = 0
            while start < len(encoded):
                piece = encoded[start : start + max_line_bytes].decode("utf-8", errors="ignore")
                if not piece:  # a single character wider than the limit
                    break
                yield piece
                start += len(piece.encode("utf-8"))
