"""SentencePiece training and the S2Tokenizer wrapper."""

import hashlib
import pickle

import pytest

from s2megatron.data.testing import make_documents, write_jsonl
from s2megatron.data.tokenizer import S2Tokenizer, train_sentencepiece

HELD_OUT = [
    "A sentence the tokenizer never saw, with Ünïcödé, 中文字符 and emoji 🚀🧪.",
    "def f(x):\n\treturn  x ** 2   # trailing spaces   \n\n\n",
    "   leading spaces and a lone \r carriage return\r\n",
    "literal specials </s> <s> <pad> <unk> must stay text",
    "\x00\x01 control bytes and a zero-width joiner \u200d and combining e\u0301",
    "",
    " ",
    "1234567890 digits 00007",
]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tok")
    corpus = write_jsonl(str(tmp / "train.jsonl"), make_documents(200, seed=1))
    return S2Tokenizer(train_sentencepiece([corpus], str(tmp / "tok"), 384, num_threads=1))


def test_round_trip_held_out_text(tokenizer):
    for text in HELD_OUT:
        ids = tokenizer.tokenize(text)
        assert tokenizer.detokenize(ids) == text, repr(text)
        assert all(0 <= i < tokenizer.vocab_size for i in ids)


def test_special_ids_distinct_and_never_produced_by_text(tokenizer):
    specials = {tokenizer.eod, tokenizer.pad, tokenizer.bos, tokenizer.unk}
    assert len(specials) == 4
    assert tokenizer.eos == tokenizer.eod
    assert (tokenizer.unk, tokenizer.bos, tokenizer.eod, tokenizer.pad) == (0, 1, 2, 3)
    produced = set()
    for text in HELD_OUT + make_documents(20, seed=99):
        produced.update(tokenizer.tokenize(text))
    assert not produced & specials
    assert all(tokenizer.is_special(i) for i in specials)
    assert not any(tokenizer.is_special(i) for i in produced)
    # Special ids decode to nothing, so a decoded batch never contains marker strings.
    assert tokenizer.detokenize([tokenizer.bos, tokenizer.eod, tokenizer.pad]) == ""


def test_vocab_size_and_unique_identifiers(tokenizer):
    assert tokenizer.vocab_size == 384
    with open(tokenizer.model_path, "rb") as f:
        sha = hashlib.sha256(f.read()).hexdigest()
    ids = tokenizer.unique_identifiers
    assert ids["model_sha256"] == sha
    assert ids["vocab_size"] == 384 and ids["eod"] == 2 and ids["pad"] == 3
    assert tokenizer.model_path not in str(dict(ids))  # moving the file keeps dataset caches


def test_pickle_round_trip(tokenizer):
    clone = pickle.loads(pickle.dumps(tokenizer))
    assert clone.tokenize(HELD_OUT[0]) == tokenizer.tokenize(HELD_OUT[0])
    assert clone.unique_identifiers == tokenizer.unique_identifiers


def test_training_is_deterministic_and_accepts_txt(tmp_path):
    docs = make_documents(60, seed=3)
    paths = []
    for i, d in enumerate(docs):
        paths.append(str(tmp_path / f"doc{i}.txt"))
        with open(paths[-1], "w", encoding="utf-8") as f:
            f.write(d)
    a = train_sentencepiece(paths, str(tmp_path / "a"), 320, num_threads=1)
    b = train_sentencepiece(paths, str(tmp_path / "b"), 320, num_threads=1)
    with open(a, "rb") as fa, open(b, "rb") as fb:
        assert fa.read() == fb.read()
    assert (tmp_path / "a.vocab").read_text(encoding="utf-8").count("\n") == 320
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith("doc")) == [
        "a.model", "a.vocab", "b.model", "b.vocab"]


def test_bad_arguments_raise_value_error(tmp_path):
    corpus = write_jsonl(str(tmp_path / "c.jsonl"), make_documents(30))
    with pytest.raises(ValueError, match="vocab_size"):
        train_sentencepiece([corpus], str(tmp_path / "t"), 100)
    with pytest.raises(ValueError, match="model_type"):
        train_sentencepiece([corpus], str(tmp_path / "t"), 320, model_type="wordpiece")
    with pytest.raises(ValueError, match="does not exist"):
        train_sentencepiece([str(tmp_path / "missing.jsonl")], str(tmp_path / "t"), 320)
    with pytest.raises(ValueError, match="suffix"):
        train_sentencepiece([str(tmp_path / "c.csv")], str(tmp_path / "t"), 320)
    with pytest.raises(ValueError, match="too high|failed"):
        train_sentencepiece([corpus], str(tmp_path / "t"), 50000)
    assert not (tmp_path / "t.model").exists()
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"body": "no text field"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2"):
        train_sentencepiece([str(bad)], str(tmp_path / "t"), 320)
    with pytest.raises(ValueError, match="does not exist"):
        S2Tokenizer(str(tmp_path / "nope.model"))
