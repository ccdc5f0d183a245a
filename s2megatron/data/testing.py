"""Small deterministic corpora for tests and examples (no files outside the given paths)."""

from __future__ import annotations

import json
import os
import random
from typing import List, Sequence

_WORDS = (
    "attention sparse block local vertical stride head shard kernel layer model token sequence "
    "memory context window pattern dense query key value softmax gradient batch tensor pipeline "
    "the a of to and in is for on with as by that this from at be are it an or which"
).split()
_EXTRA = ("naïve", "café", "Zürich", "日本語", "🙂", "Ωmega", "\tindented", "x  =  1")


def make_documents(num_docs: int, seed: int = 0, words_per_doc: int = 80) -> List[str]:
    """``num_docs`` distinct documents; document ``i`` starts with the marker ``[doc i]``.

    The text mixes English-like words, punctuation, digits, newlines and a few non-ASCII words,
    so tokenizers see bytes, whitespace runs and multi-byte characters.
    """
    rng = random.Random(seed)
    docs = []
    for i in range(num_docs):
        n = max(5, int(rng.gauss(words_per_doc, words_per_doc / 3)))
        words = [rng.choice(_WORDS) for _ in range(n)]
        for _ in range(rng.randint(0, 2)):
            words.insert(rng.randrange(len(words)), rng.choice(_EXTRA))
        for j in range(8, len(words), 12):
            words[j] += rng.choice([".", ",", ".\n", ":\n    ", "!"])
        words.insert(rng.randrange(1, len(words)), str(rng.randint(0, 10**6)))
        docs.append(f"[doc {i}] " + " ".join(words))
    return docs


def make_digit_documents(num_docs: int, seed: int = 0, groups_per_doc: int = 60) -> List[str]:
    """Documents made only of digit groups and spaces (tokenize to digit/space pieces only)."""
    rng = random.Random(seed)
    docs = []
    for _ in range(num_docs):
        n = max(3, groups_per_doc + rng.randint(-10, 10))
        docs.append(" ".join(str(rng.randint(0, 99999)) for _ in range(n)))
    return docs


def write_jsonl(path: str, texts: Sequence[str], text_key: str = "text") -> str:
    """Write ``texts`` as jsonl with field ``text_key``; returns ``path``."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for t in texts:
            f.write(json.dumps({text_key: t}, ensure_ascii=False) + "\n")
    return path
