"""Checkpoint crash safety: an interrupted save never becomes "latest", corruption is detected and named with the
previous checkpoint offered (or used with train.resume_fallback), and loading never runs pickled code."""
from __future__ import annotations

import json
import os
import shutil

import pytest

from test_train_harness import data_cache, train

STEPS = ["train.steps=4", "train.save_interval=2"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return data_cache(tmp_path_factory.getbasetemp())


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory, cache):
    """A 4-step run with complete checkpoints at steps 2 and 4."""
    out = tmp_path_factory.mktemp("saved") / "run"
    result = train(STEPS, out_dir=out, cache_dir=cache)
    assert sorted(os.listdir(out / "ckpt")) == ["iter_0000002", "iter_0000004", "latest"]
    return out, result


@pytest.fixture
def run_copy(saved_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(saved_run[0], out)
    return out


def _manager(out):
    from s2megatron.training.checkpoint import CheckpointManager
    return CheckpointManager(str(out / "ckpt"))


def test_interrupted_save_leaves_previous_checkpoint_latest_and_loadable(tmp_path, cache, monkeypatch):
    from megatron.core import dist_checkpointing

    real_save = dist_checkpointing.save
    calls = {"n": 0}

    def crash_on_second_save(state, directory, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            with open(os.path.join(directory, "__0_0.distcp"), "wb") as f:   # half-written shard
                f.write(b"\0" * 1000)
            raise RuntimeError("simulated crash during save")
        return real_save(state, directory, **kwargs)

    monkeypatch.setattr(dist_checkpointing, "save", crash_on_second_save)
    out = tmp_path / "run"
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(STEPS, out_dir=out, cache_dir=cache)
    ckpt = out / "ckpt"
    assert (ckpt / "latest").read_text().strip() == "iter_0000002"
    assert (ckpt / "iter_0000004.tmp").is_dir() and not (ckpt / "iter_0000004").exists()
    assert _manager(out).find_resume() == str(ckpt / "iter_0000002")

    monkeypatch.setattr(dist_checkpointing, "save", real_save)
    result = train(STEPS, out_dir=out, cache_dir=cache)   # the next run resumes from it and finishes
    assert result.resumed_from == str(ckpt / "iter_0000002") and result.final_step == 4
    assert sorted(os.listdir(ckpt)) == ["iter_0000002", "iter_0000004", "latest"]   # stale .tmp removed


@pytest.mark.parametrize("damage, problem", [("flip", "sha256 differs"), ("truncate", "truncated"),
                                             ("delete", "missing")])
def test_corrupt_checkpoint_is_named_and_previous_offered(run_copy, damage, problem):
    from s2megatron.training.checkpoint import CheckpointCorruptError

    shard = run_copy / "ckpt" / "iter_0000004" / "__0_0.distcp"
    data = bytearray(shard.read_bytes())
    if damage == "flip":
        data[len(data) // 2] ^= 0xFF
        shard.write_bytes(bytes(data))
    elif damage == "truncate":
        shard.write_bytes(bytes(data[: len(data) // 2]))
    else:
        shard.unlink()
    previous = run_copy / "ckpt" / "iter_0000002"
    with pytest.raises(CheckpointCorruptError) as err:
        _manager(run_copy).find_resume()
    msg = str(err.value)
    assert str(shard) in msg and problem in msg
    assert f"the previous complete checkpoint is {previous}" in msg and f"train.resume_from={previous}" in msg
    assert _manager(run_copy).find_resume(fallback=True) == str(previous)


def test_corrupt_latest_through_the_loop(run_copy, cache):
    from s2megatron.training.checkpoint import CheckpointCorruptError

    meta = run_copy / "ckpt" / "iter_0000004" / "train_state.json"
    meta.write_text(meta.read_text().replace('"iteration": 4', '"iteration": 9'))
    with pytest.raises(CheckpointCorruptError, match="train_state.json"):
        train(["train.steps=6"], out_dir=run_copy, cache_dir=cache)
    result = train(["train.steps=6", "train.resume_fallback=true"], out_dir=run_copy, cache_dir=cache)
    assert result.resumed_from.endswith("iter_0000002") and result.first_step == 3


def test_resume_from_names_a_checkpoint(run_copy, saved_run, cache):
    result = train(STEPS + ["train.resume_from=iter_0000002"], out_dir=run_copy, cache_dir=cache)
    assert result.resumed_from.endswith("iter_0000002")
    assert result.losses == pytest.approx(saved_run[1].losses[2:], abs=1e-6, rel=0)


def test_no_previous_checkpoint_says_so(run_copy):
    from s2megatron.training.checkpoint import CheckpointCorruptError

    shutil.rmtree(run_copy / "ckpt" / "iter_0000002")
    (run_copy / "ckpt" / "iter_0000004" / "manifest.json").write_text("{not json")
    with pytest.raises(CheckpointCorruptError, match="no previous complete checkpoint"):
        _manager(run_copy).find_resume()


class _Payload:
    """Pickles to a call of Path.touch: code that must never run at load time."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        from pathlib import Path
        return (Path.touch, (Path(self.marker),))


def test_loading_never_unpickles_code(run_copy, cache, tmp_path):
    import hashlib

    import torch

    marker = tmp_path / "pwned"
    ckpt = run_copy / "ckpt" / "iter_0000004"
    common = ckpt / "common.pt"
    state = torch.load(common, weights_only=True)
    state["payload"] = _Payload(str(marker))
    torch.save(state, common)
    # a thorough attacker also fixes the manifest, so the load itself must refuse the object
    manifest = json.loads((ckpt / "manifest.json").read_text())
    manifest["files"]["common.pt"] = {"size": common.stat().st_size,
                                      "sha256": hashlib.sha256(common.read_bytes()).hexdigest()}
    (ckpt / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(Exception, match="(?i)weights.only|unpickl"):
        train(["train.steps=6"], out_dir=run_copy, cache_dir=cache)
    assert not marker.exists()
    assert torch.load is torch.serialization.load   # the weights-only guard is gone again


def test_weights_only_guard_overrides_callers(tmp_path):
    """dist_checkpointing's DCP planner calls torch.load(..., weights_only=False); the guard wins."""
    import torch

    from s2megatron.training.checkpoint import weights_only_torch_load

    marker, path = tmp_path / "pwned", tmp_path / "obj.pt"
    torch.save({"x": _Payload(str(marker))}, path)
    with weights_only_torch_load(), pytest.raises(Exception, match="(?i)weights.only"):
        torch.load(path, weights_only=False)
    assert not marker.exists()
