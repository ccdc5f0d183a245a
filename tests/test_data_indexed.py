"""Tokenizing documents into megatron-core indexed datasets."""

import io
import os

import numpy as np
import pytest

from s2megatron.data import indexed as indexed_mod
from s2megatron.data.indexed import build_indexed_dataset, indexed_dataset_stats, token_dtype
from s2megatron.data.progress import Progress
from s2megatron.data.testing import make_documents, write_jsonl
from s2megatron.data.tokenizer import S2Tokenizer, train_sentencepiece


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tok")
    corpus = write_jsonl(str(tmp / "train.jsonl"), make_documents(150, seed=5))
    return S2Tokenizer(train_sentencepiece([corpus], str(tmp / "tok"), 350, num_threads=1))


def _read_documents(prefix):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(prefix)
    docs = []
    for d in range(len(ds.document_indices) - 1):
        beg, end = ds.document_indices[d], ds.document_indices[d + 1]
        docs.append(np.concatenate([ds[i] for i in range(beg, end)]).tolist())
    return ds, docs


@pytest.mark.parametrize("workers", [1, 2])
def test_round_trip_against_direct_tokenization(tmp_path, tok, workers):
    docs = make_documents(70, seed=11)
    jsonl_docs, txt_doc = docs[:60], docs[60]
    inputs = [write_jsonl(str(tmp_path / "a.jsonl"), jsonl_docs[:25] + [""] + jsonl_docs[25:])]
    (tmp_path / "b.txt").write_text(txt_doc, encoding="utf-8")
    inputs.append(str(tmp_path / "b.txt"))
    inputs.append(write_jsonl(str(tmp_path / "c.jsonl"), docs[61:], text_key="body"))

    # Files with different text keys are built separately, then checked together.
    prefix = build_indexed_dataset(inputs[:2], tok, str(tmp_path / "out" / "ds"),
                                   workers=workers, docs_per_task=4, show_progress=False)
    ds, got = _read_documents(prefix)
    expected_texts = jsonl_docs + [txt_doc]  # the empty document is skipped
    assert ds.index.dtype == np.uint16
    assert len(got) == len(expected_texts) == ds.sequence_lengths.shape[0]
    for text, ids in zip(expected_texts, got):
        assert ids == tok.tokenize(text) + [tok.eod]
    assert indexed_dataset_stats(prefix) == (len(got), sum(map(len, got)))

    prefix2 = build_indexed_dataset([inputs[2]], tok.model_path, str(tmp_path / "ds_body"),
                                    text_key="body", workers=workers, append_eod=False,
                                    show_progress=False)
    _, got2 = _read_documents(prefix2)
    assert got2 == [tok.tokenize(t) for t in docs[61:]]
    leftovers = [n for n in os.listdir(tmp_path / "out") if ".tmp" in n]
    assert leftovers == []


def test_failure_mid_build_leaves_no_final_files(tmp_path, tok, monkeypatch):
    corpus = write_jsonl(str(tmp_path / "c.jsonl"), make_documents(40, seed=2))
    real = indexed_mod._encode_chunk
    calls = {"n": 0}

    def failing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("simulated crash")
        return real(*args, **kwargs)

    monkeypatch.setattr(indexed_mod, "_encode_chunk", failing)
    with pytest.raises(RuntimeError, match="simulated crash"):
        build_indexed_dataset([corpus], tok, str(tmp_path / "ds"), workers=1, docs_per_task=5,
                              show_progress=False)
    assert calls["n"] == 3
    assert sorted(os.listdir(tmp_path)) == ["c.jsonl"]


def test_failure_keeps_previous_complete_dataset(tmp_path, tok, monkeypatch):
    corpus = write_jsonl(str(tmp_path / "c.jsonl"), make_documents(20, seed=4))
    prefix = build_indexed_dataset([corpus], tok, str(tmp_path / "ds"), workers=1,
                                   show_progress=False)
    before = {s: (tmp_path / f"ds{s}").read_bytes() for s in (".bin", ".idx")}

    def broken_finalize(self, idx_path):
        raise OSError("disk full")

    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    monkeypatch.setattr(IndexedDatasetBuilder, "finalize", broken_finalize)
    bigger = write_jsonl(str(tmp_path / "d.jsonl"), make_documents(30, seed=6))
    with pytest.raises(OSError, match="disk full"):
        build_indexed_dataset([bigger], tok, prefix, workers=1, show_progress=False)
    assert {s: (tmp_path / f"ds{s}").read_bytes() for s in (".bin", ".idx")} == before
    assert sorted(os.listdir(tmp_path)) == ["c.jsonl", "d.jsonl", "ds.bin", "ds.idx"]


def test_token_dtype_threshold():
    assert token_dtype(4096) is np.uint16
    assert token_dtype(65499) is np.uint16
    assert token_dtype(65500) is np.int32
    assert token_dtype(128256) is np.int32


def test_bad_arguments(tmp_path, tok):
    corpus = write_jsonl(str(tmp_path / "c.jsonl"), ["x"])
    with pytest.raises(ValueError, match="workers"):
        build_indexed_dataset([corpus], tok, str(tmp_path / "ds"), workers=-1)
    with pytest.raises(ValueError, match="does not exist"):
        build_indexed_dataset([corpus], str(tmp_path / "none.model"), str(tmp_path / "ds"))
    empty = write_jsonl(str(tmp_path / "e.jsonl"), ["", ""])
    with pytest.raises(ValueError, match="no non-empty documents"):
        build_indexed_dataset([empty], tok, str(tmp_path / "ds"), workers=1, show_progress=False)
    with pytest.raises(ValueError, match="no indexed dataset"):
        indexed_dataset_stats(str(tmp_path / "ds"))


def test_progress_line_reports_rates_and_eta():
    stream = io.StringIO()
    p = Progress(total_bytes=1000, label="tokenize", min_interval_s=0.0, stream=stream)
    p.update(docs=10, tokens=500, num_bytes=250)
    p.close()
    lines = stream.getvalue().strip().splitlines()
    assert len(lines) == 2
    for key in ("tokenize", "25.0%", "10 docs", "500 tokens", "docs/s", "tokens/s", "ETA"):
        assert key in lines[-1]
    quiet = io.StringIO()
    Progress(100, enabled=False, stream=quiet).update(1, 1, 1)
    assert quiet.getvalue() == ""
