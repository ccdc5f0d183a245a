"""The training loop on the CPU: outputs, falling loss, exact resume, graceful stop on a signal."""
from __future__ import annotations

import json
import math
import os
import signal

import pytest

from test_train_harness import data_cache, read_metrics, train


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return data_cache(tmp_path_factory.getbasetemp())


def test_short_run_writes_every_output_and_loss_falls(tmp_path, cache):
    out = tmp_path / "run"
    result = train(["train.steps=20", "train.eval_interval=10", "train.save_interval=10", "train.save_on_exit=true",
                    "eval.passkey.enabled=true", "eval.passkey.context_lengths=[256]", "eval.passkey.depths=[0,1]",
                    "eval.passkey.samples_per_cell=1", "eval.passkey.num_distractors=3", "train.seq_len=256",
                    "train.micro_batch=2", "train.global_batch=2"],
                   out_dir=out, cache_dir=cache)
    assert result.final_step == 20 and len(result.losses) == 20 and len(result.step_times_s) == 20
    first, last = result.losses[0], sum(result.losses[-5:]) / 5
    assert last < first - 1.0, f"loss did not fall: first {first:.3f}, last five {last:.3f}"

    records = read_metrics(out)
    train_records = [r for r in records if r["kind"] == "train"]
    assert [r["step"] for r in train_records] == list(range(1, 21))
    for r in train_records:
        for key in ("step", "loss", "lr", "grad_norm", "tokens_per_s", "mfu", "mem_gib"):
            assert key in r, key
        assert r["mfu"] is None and r["tokens_per_s"] > 0 and r["mem_gib"] > 0
    assert train_records[0]["lr"] == pytest.approx(3e-3 / 2)            # warmup: step 1 of 2
    assert [r["step"] for r in records if r["kind"] == "valid"] == [10, 20]
    assert any(r["kind"] == "passkey" for r in records)

    tb_files = os.listdir(out / "tb")
    assert any(f.startswith("events.out.tfevents") for f in tb_files)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(out / "tb"))
    acc.Reload()
    assert len(acc.Scalars("train/loss")) == 20 and "valid/loss" in acc.Tags()["scalars"]

    from omegaconf import OmegaConf
    saved = OmegaConf.load(out / "config.yaml")
    assert saved.train.steps == 20 and saved.sparsity.default.vert_stride == 2
    assert (out / "ckpt" / "latest").read_text().strip() == "iter_0000020"
    assert sorted(os.listdir(out / "ckpt")) == ["iter_0000010", "iter_0000020", "latest"]
    assert (out / "passkey" / "passkey.md").is_file() and (out / "passkey" / "passkey.json").is_file()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["final_step"] == 20 and summary["validation"]["loss"] > 0


def test_resume_continues_the_same_loss_curve(tmp_path, cache):
    common = ["train.steps=8", "train.save_interval=4"]
    full = train(common, out_dir=tmp_path / "full", cache_dir=cache)
    half = train(["train.steps=4", "train.save_interval=4", "optim.decay_steps=8"], out_dir=tmp_path / "split",
                 cache_dir=cache)
    resumed = train(common, out_dir=tmp_path / "split", cache_dir=cache)
    assert resumed.resumed_from.endswith("iter_0000004") and resumed.first_step == 5
    assert half.losses == pytest.approx(full.losses[:4], abs=0, rel=0)
    # model, optimizer moments, LR schedule and data position all continue: identical fp32 numbers
    assert resumed.losses == pytest.approx(full.losses[4:], abs=1e-6, rel=0)
    assert resumed.grad_norms == pytest.approx(full.grad_norms[4:], abs=1e-6, rel=1e-6)
    steps = [r["step"] for r in read_metrics(tmp_path / "split") if r["kind"] == "train"]
    assert steps == list(range(1, 9))   # metrics.jsonl continues across the restart


def test_signal_finishes_the_step_saves_and_exits(tmp_path, cache, monkeypatch):
    from s2megatron.training import step as step_module

    real_step = step_module.train_step
    calls = {"n": 0}

    def step_then_signal(*args, **kwargs):
        out = real_step(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 3:
            os.kill(os.getpid(), signal.SIGTERM)   # arrives mid-run, as from a scheduler
        return out

    monkeypatch.setattr(step_module, "train_step", step_then_signal)
    out = tmp_path / "sig"
    result = train(["train.steps=50", "train.save_on_exit=true"], out_dir=out, cache_dir=cache)
    assert result.stopped_by_signal and result.final_step == 3
    assert (out / "ckpt" / "latest").read_text().strip() == "iter_0000003"
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL   # handler removed again


def test_nan_gradients_stop_before_the_update_and_keep_the_checkpoint(tmp_path, cache, monkeypatch):
    import torch

    from s2megatron.training import step as step_module

    real_step = step_module.train_step
    calls = {"n": 0}
    seen = {}

    def nan_loss(loss_mask, output_tensor):
        loss_sum, num_tokens, report = step_module.lm_loss(loss_mask, output_tensor)
        return loss_sum * float("nan"), num_tokens, report

    def step_with_nan_on_the_fifth(model, optimizer, *args, **kwargs):
        calls["n"] += 1
        seen["overlap"] = model[0].ddp_config.overlap_grad_reduce  # one data-parallel rank: nothing to overlap
        if calls["n"] != 5:
            return real_step(model, optimizer, *args, **kwargs)
        before = [p.detach().clone() for chunk in model for p in chunk.parameters()]
        kwargs["forward_step"] = step_module.make_forward_step(kwargs["device"], nan_loss)
        try:
            return real_step(model, optimizer, *args, **kwargs)
        finally:
            after = [p.detach() for chunk in model for p in chunk.parameters()]
            seen["unchanged"] = all(torch.equal(a, b) for a, b in zip(before, after))
            seen["grads_nan"] = any(torch.isnan(buf.grad_data).any().item() for chunk in model
                                    for buf in chunk.buffers)

    monkeypatch.setattr(step_module, "train_step", step_with_nan_on_the_fifth)
    out = tmp_path / "nan"
    with pytest.raises(FloatingPointError, match="gradients are NaN or Inf at step 5"):
        train(["train.steps=8", "train.save_interval=2"], out_dir=out, cache_dir=cache)
    assert seen == {"overlap": False, "unchanged": True, "grads_nan": True}
    assert (out / "ckpt" / "latest").read_text().strip() == "iter_0000004"
    monkeypatch.setattr(step_module, "train_step", real_step)
    resumed = train(["train.steps=6"], out_dir=out, cache_dir=cache)
    assert resumed.first_step == 5 and all(map(math.isfinite, resumed.losses))


def test_activation_recompute_switches_give_the_same_steps(tmp_path, cache):
    base = train(["train.steps=3"], out_dir=tmp_path / "plain", cache_dir=cache)
    for recompute in ("selective", "full"):
        again = train(["train.steps=3", f"train.recompute={recompute}"], out_dir=tmp_path / recompute,
                      cache_dir=cache)
        assert again.losses == pytest.approx(base.losses, rel=1e-6, abs=0), recompute
        assert again.grad_norms == pytest.approx(base.grad_norms, rel=1e-5, abs=0), recompute


def test_lr_schedule_warmup_cosine_and_param_groups():
    from s2megatron.training.lr_schedule import LRSchedule

    sched = LRSchedule(lr=1.0, min_lr=0.1, warmup_steps=4, decay_steps=14, weight_decay=0.5)
    assert [sched.lr_at(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert sched.lr_at(9) == pytest.approx(0.55)             # half-way through the cosine: (peak + floor) / 2
    assert sched.lr_at(14) == sched.lr_at(100) == 0.1
    assert LRSchedule(1.0, 0.1, 0, 10, "linear").lr_at(5) == pytest.approx(0.55)
    assert LRSchedule(1.0, 0.1, 2, 10, "constant").lr_at(7) == 1.0

    class Opt:
        param_groups = [{"wd_mult": 1.0, "lr_mult": 1.0}, {"wd_mult": 0.0, "lr_mult": 0.5, "max_lr": 2.0}]
    assert sched.apply(Opt, 3) == 1.0
    assert [(g["lr"], g["weight_decay"]) for g in Opt.param_groups] == [(1.0, 0.5), (1.0, 0.0)]


def test_train_py_multirun_gives_each_job_its_own_out_dir(tmp_path, cache):
    import subprocess
    import sys

    from test_train_harness import REPO, SMALL

    out = tmp_path / "sweep"
    proc = subprocess.run([sys.executable, "train.py", "--multirun", "train.steps=1,2", *SMALL,
                           f"data.cache_dir={cache}", f"train.out_dir={out}"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for job, steps in ((0, 1), (1, 2)):
        records = read_metrics(out / str(job))
        assert [r["step"] for r in records if r["kind"] == "train"] == list(range(1, steps + 1))
        assert (out / str(job) / ".hydra" / "overrides.yaml").is_file()
