"""Launchers in launch/: shell lint, the exact commands their --dry-run prints, and the sweep expansion.

CPU-only: GPU counts, SLURM variables and `scontrol` are faked per test; nothing is launched.
"""

from __future__ import annotations

import os
import shlex
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from script_modules import load_script

REPO_ROOT = Path(__file__).resolve().parents[1]
LAUNCH_DIR = REPO_ROOT / "launch"
TRAIN = str(REPO_ROOT / "train.py")
SHELL_SCRIPTS = sorted([*LAUNCH_DIR.glob("*.sh"), *LAUNCH_DIR.glob("*.sbatch")])
# Scripts that are run (not sourced) must stop on the first error.
EXECUTED_SCRIPTS = ["run_single.sh", "run_multi.sh", "slurm.sbatch"]
# Variables a launcher reads; cleared so the host's environment cannot leak into a test.
LAUNCH_VARS = (
    "GPUS_PER_NODE", "CUDA_VISIBLE_DEVICES", "NNODES", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT",
    "RDZV_ID", "TORCHRUN", "S2_ROOT", "S2_TRAIN_SCRIPT", "SRUN_EXTRA_ARGS",
)


sweep = load_script(LAUNCH_DIR / "sweep.py", "s2_launch_sweep")


def _fake_bin(tmp_path: Path, name: str, body: str) -> Path:
    """Write an executable `name` into tmp_path/bin and return that directory."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    path = bin_dir / name
    path.write_text("#!/usr/bin/env bash\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return bin_dir


def _run(script: str, *args: str, env: dict[str, str], check: bool = True, cwd: Path | None = None):
    clean = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS and not k.startswith("SLURM_")}
    clean.update(env)
    result = subprocess.run(
        ["bash", str(LAUNCH_DIR / script), *args],
        env=clean, capture_output=True, text=True, timeout=60, cwd=cwd or REPO_ROOT,
    )
    if check:
        assert result.returncode == 0, result.stderr
    return result


def _dry_run_lines(script: str, *args: str, env: dict[str, str], cwd: Path | None = None) -> list[str]:
    out = _run(script, "--dry-run", *args, env=env, cwd=cwd).stdout
    return out.splitlines()


# --- shell lint -------------------------------------------------------------------------------------


def test_expected_scripts_exist():
    names = {p.name for p in SHELL_SCRIPTS}
    assert {"env.sh", "lib.sh", *EXECUTED_SCRIPTS} <= names


@pytest.mark.parametrize("script", SHELL_SCRIPTS, ids=lambda p: p.name)
def test_bash_syntax(script):
    result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("script", SHELL_SCRIPTS, ids=lambda p: p.name)
def test_shellcheck(script):
    shellcheck = shutil.which("shellcheck")
    if shellcheck is None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("shellcheck is not installed (CI=true); install the Debian package 'shellcheck'")
        pytest.skip("shellcheck not installed (apt-get install shellcheck)")
    result = subprocess.run(
        [shellcheck, "--external-sources", str(script)], capture_output=True, text=True, cwd=REPO_ROOT
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("name", EXECUTED_SCRIPTS)
def test_executed_scripts_are_strict(name):
    assert "\nset -euo pipefail\n" in (LAUNCH_DIR / name).read_text()


def test_env_sh_sets_nccl_defaults_and_keeps_user_values():
    command = (
        "unset CUDA_DEVICE_MAX_CONNECTIONS NCCL_NVLS_ENABLE TORCH_NCCL_ASYNC_ERROR_HANDLING OMP_NUM_THREADS; "
        "export NCCL_NVLS_ENABLE=1 GPUS_PER_NODE=2; source launch/env.sh; "
        "bash -c 'echo $CUDA_DEVICE_MAX_CONNECTIONS $NCCL_NVLS_ENABLE $TORCH_NCCL_ASYNC_ERROR_HANDLING "
        "$OMP_NUM_THREADS $TORCH_SYMM_MEM_DISABLE_MULTICAST'"
    )
    out = subprocess.run(["bash", "-c", command], capture_output=True, text=True, cwd=REPO_ROOT, check=True)
    connections, nvls, async_errors, omp_threads, multicast = out.stdout.split()
    assert (connections, nvls, async_errors, multicast) == ("1", "1", "1", "1")
    assert int(omp_threads) == max(1, len(os.sched_getaffinity(0)) // 2)


# --- single node --------------------------------------------------------------------------------------


def test_single_node_dry_run_command():
    overrides = ["model=125m", "sparsity=l16v16", "train.steps=10", "+tag=a b", "note=it's"]
    lines = _dry_run_lines("run_single.sh", *overrides, env={"GPUS_PER_NODE": "4"})
    expected = ["torchrun", "--standalone", "--nnodes=1", "--nproc_per_node=4", TRAIN, *overrides]
    assert lines == [shlex.join(expected)]
    assert shlex.split(lines[0]) == expected  # pastes back into the same argv


def test_single_node_detects_gpus_with_nvidia_smi(tmp_path):
    bin_dir = _fake_bin(tmp_path, "nvidia-smi", 'printf "0\\n1\\n2\\n"\n')
    lines = _dry_run_lines("run_single.sh", "model=tiny", env={"PATH": f"{bin_dir}:{os.environ['PATH']}"})
    assert shlex.split(lines[0])[3] == "--nproc_per_node=3"


def test_single_node_cuda_visible_devices_and_torchrun_override():
    lines = _dry_run_lines(
        "run_single.sh", env={"CUDA_VISIBLE_DEVICES": "2,3", "TORCHRUN": "/opt/bin/torchrun"}
    )
    assert shlex.split(lines[0]) == ["/opt/bin/torchrun", "--standalone", "--nnodes=1", "--nproc_per_node=2", TRAIN]


def test_single_node_runs_torchrun_with_nccl_env(tmp_path):
    record = tmp_path / "torchrun.txt"
    bin_dir = _fake_bin(
        tmp_path, "torchrun",
        f'echo "$CUDA_DEVICE_MAX_CONNECTIONS $NCCL_NVLS_ENABLE $TORCH_NCCL_ASYNC_ERROR_HANDLING|$*" > {record}\n',
    )
    env = {"GPUS_PER_NODE": "2", "TORCHRUN": str(bin_dir / "torchrun"), "NCCL_NVLS_ENABLE": "1"}
    result = _run("run_single.sh", "model=tiny", env=env)
    expected = f"--standalone --nnodes=1 --nproc_per_node=2 {TRAIN} model=tiny"
    assert record.read_text() == f"1 1 1|{expected}\n"
    assert result.stdout == ""  # the command is echoed on stderr, the job owns stdout
    assert expected in result.stderr


@pytest.mark.parametrize("value", ["0", "-1", "eight"])
def test_single_node_rejects_bad_gpus_per_node(value):
    result = _run("run_single.sh", "--dry-run", env={"GPUS_PER_NODE": value}, check=False)
    assert result.returncode == 2 and result.stdout == ""
    assert "GPUS_PER_NODE" in result.stderr and value in result.stderr


def test_launcher_rejects_hydra_multirun():
    result = _run("run_single.sh", "--dry-run", "-m", "a=1,2", env={"GPUS_PER_NODE": "1"}, check=False)
    assert result.returncode == 2 and "launch/sweep.py" in result.stderr


# --- multi node ---------------------------------------------------------------------------------------


def test_multi_node_dry_run_from_explicit_env():
    env = {"NNODES": "4", "NODE_RANK": "3", "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "6000", "GPUS_PER_NODE": "8"}
    lines = _dry_run_lines("run_multi.sh", "model=1.3b", "parallel.tp=2", env=env)
    assert lines == [shlex.join([
        "torchrun", "--nnodes=4", "--nproc_per_node=8", "--node_rank=3", "--rdzv_backend=c10d",
        "--rdzv_endpoint=10.0.0.1:6000", "--rdzv_id=s2megatron", TRAIN, "model=1.3b", "parallel.tp=2",
    ])]


def test_multi_node_dry_run_from_slurm_env(tmp_path):
    # The fake scontrol answers only the exact query the launcher must make.
    bin_dir = _fake_bin(
        tmp_path, "scontrol",
        '[[ "$*" == "show hostnames gpu[07-08]" ]] || exit 3\nprintf "gpu07\\ngpu08\\n"\n',
    )
    env = {
        "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_NNODES": "2", "SLURM_NODEID": "1",
        "SLURM_JOB_NODELIST": "gpu[07-08]", "SLURM_JOB_ID": "4242", "GPUS_PER_NODE": "8",
    }
    lines = _dry_run_lines("run_multi.sh", "model=7b", "sparsity.default.vert_stride=16", env=env)
    assert lines == [shlex.join([
        "torchrun", "--nnodes=2", "--nproc_per_node=8", "--node_rank=1", "--rdzv_backend=c10d",
        "--rdzv_endpoint=gpu07:29500", "--rdzv_id=4242", TRAIN, "model=7b", "sparsity.default.vert_stride=16",
    ])]


@pytest.mark.parametrize(
    "env, message",
    [
        ({"NODE_RANK": "0", "MASTER_ADDR": "h"}, "NNODES"),
        ({"NNODES": "2", "MASTER_ADDR": "h"}, "NODE_RANK"),
        ({"NNODES": "2", "NODE_RANK": "2", "MASTER_ADDR": "h"}, "NODE_RANK must be in 0..1"),
        ({"NNODES": "2", "NODE_RANK": "0"}, "MASTER_ADDR"),
        ({"NNODES": "2", "NODE_RANK": "0", "MASTER_ADDR": "h", "MASTER_PORT": "x"}, "MASTER_PORT"),
    ],
)
def test_multi_node_missing_or_bad_env_is_a_clear_error(env, message):
    result = _run("run_multi.sh", "--dry-run", env={"GPUS_PER_NODE": "8", **env}, check=False)
    assert result.returncode == 2 and result.stdout == ""
    assert message in result.stderr


# --- SLURM batch script ---------------------------------------------------------------------------------


def test_sbatch_header_defaults():
    header = [line for line in (LAUNCH_DIR / "slurm.sbatch").read_text().splitlines() if line.startswith("#SBATCH")]
    options = dict(line.split()[1].lstrip("-").partition("=")[::2] for line in header)
    assert options["ntasks-per-node"] == "1"  # one torchrun per node
    assert {"job-name", "nodes", "gpus-per-node", "time", "output"} <= options.keys()


def test_sbatch_dry_run_srun_command(tmp_path):
    env = {
        "SLURM_JOB_ID": "77", "SLURM_NNODES": "2", "SLURM_CPUS_ON_NODE": "96",
        "SRUN_EXTRA_ARGS": "--container-image=s2.sqsh --container-mounts=/data:/data",
    }
    # Run from elsewhere: the script must still find the repository from its own location.
    lines = _dry_run_lines("slurm.sbatch", "model=125m", "train.steps=5", env=env, cwd=tmp_path)
    assert lines == [shlex.join([
        "srun", "--nodes=2", "--ntasks-per-node=1", "--kill-on-bad-exit=1", "--cpus-per-task=96",
        "--container-image=s2.sqsh", "--container-mounts=/data:/data",
        "bash", str(LAUNCH_DIR / "run_multi.sh"), "model=125m", "train.steps=5",
    ])]


def test_sbatch_finds_repo_from_job_cwd_when_run_from_spool_copy(tmp_path):
    spool_copy = tmp_path / "slurm_script"
    shutil.copy(LAUNCH_DIR / "slurm.sbatch", spool_copy)
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS and not k.startswith("SLURM_")}
    env.update({"SLURM_JOB_ID": "1", "SLURM_NNODES": "1"})
    result = subprocess.run(
        ["bash", str(spool_copy), "--dry-run", "a=1"], env=env, cwd=REPO_ROOT,
        capture_output=True, text=True, timeout=60, check=True,
    )
    assert shlex.split(result.stdout)[-2:] == [str(LAUNCH_DIR / "run_multi.sh"), "a=1"]


def test_sbatch_outside_allocation_is_a_clear_error():
    result = _run("slurm.sbatch", "--dry-run", "a=1", env={}, check=False)
    assert result.returncode == 2 and "sbatch launch/slurm.sbatch" in result.stderr


# --- sweep ----------------------------------------------------------------------------------------------


def _hydra_order(overrides):
    """Hydra's own BasicSweeper expansion, as the independent oracle for the order of points."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(list(overrides))
    return [tuple(batch) for batch in BasicSweeper.split_arguments(parsed, None)[0]]


def test_sweep_expands_two_lists_in_hydra_order():
    points = sweep.expand_sweep(["a=1,2", "b=x,y"])
    expected = [("a=1", "b=x"), ("a=1", "b=y"), ("a=2", "b=x"), ("a=2", "b=y")]
    assert [p.overrides for p in points] == expected
    assert [p.overrides for p in points] == _hydra_order(["a=1,2", "b=x,y"])


@pytest.mark.parametrize(
    "overrides",
    [
        ["model=125m", "sparsity.default.vert_stride=8,16,32"],
        ["x=range(0,6,2)", "y=choice(p,q)", "z=3"],
        ["a=1,2", "b=5", "a=3,4"],  # a repeated key keeps its first position and its last values
        ["a=sort(3,1,2)", "+b=[1,2],[3]"],
    ],
)
def test_sweep_matches_hydra_basic_sweeper(overrides):
    assert [p.overrides for p in sweep.expand_sweep(overrides)] == _hydra_order(overrides)


def test_sweep_marks_only_swept_keys():
    points = sweep.expand_sweep(["model=125m", "sparsity.default.vert_stride=8,16"])
    assert [p.swept for p in points] == [("sparsity.default.vert_stride=8",), ("sparsity.default.vert_stride=16",)]
    assert sweep.expand_sweep([]) == [sweep.SweepPoint(overrides=(), swept=())]


@pytest.mark.parametrize(
    "override, message",
    [
        ("a=1,", "invalid Hydra override 'a=1,'"),
        ("vert_stride", "invalid Hydra override 'vert_stride'"),
        ("a=interval(0,1)", "interval sweep"),
        ("a=glob(*)", "cannot be expanded"),
        ("train.out_dir=/x", "--sweep-dir"),
    ],
)
def test_sweep_bad_override_is_a_clear_error(override, message):
    with pytest.raises(ValueError) as info:
        sweep.expand_sweep(["model=tiny", override])
    assert message in str(info.value)


def test_point_dir_names_are_safe_and_distinct():
    points = sweep.expand_sweep(["tag=a b,a/b,'c,d'", "model=125m"])
    names = [sweep.point_dir_name(i, p) for i, p in enumerate(points)]
    assert len(set(names)) == len(names) == 3
    assert all(set(name) <= set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-") for name in names)
    assert names[1] == "001_tag-a_b"


def _sweep_cli(*args: str, cwd: Path = REPO_ROOT):
    return subprocess.run(
        [sys.executable, str(LAUNCH_DIR / "sweep.py"), *args],
        capture_output=True, text=True, timeout=60, cwd=cwd,
    )


def test_sweep_dry_run_local_commands(tmp_path):
    sweep_dir = tmp_path / "sw"
    result = _sweep_cli("--dry-run", "--sweep-dir", str(sweep_dir), "sparsity.default.vert_stride=8,16", "model=125m")
    assert result.returncode == 0, result.stderr
    single = str(LAUNCH_DIR / "run_single.sh")
    assert result.stdout.splitlines() == [
        shlex.join(["bash", single, "sparsity.default.vert_stride=8", "model=125m",
                    f"train.out_dir={sweep_dir}/000_vert_stride-8"]),
        shlex.join(["bash", single, "sparsity.default.vert_stride=16", "model=125m",
                    f"train.out_dir={sweep_dir}/001_vert_stride-16"]),
    ]
    assert not sweep_dir.exists()  # a dry run writes nothing


def test_sweep_dry_run_one_command_per_point_with_distinct_out_dirs(tmp_path):
    result = _sweep_cli("--dry-run", "a=1,2", "b=x,y", cwd=tmp_path)  # default, relative sweep dir
    assert result.returncode == 0, result.stderr
    argvs = [shlex.split(line) for line in result.stdout.splitlines()]
    assert [argv[2:4] for argv in argvs] == [["a=1", "b=x"], ["a=1", "b=y"], ["a=2", "b=x"], ["a=2", "b=y"]]
    out_dirs = [argv[-1].removeprefix("train.out_dir=") for argv in argvs]
    assert len(set(out_dirs)) == 4
    assert all(Path(d).is_absolute() and Path(d).parent.parent == tmp_path / "outputs" / "sweeps" for d in out_dirs)


def test_sweep_dry_run_slurm_one_sbatch_per_point(tmp_path):
    result = _sweep_cli("--dry-run", "--slurm", "--sweep-dir", str(tmp_path), "--sbatch-arg=--nodes=2", "a=1,2")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        shlex.join(["sbatch", f"--job-name=s2-sweep-00{i}", f"--chdir={REPO_ROOT}",
                    f"--output={tmp_path}/00{i}_a-{i + 1}/slurm-%j.out", "--nodes=2",
                    str(LAUNCH_DIR / "slurm.sbatch"), f"a={i + 1}", f"train.out_dir={tmp_path}/00{i}_a-{i + 1}"])
        for i in range(2)
    ]


def test_sweep_cli_bad_override_exits_2_with_message(tmp_path):
    result = _sweep_cli("--dry-run", "a=1,", cwd=tmp_path)
    assert result.returncode == 2 and result.stdout == ""
    assert "invalid Hydra override 'a=1,'" in result.stderr
    result = _sweep_cli("--dry-run", "--sweep-dir", "/tmp/has space", "a=1", cwd=tmp_path)
    assert result.returncode == 2 and "sweep dir" in result.stderr


def test_sweep_runs_each_point_through_torchrun(tmp_path):
    record = tmp_path / "calls.txt"
    bin_dir = _fake_bin(tmp_path, "torchrun", f'echo "$*" >> {record}\n')
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS and not k.startswith("SLURM_")}
    env.update({"GPUS_PER_NODE": "1", "TORCHRUN": str(bin_dir / "torchrun")})
    sweep_dir = tmp_path / "sw"
    result = subprocess.run(
        [sys.executable, str(LAUNCH_DIR / "sweep.py"), "--sweep-dir", str(sweep_dir), "a=1,2"],
        env=env, capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stderr
    prefix = f"--standalone --nnodes=1 --nproc_per_node=1 {TRAIN}"
    assert record.read_text().splitlines() == [
        f"{prefix} a=1 train.out_dir={sweep_dir}/000_a-1",
        f"{prefix} a=2 train.out_dir={sweep_dir}/001_a-2",
    ]
    assert (sweep_dir / "000_a-1").is_dir() and (sweep_dir / "commands.txt").exists()


def test_sweep_runs_points_in_order_and_stops_on_failure(tmp_path, monkeypatch):
    calls = []

    def fake_run(argv, check):
        calls.append(argv)
        return subprocess.CompletedProcess(argv, 1 if len(calls) == 2 else 0)

    monkeypatch.setattr(sweep.subprocess, "run", fake_run)
    assert sweep.main(["--sweep-dir", str(tmp_path), "a=1,2,3"]) == 1
    assert [argv[2] for argv in calls] == ["a=1", "a=2"]
    assert (tmp_path / "commands.txt").read_text().count("\n") == 3

    calls.clear()
    assert sweep.main(["--keep-going", "--sweep-dir", str(tmp_path), "a=1,2,3"]) == 1
    assert [argv[2] for argv in calls] == ["a=1", "a=2", "a=3"]
