"""Resharding through the training loop: a checkpoint saved at TP1 x PP1 resumes at TP2, at PP2 and at PP2 with
virtual stages (2 gloo processes), and the loss curve continues; data parallelism with the distributed optimizer
matches the single-process run and resumes exactly. One spawn runs every case (process start is the slow part)."""
from __future__ import annotations

import os

import pytest

from dist_utils import run_gloo
from test_train_harness import data_cache, train

STEPS = ["train.steps=4", "train.save_interval=2"]
LOSS_RTOL = 1e-4    # fp32; different reduction orders across splits


def _worker(rank, world_size, reference_ckpt, cache, base):
    """Every case on 2 ranks; returns {case: losses of the steps run}."""
    results = {}
    for case, overrides in (("tp2", ["parallel.tp=2"]),
                            ("pp2", ["parallel.pp=2"]),
                            ("pp2_vpp2", ["parallel.pp=2", "parallel.vpp=2", "train.micro_batch=2"])):
        res = train(STEPS + overrides + [f"train.resume_from={reference_ckpt}"], out_dir=f"{base}/{case}",
                    cache_dir=cache)
        assert res.resumed_from == reference_ckpt and res.first_step == 3
        results[case] = res.losses
    dp2 = ["parallel.distributed_optimizer=true", "train.micro_batch=2"]
    results["dp2_distopt"] = train(STEPS + dp2, out_dir=f"{base}/dp2", cache_dir=cache).losses
    resumed = train(STEPS + dp2 + [f"train.resume_from={base}/dp2/ckpt/iter_0000002"], out_dir=f"{base}/dp2_resumed",
                    cache_dir=cache)
    results["dp2_distopt_resumed"] = resumed.losses
    # the distributed optimizer's state reshards too: DP2 -> TP2 (dp 1)
    results["dp2_distopt_to_tp2"] = train(
        STEPS + dp2 + ["parallel.tp=2", f"train.resume_from={base}/dp2/ckpt/iter_0000002"],
        out_dir=f"{base}/dp2_to_tp2", cache_dir=cache).losses
    return results


def test_resume_across_tensor_and_pipeline_splits(tmp_path_factory, tmp_path):
    cache = data_cache(tmp_path_factory.getbasetemp())
    reference = train(STEPS, out_dir=tmp_path / "tp1", cache_dir=cache)   # TP1 x PP1, checkpoint at step 2
    ckpt = str(tmp_path / "tp1" / "ckpt" / "iter_0000002")
    assert os.path.isdir(ckpt)

    results = run_gloo(_worker, world_size=2, args=(ckpt, cache, str(tmp_path)), timeout_s=400)
    assert results[0] == results[1]   # every rank reports the same global loss
    got = results[0]
    for case in ("tp2", "pp2", "pp2_vpp2"):
        assert got[case] == pytest.approx(reference.losses[2:], rel=LOSS_RTOL, abs=0), case
    assert got["dp2_distopt"] == pytest.approx(reference.losses, rel=LOSS_RTOL, abs=0)
    assert got["dp2_distopt_resumed"] == pytest.approx(got["dp2_distopt"][2:], rel=0, abs=1e-6)
    assert got["dp2_distopt_to_tp2"] == pytest.approx(got["dp2_distopt"][2:], rel=LOSS_RTOL, abs=0)
