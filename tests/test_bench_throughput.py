"""The training-throughput benchmark's command lines (bench/train_throughput.py): what each point runs."""
import os

import pytest

from script_modules import load_script

_BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench")


@pytest.fixture(scope="module")
def tt():
    return load_script(os.path.join(_BENCH, "train_throughput.py"), "train_throughput")


def _cmd(tt, argv, seq):
    return tt.point_command(tt.parse_args(argv), seq, "s2", "/tmp/result.json")


def test_recompute_from_zero_means_never(tt):
    """``--recompute-from 0`` turns recompute off at every length (the string "0" must not count as a threshold)."""
    for seq in (8192, 32768, 131072):
        assert "--recompute" not in _cmd(tt, ["--recompute-from", "0"], seq)


def test_recompute_from_a_length(tt):
    argv = ["--recompute-from", "32768"]
    assert "--recompute" not in _cmd(tt, argv, 8192)
    assert "--recompute" in _cmd(tt, argv, 32768)
    assert "--recompute" in _cmd(tt, argv, 131072)


def test_recompute_auto_without_cuda_starts_at_32k(tt):
    if __import__("torch").cuda.is_available():
        pytest.skip("auto depends on the card's memory; this checks the CPU-only resolution")
    assert tt.parse_args([]).recompute_from == 32768


@pytest.mark.parametrize("bad", ["-1", "abc", "1.5"])
def test_bad_recompute_from_is_refused(tt, bad, capsys):
    with pytest.raises(SystemExit):
        tt.parse_args(["--recompute-from", bad])
    err = capsys.readouterr().err
    assert bad in err and "auto" in err


def test_tensor_parallel_points_run_under_torchrun(tt):
    cmd = _cmd(tt, ["--model", "7b", "--nproc", "4", "--tp", "4", "--profile", "--tokens-per-step", "65536"], 32768)
    assert cmd[1:5] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=4"]
    assert cmd[cmd.index("--dp") + 1] == "1" and cmd[cmd.index("--tp") + 1] == "4"
    assert "--profile" in cmd and cmd[cmd.index("--tokens-per-step") + 1] == "65536"
