"""Hydra configs: every preset composes and validates, every public override name lands where it should, and bad
values fail at start-up with a message naming the value and what is valid."""
from __future__ import annotations

import subprocess
import sys

import pytest

from test_train_harness import CONF_DIR, REPO

MODELS = ("tiny", "125m", "1.3b", "7b")
SPARSITY = ("dense", "l16v16", "l8v16", "phi3_small", "hybrid", "l4v4")


def _compose(*overrides):
    from hydra import compose, initialize_config_dir
    with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
        return compose("config", overrides=list(overrides))


def _plan(*overrides, world_size=1, device_type="cpu"):
    from s2megatron.training import plan_run
    return plan_run(_compose(*overrides), world_size=world_size, device_type=device_type)


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("sparsity", SPARSITY)
def test_presets_compose_and_validate(model, sparsity):
    plan = _plan(f"model={model}", f"sparsity={sparsity}")
    cfg = _compose(f"model={model}", f"sparsity={sparsity}")
    assert plan.schedule.num_layers == cfg.model.num_layers
    dense = [lay.is_dense for lay in plan.schedule.layouts]
    if sparsity == "dense":
        assert all(dense)
    elif sparsity == "phi3_small":
        assert dense == [(i + 1) % 2 == 0 for i in range(cfg.model.num_layers)]
        assert plan.schedule.layout(0).local_blocks == 16 and plan.schedule.layout(0).vert_stride == 8
    elif sparsity == "hybrid":
        assert dense[0] and dense[3] and plan.schedule.layout(2).vert_stride == 8 and not dense[1]
    else:
        assert not any(dense)


def test_default_is_a_really_sparse_layout_covering_the_context():
    from s2megatron.sparsity import density
    cfg = _compose()
    plan = _plan()
    assert (cfg.model.num_attention_heads, cfg.train.seq_len, plan.precision) == (4, 512, "fp32")
    d = density(plan.schedule.layout(0), cfg.model.num_attention_heads, cfg.train.seq_len,
                num_kv_heads=cfg.model.num_query_groups)
    assert d.union_complete and d.fraction < 0.5


def test_precision_auto_resolves_by_device():
    assert _plan(device_type="cuda").precision == "bf16"
    assert _plan(device_type="cpu").precision == "fp32"
    assert _plan("train.precision=bf16").precision == "bf16"


def test_fusions_auto_resolves_by_device():
    assert _plan(device_type="cuda").fusions is True
    assert _plan(device_type="cpu").fusions is False
    assert _plan("train.fusions=false", device_type="cuda").fusions is False
    assert _plan("train.fusions=true", device_type="cuda").fusions is True


def test_public_override_names():
    cfg = _compose("model=125m", "sparsity=l8v16", "parallel.tp=2", "parallel.pp=2", "parallel.sp=true",
                   "train.steps=7", "train.seq_len=1024", "train.micro_batch=2", "train.global_batch=16",
                   "train.out_dir=/tmp/x", "train.log_interval=3", "train.save_interval=5", "train.eval_interval=6",
                   "train.seed=9", "attention.backend=reference", "sparsity.default.block_size=32",
                   "sparsity.default.local_blocks=4", "sparsity.default.vert_stride=8",
                   "sparsity.default.head_sliding=false", "sparsity.default.sliding_offset=2",
                   "sparsity.default.num_dense_heads=1", "sparsity.default.per_kv_head=true",
                   "+sparsity.layers.3=dense", "+sparsity.layers.5.vert_stride=2")
    assert cfg.model.hidden_size == 768 and cfg.parallel.sp is True
    t = cfg.train
    assert (t.steps, t.seq_len, t.micro_batch, t.global_batch, t.out_dir, t.log_interval, t.save_interval,
            t.eval_interval, t.seed) == (7, 1024, 2, 16, "/tmp/x", 3, 5, 6, 9)
    from s2megatron.training import plan_run
    plan = plan_run(cfg, world_size=8, device_type="cpu")
    assert (plan.tp, plan.pp, plan.dp, plan.num_microbatches) == (2, 2, 2, 4)
    lay = plan.schedule.layout(0)
    assert (lay.block_size, lay.local_blocks, lay.vert_stride, lay.head_sliding, lay.sliding_offset,
            lay.num_dense_heads, lay.per_kv_head) == (32, 4, 8, False, 2, 1, True)
    assert plan.schedule.layout(3).is_dense and plan.schedule.layout(5).vert_stride == 2
    assert plan.schedule.layout(5).block_size == 32   # per-layer fields merge onto the default


@pytest.mark.parametrize("overrides, world_size, needles", [
    (["train.global_batch=10", "train.micro_batch=4"], 1,
     ["train.global_batch=10", "micro_batch * dp = 4 * 1", "multiples of 4"]),
    (["train.global_batch=8", "train.micro_batch=4"], 4, ["train.global_batch=8", "4 * 4 = 16"]),
    (["parallel.tp=3"], 3, ["parallel.tp=3", "num_attention_heads=4", "valid tp: [1, 2, 4]"]),
    (["parallel.tp=2"], 3, ["world size 3", "tp * parallel.pp = 2 * 1"]),
    (["parallel.pp=3"], 3, ["num_layers=4", "pp * vpp = 3"]),
    (["parallel.tp=2", "parallel.sp=true", "train.seq_len=511"], 2, ["train.seq_len=511", "parallel.tp=2"]),
    (["parallel.sp=true"], 1, ["parallel.sp=true needs parallel.tp > 1"]),
    (["model.num_query_groups=4", "model.num_attention_heads=12", "parallel.tp=3"], 3,
     ["parallel.tp=3 and model.num_query_groups=4"]),
    (["attention.backend=flash"], 1, ["attention.backend='flash'", "auto | triton | reference | sdpa"]),
    (["attention.backend=sdpa"], 1, ["attention.backend=sdpa", "sparse"]),
    (["attention.backend=triton"], 1, ["attention.backend=triton", "CUDA"]),
    (["train.precision=fp8"], 1, ["train.precision='fp8'", "auto | bf16 | fp16 | fp32"]),
    (["train.fusions=some"], 1, ["train.fusions='some'", "auto | true | false"]),
    (["train.fusions=true"], 1, ["train.fusions=true needs CUDA"]),
    (["train.recompute=everything"], 1, ["train.recompute='everything'", "selective | full"]),
    (["train.steps=0"], 1, ["train.steps=0", "integer >= 1"]),
    (["sparsity.default.vert_stride=0"], 1, ["sparsity", "vert_stride=0", "integer >= 1"]),
    (["sparsity.default.block_size=24"], 1, ["block_size=24", "(16, 32, 64, 128)"]),
    (["+sparsity.layers.9=dense"], 1, ["sparsity.layers.9", "0..3"]),
    (["parallel.vpp=2"], 1, ["parallel.vpp=2", "pp > 1"]),
    (["parallel.pp=2", "parallel.vpp=2", "train.global_batch=8", "train.micro_batch=8"], 2,
     ["interleaved", "multiple of parallel.pp=2"]),
    (["optim.min_lr=1.0", "optim.lr=0.1"], 1, ["optim.min_lr=1.0", "<= 0.1"]),
    (["eval.passkey.context_lengths=[1024]"], 1, ["eval.passkey.context_lengths", "1..train.seq_len=512"]),
    (["data.kind=web"], 1, ["data.kind='web'", "builtin | indexed"]),
])
def test_bad_values_raise_clear_errors(overrides, world_size, needles):
    from s2megatron.training import ConfigError
    with pytest.raises(ConfigError) as err:
        _plan(*overrides, world_size=world_size)
    for needle in needles:
        assert needle in str(err.value), (needle, str(err.value))


def test_all_problems_reported_together():
    from s2megatron.training import ConfigError
    with pytest.raises(ConfigError) as err:
        _plan("train.steps=-1", "attention.backend=x", "train.global_batch=3", "train.micro_batch=2")
    msg = str(err.value)
    assert "train.steps=-1" in msg and "attention.backend='x'" in msg and "train.global_batch=3" in msg


def test_unknown_key_is_rejected_by_hydra():
    from hydra.errors import ConfigCompositionException
    with pytest.raises(ConfigCompositionException, match="train.setps"):
        _compose("train.setps=5")


def test_train_py_rejects_bad_config_before_heavy_work(tmp_path):
    proc = subprocess.run([sys.executable, "train.py", "train.global_batch=7", "train.micro_batch=2",
                           f"train.out_dir={tmp_path}/run"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "train.global_batch=7 is not divisible by train.micro_batch * dp = 2 * 1 = 2" in proc.stderr
    assert not (tmp_path / "run" / "ckpt").exists() and "megatron" not in proc.stderr.lower()
    # Hydra's own files went into train.out_dir (hydra.run.dir), not into an outputs/<date> folder
    assert (tmp_path / "run" / ".hydra" / "overrides.yaml").is_file()


def test_hydra_keeps_cwd():
    proc = subprocess.run([sys.executable, "train.py", "--cfg", "hydra"], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "dir: ${train.out_dir}\n" in proc.stdout and "chdir: false" in proc.stdout


@pytest.mark.parametrize("path", ["train/default.yaml", "optim/adamw.yaml", "attention/default.yaml"])
def test_every_field_is_documented(path):
    undocumented = [line.split(":")[0] for line in (REPO / "conf" / path).read_text().splitlines()
                    if line and not line.startswith((" ", "#")) and "#" not in line]
    assert not undocumented, f"conf/{path}: no comment on {undocumented}"
