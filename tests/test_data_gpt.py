"""GPT datasets through megatron-core's builder: blending, splits, sample alignment."""

import os
import re

import numpy as np
import pytest
import torch

from s2megatron.data.gpt_data import MicroBatchLoader, build_gpt_datasets, parse_blend
from s2megatron.data.indexed import build_indexed_dataset
from s2megatron.data.testing import make_digit_documents, make_documents, write_jsonl
from s2megatron.data.tokenizer import S2Tokenizer, train_sentencepiece

NUM_DOCS = 120


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gpt")
    words = make_documents(NUM_DOCS, seed=21, words_per_doc=40)
    digits = make_digit_documents(NUM_DOCS, seed=22)
    a = write_jsonl(str(tmp / "a.jsonl"), words)
    b = write_jsonl(str(tmp / "b.jsonl"), digits)
    tok = S2Tokenizer(train_sentencepiece([a, b], str(tmp / "tok"), 350, num_threads=1))
    pa = build_indexed_dataset([a], tok, str(tmp / "words"), workers=1, show_progress=False)
    pb = build_indexed_dataset([b], tok, str(tmp / "digits"), workers=1, show_progress=False)
    digit_ids = {tok.eod}
    for text in digits:
        digit_ids.update(tok.tokenize(text))
    return {"tmp": tmp, "tok": tok, "words": pa, "digits": pb, "digit_ids": digit_ids}


def _kwargs(data, **over):
    kw = dict(split="80,20,0", seq_len=16, seed=1234, tokenizer=data["tok"],
              num_train_samples=100, num_valid_samples=20, cache_dir=str(data["tmp"] / "cache"))
    kw.update(over)
    return kw


def test_blend_weights_respected(data):
    train, valid = build_gpt_datasets(
        data_paths=["0.3", data["words"], "0.7", data["digits"]],
        **_kwargs(data, split="90,10,0", seq_len=32, num_train_samples=400, num_valid_samples=60))
    for ds, n in ((train, 400), (valid, 60)):
        assert len(ds) == n
        from_digits = [set(ds[i]["tokens"].tolist()) <= data["digit_ids"] for i in range(n)]
        ids = [int(ds[i]["dataset_id"]) for i in range(n)]
        assert from_digits == [d == 1 for d in ids]  # content agrees with megatron's bookkeeping
        frac = sum(from_digits) / n
        assert abs(frac - 0.7) <= 0.03, frac


def _stream(indexed, document_index):
    parts = [indexed.get(int(d)) for d in document_index]
    return np.concatenate(parts).astype(np.int64)


def test_split_disjoint_and_samples_aligned(data):
    tok = data["tok"]
    train, valid = build_gpt_datasets(data_paths=data["words"], **_kwargs(data))
    train_docs, valid_docs = set(train.indices.tolist()), set(valid.indices.tolist())
    assert not train_docs & valid_docs
    assert train_docs | valid_docs == set(range(NUM_DOCS))
    assert len(valid_docs) == NUM_DOCS - round(0.8 * NUM_DOCS)
    for ds, own in ((train, train_docs), (valid, valid_docs)):
        stream = _stream(ds.dataset, ds.document_index)
        seen_eod = False
        for i in range(len(ds)):
            s = ds[i]
            tokens, labels = s["tokens"], s["labels"]
            assert tokens.shape == labels.shape == (16,)
            assert torch.equal(tokens[1:], labels[:-1])  # labels are tokens shifted by one
            j = int(ds.shuffle_index[i])
            window = torch.from_numpy(stream[j * 16 : j * 16 + 17])
            assert torch.equal(tokens, window[:-1]) and torch.equal(labels, window[1:])
            assert torch.equal(s["loss_mask"], torch.ones(16))
            assert torch.equal(s["position_ids"], torch.arange(16))
            assert "attention_mask" not in s
            seen_eod |= bool((tokens == tok.eod).any())
            text = tok.detokenize(tokens.tolist())
            markers = {int(m) for m in re.findall(r"\[doc (\d+)\]", text)}
            assert markers <= own
        assert seen_eod  # documents are concatenated across eod tokens


def test_cache_reuse_and_seed(data):
    kw = _kwargs(data, cache_dir=str(data["tmp"] / "cache_seed"))
    first, _ = build_gpt_datasets(data_paths=[data["words"]], **kw)
    files = sorted(os.listdir(kw["cache_dir"]))
    again, _ = build_gpt_datasets(data_paths=[data["words"]], **kw)
    assert sorted(os.listdir(kw["cache_dir"])) == files
    other, _ = build_gpt_datasets(data_paths=[data["words"]], **dict(kw, seed=7))
    same = all(torch.equal(first[i]["tokens"], again[i]["tokens"]) for i in range(len(first)))
    differs = any(not torch.equal(first[i]["tokens"], other[i]["tokens"]) for i in range(20))
    assert same and differs


def test_process_group_left_as_found(data, tmp_path):
    import torch.distributed as dist

    assert not dist.is_initialized()
    build_gpt_datasets(data_paths=data["words"], **_kwargs(data))
    assert not dist.is_initialized()
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1),
                            rank=0, world_size=1)
    try:
        train, _ = build_gpt_datasets(data_paths=["1", data["words"]], **_kwargs(data))
        assert dist.is_initialized() and len(train) >= 100
    finally:
        dist.destroy_process_group()


def test_micro_batch_loader_on_gpt_dataset(data):
    train, _ = build_gpt_datasets(data_paths=data["words"], **_kwargs(data))
    loader = MicroBatchLoader(train, micro_batch=4, dp_rank=1, dp_size=2, consumed_samples=16)
    batch = next(loader)
    assert batch["tokens"].shape == (4, 16) and batch["loss_mask"].dtype == torch.float32
    for i in range(4):
        assert torch.equal(batch["tokens"][i], train[16 + 4 + i]["tokens"])
    assert loader.consumed_samples == 24


def test_bad_inputs(data):
    tiny = build_indexed_dataset(
        [write_jsonl(str(data["tmp"] / "tiny.jsonl"), ["one doc", "two doc", "three doc"])],
        data["tok"], str(data["tmp"] / "tiny"), workers=1, show_progress=False)
    with pytest.raises(ValueError, match="valid split .* empty"):
        build_gpt_datasets(data_paths=tiny, **_kwargs(data, split="98,2,0"))
    with pytest.raises(ValueError, match="split"):
        build_gpt_datasets(data_paths=tiny, **_kwargs(data, split="0,1,0"))
    with pytest.raises(ValueError, match="seq_len"):
        build_gpt_datasets(data_paths=data["words"], **_kwargs(data, seq_len=0))
    w, d = data["words"], data["digits"]
    with pytest.raises(ValueError, match="blend list"):
        parse_blend(["0.5", w, d])
    with pytest.raises(ValueError, match="blend list"):
        parse_blend(["0.5", w, "x", d])
    with pytest.raises(ValueError, match="must be > 0"):
        parse_blend(["0", w, "1", d])
    with pytest.raises(ValueError, match="no .*bin"):
        parse_blend(["1", w, "1", w + "_missing"])
    with pytest.raises(ValueError, match="empty"):
        parse_blend([])
    _, no_valid = build_gpt_datasets(data_paths=[w], **_kwargs(data, num_valid_samples=0))
    assert no_valid is None
    assert parse_blend(w) == ([w], None)
    assert parse_blend(["2", w]) == ([w], None)
    assert parse_blend([w, d]) == ([w, d], None)
    assert parse_blend([0.25, w, 0.75, d]) == ([w, d], [0.25, 0.75])
