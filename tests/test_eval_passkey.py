"""Passkey retrieval evaluation: candidate batches, likelihood ranking, the grid table, and the checkpoint CLI."""
from __future__ import annotations

import json

import pytest
import torch

from test_train_harness import data_cache, train

GRID = ["eval.passkey.context_lengths=[200,256]", "eval.passkey.depths=[0,0.5,1]", "eval.passkey.samples_per_cell=1",
        "eval.passkey.num_distractors=3"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return data_cache(tmp_path_factory.getbasetemp())


@pytest.fixture(scope="module")
def tokenizer(cache):
    from s2megatron.data import S2Tokenizer, ensure_builtin_data
    data = ensure_builtin_data(cache, 512, corpus_bytes=300000, show_progress=False)
    return S2Tokenizer(data.tokenizer_model)


def _answer_tokens(batch, row):
    mask = batch["loss_mask"][row].bool()
    return batch["labels"][row][mask].tolist(), int(mask.nonzero()[0])


def retrieval_oracle(batch):
    """Scores a row 0 if its answer tokens occur in the prompt, else -10: a perfect retriever that does not know
    which row is the true one."""
    scores = []
    for row in range(batch["tokens"].shape[0]):
        answer, start = _answer_tokens(batch, row)
        prompt = batch["tokens"][row][: start + 1].tolist()
        found = any(prompt[i:i + len(answer)] == answer for i in range(len(prompt) - len(answer) + 1))
        scores.append(0.0 if found else -10.0)
    return torch.tensor(scores)


def test_candidates_hold_prompt_plus_each_answer(tokenizer):
    from s2megatron.data.passkey import make_passkey_sample
    from s2megatron.eval.passkey import build_candidates

    sample = make_passkey_sample(tokenizer, 200, 0.5, passkey=31415)
    batch = build_candidates(sample, [27182, 16180], tokenizer, pad_id=tokenizer.pad, pad_to_multiple=16)
    n_prompt, n_answer = len(sample.prompt_ids), len(sample.answer_ids)
    assert batch["tokens"].shape == (3, 208) and batch["tokens"].shape[1] % 16 == 0
    for row, key in enumerate((31415, 27182, 16180)):
        answer, start = _answer_tokens(batch, row)
        assert tokenizer.detokenize(answer) == f" {key}" and start == n_prompt - 1
        assert batch["tokens"][row][:n_prompt].tolist() == sample.prompt_ids   # inputs: the prompt, then the answer
        assert batch["labels"][row][: n_prompt - 1].tolist() == sample.prompt_ids[1:]
        assert (batch["tokens"][row][n_prompt + n_answer - 1:] == tokenizer.pad).all()   # pads only after
    assert batch["loss_mask"].sum(1).tolist() == [n_answer] * 3
    with pytest.raises(ValueError, match="exceeds the model's 100"):
        build_candidates(sample, [27182], tokenizer, pad_id=tokenizer.pad, max_len=100)


def test_ranking_and_grid(tokenizer, tmp_path):
    from s2megatron.eval.passkey import evaluate_passkey, write_report

    kwargs = dict(context_lengths=[200, 256], depths=[0.0, 0.5, 1.0], samples_per_cell=2, num_distractors=4)
    perfect = evaluate_passkey(retrieval_oracle, tokenizer, **kwargs)
    assert perfect.accuracy == 1.0 and perfect.chance == pytest.approx(0.2)
    assert len(perfect.cells) == 6 and all(c.mean_rank == 1.0 for c in perfect.cells)
    tied = evaluate_passkey(lambda b: torch.zeros(b["tokens"].shape[0]), tokenizer, **kwargs)
    assert tied.accuracy == 0.0                              # ties are failures, never lucky hits
    inverted = evaluate_passkey(lambda b: -retrieval_oracle(b), tokenizer, **kwargs)
    assert inverted.accuracy == 0.0 and all(c.mean_rank == 5.0 for c in inverted.cells)

    paths = write_report(perfect, str(tmp_path), title="t")
    table = (tmp_path / "passkey.md").read_text()
    assert "| context tokens \\ depth | 0 | 0.5 | 1 | mean |" in table
    assert "| 200 | 100% (r1.0) | 100% (r1.0) | 100% (r1.0) | 100% |" in table and "| 256 |" in table
    data = json.loads((tmp_path / "passkey.json").read_text())
    assert data["context_lengths"] == [200, 256] and data["depths"] == [0.0, 0.5, 1.0] and len(data["cells"]) == 6
    try:
        import matplotlib  # noqa: F401
        assert (tmp_path / "passkey.png").stat().st_size > 0
    except ImportError:
        assert "heatmap" not in paths


def test_cli_on_a_checkpoint_matches_the_end_of_training_eval(tmp_path, cache):
    from s2megatron.eval.passkey import main

    out = tmp_path / "run"
    train(["train.steps=2", "train.seq_len=256", "train.micro_batch=2", "train.global_batch=2",
           "train.save_on_exit=true", "eval.passkey.enabled=true"] + GRID, out_dir=out, cache_dir=cache)
    in_training = json.loads((out / "passkey" / "passkey.json").read_text())
    assert len(in_training["cells"]) == 6

    result = main([f"ckpt_dir={out}", f"out_dir={tmp_path}/cli"] + GRID)   # a run dir: its latest checkpoint
    from_cli = json.loads((tmp_path / "cli" / "passkey.json").read_text())
    assert result["context_lengths"] == [200, 256] and (tmp_path / "cli" / "passkey.md").is_file()
    assert [c["ranks"] for c in from_cli["cells"]] == [c["ranks"] for c in in_training["cells"]]
