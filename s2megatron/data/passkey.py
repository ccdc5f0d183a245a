"""Passkey retrieval samples: a 5-digit key hidden at a chosen depth in filler text.

The format follows the passkey test of landmark attention (Mohtashami & Jaggi, 2023), which the
S2-Attention paper uses for long-context retrieval::

    There is an important info hidden inside a lot of irrelevant text. Find it and memorize it.
    I will quiz you about the important information there. The grass is green. The sky is blue.
    The sun is yellow. Here we go. There and back again. ... The pass key is 68212. Remember it.
    68212 is the pass key. ... The grass is green. ... What is the pass key? The pass key is

and the answer is `` 68212``.

The prompt is assembled from separately tokenized parts (each part after the first starts with
a space), so its token length is known exactly: ``len(prompt_ids) + len(answer_ids) <=
context_tokens`` always, with as many whole filler sentences as fit. The needle is placed
between filler sentences, after ``round(depth * num_filler_sentences)`` of them, so its token
position is within one filler sentence of ``depth`` of the filler span.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import asdict, dataclass
from typing import Iterable, List, Optional, Sequence, Union

import numpy as np

HEADER = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize "
    "it. I will quiz you about the important information there."
)
FILLER_SENTENCES = (
    "The grass is green.",
    "The sky is blue.",
    "The sun is yellow.",
    "Here we go.",
    "There and back again.",
)
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = "What is the pass key? The pass key is"
ANSWER = " {key}"
PASSKEY_MIN, PASSKEY_MAX = 10000, 99999


@dataclass
class PasskeySample:
    """One passkey prompt.

    Attributes:
        prompt_ids: token ids of header + filler/needle + question (no bos/eod).
        answer_ids: token ids of ``" NNNNN"``, the expected continuation.
        passkey: the 5-digit key.
        depth: requested relative depth in [0, 1].
        context_tokens: the token budget (``len(prompt_ids) + len(answer_ids) <= context_tokens``).
        needle_token_offset: index in ``prompt_ids`` where the needle sentence starts.
        filler_start: index where the filler span (filler sentences and needle) starts.
        filler_end: index where it ends (the question starts).
        num_filler_sentences: filler sentences in the prompt.
        needle_num_tokens: tokens of the needle sentence.
    """

    prompt_ids: List[int]
    answer_ids: List[int]
    passkey: int
    depth: float
    context_tokens: int
    needle_token_offset: int
    filler_start: int
    filler_end: int
    num_filler_sentences: int
    needle_num_tokens: int

    @property
    def actual_depth(self) -> float:
        """Needle start relative to the filler span without the needle, in [0, 1]."""
        span = self.filler_end - self.filler_start - self.needle_num_tokens
        return (self.needle_token_offset - self.filler_start) / span if span > 0 else 0.0


def _randint(rng, low: int, high: int) -> int:
    """Uniform int in [low, high] from a ``random.Random`` or ``numpy.random.Generator``."""
    if isinstance(rng, np.random.Generator):
        return int(rng.integers(low, high + 1))
    return rng.randint(low, high)


def make_passkey_sample(
    tokenizer,
    context_tokens: int,
    depth: float,
    passkey: Optional[int] = None,
    rng: Union[random.Random, np.random.Generator, None] = None,
) -> PasskeySample:
    """Build one passkey prompt of at most ``context_tokens`` tokens (answer included).

    Args:
        tokenizer: object with ``tokenize(str) -> list[int]`` (e.g. :class:`S2Tokenizer`).
        context_tokens: token budget for prompt + answer.
        depth: needle depth in [0, 1] (0: right after the header, 1: right before the question).
        passkey: 5-digit int in [10000, 99999]; drawn from ``rng`` when None.
        rng: ``random.Random`` or ``numpy.random.Generator``; picks the filler cycle's phase
            (and the passkey when None). Default: ``random.Random(0)``.

    Returns:
        PasskeySample.

    Raises:
        ValueError: depth outside [0, 1], passkey not 5 digits, or ``context_tokens`` too small
            for header + needle + question + answer (the message gives the minimum).
    """
    if not isinstance(depth, (int, float)) or not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth={depth!r} must be a number in [0, 1]")
    rng = rng if rng is not None else random.Random(0)
    if passkey is None:
        passkey = _randint(rng, PASSKEY_MIN, PASSKEY_MAX)
    if isinstance(passkey, bool) or not isinstance(passkey, (int, np.integer)) or not (
        PASSKEY_MIN <= passkey <= PASSKEY_MAX
    ):
        raise ValueError(f"passkey={passkey!r} must be a 5-digit int in [10000, 99999]")
    passkey = int(passkey)

    header = tokenizer.tokenize(HEADER)
    needle = tokenizer.tokenize(" " + NEEDLE.format(key=passkey))
    question = tokenizer.tokenize(" " + QUESTION)
    answer = tokenizer.tokenize(ANSWER.format(key=passkey))
    fixed = len(header) + len(needle) + len(question) + len(answer)
    if not isinstance(context_tokens, int) or context_tokens < fixed:
        raise ValueError(
            f"context_tokens={context_tokens!r} is too small; this tokenizer needs at least "
            f"{fixed} tokens for header, needle, question and answer"
        )

    fillers = [tokenizer.tokenize(" " + s) for s in FILLER_SENTENCES]
    phase = _randint(rng, 0, len(fillers) - 1)
    budget = context_tokens - fixed
    chosen: List[List[int]] = []
    while True:
        nxt = fillers[(phase + len(chosen)) % len(fillers)]
        if len(nxt) > budget:
            break
        chosen.append(nxt)
        budget -= len(nxt)

    insert_at = int(round(depth * len(chosen)))
    prompt = list(header)
    filler_start = len(prompt)
    for sentence in chosen[:insert_at]:
        prompt.extend(sentence)
    needle_offset = len(prompt)
    prompt.extend(needle)
    for sentence in chosen[insert_at:]:
        prompt.extend(sentence)
    filler_end = len(prompt)
    prompt.extend(question)

    return PasskeySample(
        prompt_ids=prompt,
        answer_ids=list(answer),
        passkey=passkey,
        depth=float(depth),
        context_tokens=context_tokens,
        needle_token_offset=needle_offset,
        filler_start=filler_start,
        filler_end=filler_end,
        num_filler_sentences=len(chosen),
        needle_num_tokens=len(needle),
    )


def write_passkey_jsonl(
    path: Union[str, os.PathLike],
    tokenizer,
    context_lengths: Sequence[int],
    depths: Sequence[float],
    samples_per_cell: int,
    seed: int,
    *,
    include_text: bool = False,
) -> int:
    """Write a passkey evaluation grid as jsonl; returns the number of samples written.

    One line per sample, for every ``(context_tokens, depth)`` cell and ``samples_per_cell``
    repetitions (passkeys and filler phases drawn from ``random.Random(seed)``, so the file is
    reproducible). Fields: ``context_tokens``, ``depth``, ``passkey``, ``prompt_ids``,
    ``answer_ids``, ``needle_token_offset``, ``actual_depth``, and ``prompt``/``answer`` text
    when ``include_text``. Written to a temporary name and renamed when complete.

    Raises:
        ValueError: empty grid, ``samples_per_cell < 1``, or an invalid cell (see
            :func:`make_passkey_sample`).
    """
    context_lengths = list(context_lengths)
    depths = list(depths)
    if not context_lengths or not depths:
        raise ValueError(
            f"context_lengths={context_lengths!r} and depths={depths!r} must be non-empty"
        )
    if not isinstance(samples_per_cell, int) or samples_per_cell < 1:
        raise ValueError(f"samples_per_cell={samples_per_cell!r} must be an int >= 1")
    rng = random.Random(seed)
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    count = 0
    try:
        with open(tmp, "w", encoding="utf-8") as out:
            for record in _iter_records(
                tokenizer, context_lengths, depths, samples_per_cell, rng, include_text
            ):
                out.write(json.dumps(record) + "\n")
                count += 1
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return count


def _iter_records(
    tokenizer, context_lengths, depths, samples_per_cell, rng, include_text
) -> Iterable[dict]:
    for context_tokens in context_lengths:
        for depth in depths:
            for _ in range(samples_per_cell):
                s = make_passkey_sample(tokenizer, int(context_tokens), float(depth), None, rng)
                record = asdict(s)
                record["actual_depth"] = s.actual_depth
                if include_text:
                    record["prompt"] = tokenizer.detokenize(s.prompt_ids)
                    record["answer"] = tokenizer.detokenize(s.answer_ids)
                yield record


def read_passkey_jsonl(path: Union[str, os.PathLike]) -> List[dict]:
    """Read back a file written by :func:`write_passkey_jsonl`."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
