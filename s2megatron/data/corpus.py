"""The built-in corpus: the Python standard library's own ``.py`` sources.

Every Python installation ships them, so training works offline with no download. Each source
file is one document (docstrings, comments and code). Files are taken in sorted order of their
path relative to the stdlib root until ``max_bytes`` of text is reached, so the corpus is
deterministic for a given Python version.

Skipped: test suites (``test``/``tests`` directories), ``idlelib``, ``site-packages``,
``encodings`` (mostly codec tables), build-configuration modules and ``__pycache__``.
"""

from __future__ import annotations

import json
import os
import sysconfig
from typing import Iterator, List, Optional, Tuple

from s2megatron.data.textio import PathLike

DEFAULT_MAX_BYTES = 10_000_000
_SKIP_DIRS = frozenset(
    {"test", "tests", "idlelib", "site-packages", "dist-packages", "encodings", "__pycache__"}
)
_SKIP_PREFIXES = ("_sysconfigdata", "config-")


def stdlib_root() -> str:
    """Directory of the running interpreter's standard library."""
    return sysconfig.get_paths()["stdlib"]


def iter_stdlib_sources(root: Optional[str] = None) -> Iterator[Tuple[str, str]]:
    """Yield ``(relative_path, absolute_path)`` of stdlib ``.py`` files in sorted order."""
    root = root or stdlib_root()
    found: List[Tuple[str, str]] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [
            d for d in dirnames if d not in _SKIP_DIRS and not d.startswith(_SKIP_PREFIXES)
        ]
        for name in filenames:
            if name.endswith(".py") and not name.startswith(_SKIP_PREFIXES):
                path = os.path.join(dirpath, name)
                found.append((os.path.relpath(path, root).replace(os.sep, "/"), path))
    yield from sorted(found)


def write_stdlib_corpus(
    output_path: PathLike, max_bytes: int = DEFAULT_MAX_BYTES, root: Optional[str] = None
) -> Tuple[int, int]:
    """Write the corpus as jsonl (``{"text": ..., "path": ...}`` per line).

    Args:
        output_path: destination ``.jsonl``; written under a temporary name and renamed into
            place when complete.
        max_bytes: stop after the first file that brings the UTF-8 text total to ``max_bytes``
            (the corpus is at most one source file larger than this).
        root: stdlib directory (default: the running interpreter's).

    Returns:
        (num_documents, num_text_bytes)

    Raises:
        ValueError: if ``max_bytes`` is not positive or no source file was found.
    """
    if not isinstance(max_bytes, int) or max_bytes <= 0:
        raise ValueError(f"max_bytes={max_bytes!r} must be a positive int")
    output_path = os.fspath(output_path)
    os.makedirs(os.path.dirname(os.path.abspath(output_path)), exist_ok=True)
    tmp_path = f"{output_path}.tmp-{os.getpid()}"
    num_docs = num_bytes = 0
    try:
        with open(tmp_path, "w", encoding="utf-8") as out:
            for rel_path, abs_path in iter_stdlib_sources(root):
                try:
                    with open(abs_path, encoding="utf-8") as f:
                        text = f.read()
                except (UnicodeDecodeError, OSError):
                    continue  # a few platform files are not UTF-8; they are not needed
                if not text.strip():
                    continue
                out.write(json.dumps({"text": text, "path": rel_path}, ensure_ascii=False) + "\n")
                num_docs += 1
                num_bytes += len(text.encode("utf-8"))
                if num_bytes >= max_bytes:
                    break
        if num_docs == 0:
            raise ValueError(f"no Python sources found under {root or stdlib_root()!r}")
        os.replace(tmp_path, output_path)
    finally:
        if os.path.exists(tmp_path):
            os.remove(tmp_path)
    return num_docs, num_bytes
