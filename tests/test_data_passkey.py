"""Passkey retrieval samples."""

import random

import numpy as np
import pytest

from s2megatron.data.passkey import (
    FILLER_SENTENCES,
    make_passkey_sample,
    read_passkey_jsonl,
    write_passkey_jsonl,
)
from s2megatron.data.testing import make_documents, write_jsonl
from s2megatron.data.tokenizer import S2Tokenizer, train_sentencepiece


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tok")
    corpus = write_jsonl(str(tmp / "t.jsonl"), make_documents(150, seed=8) + list(FILLER_SENTENCES))
    return S2Tokenizer(train_sentencepiece([corpus], str(tmp / "tok"), 400, num_threads=1))


def _find(haystack, needle):
    """Start positions of the token subsequence ``needle`` in ``haystack``."""
    n = len(needle)
    return [i for i in range(len(haystack) - n + 1) if haystack[i : i + n] == needle]


@pytest.mark.parametrize("context_tokens", [200, 517, 2048])
@pytest.mark.parametrize("depth", [0.0, 0.1, 0.5, 0.75, 1.0])
def test_needle_at_depth_and_length_within_budget(tok, context_tokens, depth):
    key = 40000 + context_tokens
    s = make_passkey_sample(tok, context_tokens, depth, key, random.Random(3))
    text = tok.detokenize(s.prompt_ids)
    needle_text = f"The pass key is {key}. Remember it. {key} is the pass key."
    assert text.count(needle_text) == 1 and text.count(str(key)) == 2
    assert text.startswith("There is an important info hidden")
    assert text.endswith(" What is the pass key? The pass key is")

    # Budget: never over, and no further whole filler sentence would have fit.
    filler_lens = [len(tok.tokenize(" " + f)) for f in FILLER_SENTENCES]
    total = len(s.prompt_ids) + len(s.answer_ids)
    assert context_tokens - max(filler_lens) < total <= context_tokens

    # Depth, measured on the tokens: the needle's tokens sit where requested, within one
    # filler sentence, relative to the filler span (header and question excluded).
    needle_ids = tok.tokenize(" " + needle_text)
    (pos,) = _find(s.prompt_ids, needle_ids)
    header_len = len(tok.tokenize("There is an important info hidden inside a lot of irrelevant "
                                  "text. Find it and memorize it. I will quiz you about the "
                                  "important information there."))
    question_len = len(tok.tokenize(" What is the pass key? The pass key is"))
    filler_tokens = len(s.prompt_ids) - header_len - question_len - len(needle_ids)
    assert abs((pos - header_len) - depth * filler_tokens) <= max(filler_lens)
    assert pos == s.needle_token_offset
    assert abs(s.actual_depth - depth) <= max(filler_lens) / filler_tokens


def test_answer_tokenization(tok):
    s = make_passkey_sample(tok, 300, 0.5, 70521, random.Random(0))
    assert s.answer_ids == tok.tokenize(" 70521")
    assert tok.detokenize(s.answer_ids) == " 70521"
    full = tok.detokenize(s.prompt_ids + s.answer_ids)
    assert full.endswith("What is the pass key? The pass key is 70521")
    # Split digits: the five digits are five separate tokens at the end of the answer.
    assert [tok.id_to_piece(i) for i in s.answer_ids[-5:]] == list("70521")


def test_rng_draws_passkey_and_numpy_generator_works(tok):
    a = make_passkey_sample(tok, 256, 0.3, None, random.Random(5))
    b = make_passkey_sample(tok, 256, 0.3, None, random.Random(5))
    c = make_passkey_sample(tok, 256, 0.3, None, np.random.default_rng(5))
    assert a.prompt_ids == b.prompt_ids and 10000 <= a.passkey <= 99999
    assert 10000 <= c.passkey <= 99999 and len(c.prompt_ids) + len(c.answer_ids) <= 256


def test_invalid_arguments(tok):
    with pytest.raises(ValueError, match="depth"):
        make_passkey_sample(tok, 500, 1.5, 12345)
    with pytest.raises(ValueError, match="passkey"):
        make_passkey_sample(tok, 500, 0.5, 123)
    with pytest.raises(ValueError, match="context_tokens=10 is too small"):
        make_passkey_sample(tok, 10, 0.5, 12345)


def test_write_jsonl_grid_is_reproducible(tok, tmp_path):
    args = (tok, [256, 400], [0.0, 0.5, 1.0], 3, 11)
    n = write_passkey_jsonl(tmp_path / "a.jsonl", *args, include_text=True)
    write_passkey_jsonl(tmp_path / "b.jsonl", *args, include_text=True)
    assert n == 2 * 3 * 3
    assert (tmp_path / "a.jsonl").read_bytes() == (tmp_path / "b.jsonl").read_bytes()
    rows = read_passkey_jsonl(tmp_path / "a.jsonl")
    assert len(rows) == n and len({r["passkey"] for r in rows}) > 1
    for r in rows:
        assert len(r["prompt_ids"]) + len(r["answer_ids"]) <= r["context_tokens"]
        assert r["answer"] == f" {r['passkey']}"
        assert f"The pass key is {r['passkey']}." in r["prompt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.jsonl", "b.jsonl"]
    with pytest.raises(ValueError, match="samples_per_cell"):
        write_passkey_jsonl(tmp_path / "c.jsonl", tok, [256], [0.5], 0, 1)
