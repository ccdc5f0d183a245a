"""The Hopper kernels' A/B (bench/forward_ab.py) loads the forward or the dQ kernel of a git revision beside this
tree's, and refuses one whose arguments differ from what this tree's launcher passes."""
import os
import subprocess
import types

import pytest

from script_modules import load_script

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_PATHS = {"forward": "s2megatron/ops/triton_s2/hopper_fwd.py", "dq": "s2megatron/ops/triton_s2/hopper_dq.py"}


@pytest.fixture(scope="module")
def forward_ab():
    return load_script(os.path.join(_ROOT, "bench", "forward_ab.py"), "forward_ab")


@pytest.fixture()
def repo(tmp_path):
    """A git repository holding this tree's hopper_fwd.py and hopper_dq.py, each with its docstring's first line
    marked, committed."""
    os.makedirs(tmp_path / os.path.dirname(_PATHS["forward"]))
    for path in _PATHS.values():
        text = open(os.path.join(_ROOT, path)).read()
        (tmp_path / path).write_text('"""Base revision. ' + text[3:])
    env = dict(os.environ, GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t", GIT_COMMITTER_NAME="t",
               GIT_COMMITTER_EMAIL="t@t")
    for cmd in (["init", "-q"], ["add", "."], ["commit", "-q", "-m", "base"]):
        subprocess.run(["git", "-C", str(tmp_path), *cmd], check=True, env=env)
    return str(tmp_path)


@pytest.mark.parametrize("kernel,attr", [("forward", "s2_fwd_hopper_kernel"), ("dq", "s2_dq_hopper_kernel")])
def test_the_base_revision_kernel_loads_beside_this_trees(forward_ab, repo, kernel, attr):
    from s2megatron.ops.triton_s2 import hopper_dq, hopper_fwd
    this = {"forward": hopper_fwd, "dq": hopper_dq}[kernel]
    base = forward_ab.load_base("HEAD", root=repo, kernel=kernel)
    assert base.__doc__.startswith("Base revision.") and base is not this
    assert getattr(base, attr) is not getattr(this, attr)
    assert getattr(base, attr).arg_names == getattr(this, attr).arg_names


def test_a_kernel_with_other_arguments_is_refused(forward_ab, repo, monkeypatch):
    from s2megatron.ops.triton_s2 import hopper_dq, hopper_fwd
    monkeypatch.setattr(hopper_fwd, "s2_fwd_hopper_kernel", types.SimpleNamespace(arg_names=["Q_DESC"]))
    with pytest.raises(ValueError, match="this tree's launcher passes"):
        forward_ab.load_base("HEAD", root=repo)
    monkeypatch.setattr(hopper_dq, "s2_dq_hopper_kernel", types.SimpleNamespace(arg_names=["Q_DESC"]))
    with pytest.raises(ValueError, match="this tree's launcher passes"):
        forward_ab.load_base("HEAD", root=repo, kernel="dq")
