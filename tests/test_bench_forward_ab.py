"""The Hopper forward A/B (bench/forward_ab.py) loads the kernel of a git revision beside this tree's, and refuses one
whose arguments differ from what this tree's launcher passes."""
import os
import shutil
import subprocess
import types

import pytest

from script_modules import load_script

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_PATH = "s2megatron/ops/triton_s2/hopper_fwd.py"


@pytest.fixture(scope="module")
def forward_ab():
    return load_script(os.path.join(_ROOT, "bench", "forward_ab.py"), "forward_ab")


@pytest.fixture()
def repo(tmp_path):
    """A git repository holding this tree's hopper_fwd.py with one line of its docstring changed, committed."""
    os.makedirs(tmp_path / os.path.dirname(_PATH))
    shutil.copy(os.path.join(_ROOT, _PATH), tmp_path / _PATH)
    text = (tmp_path / _PATH).read_text()
    (tmp_path / _PATH).write_text(text.replace('"""S2 forward on Hopper', '"""Base revision. S2 forward on Hopper', 1))
    env = dict(os.environ, GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t", GIT_COMMITTER_NAME="t",
               GIT_COMMITTER_EMAIL="t@t")
    for cmd in (["init", "-q"], ["add", "."], ["commit", "-q", "-m", "base"]):
        subprocess.run(["git", "-C", str(tmp_path), *cmd], check=True, env=env)
    return str(tmp_path)


def test_the_base_revision_kernel_loads_beside_this_trees(forward_ab, repo):
    from s2megatron.ops.triton_s2 import hopper_fwd
    base = forward_ab.load_base("HEAD", root=repo)
    assert base.__doc__.startswith("Base revision.") and base is not hopper_fwd
    assert base.s2_fwd_hopper_kernel is not hopper_fwd.s2_fwd_hopper_kernel
    assert base.s2_fwd_hopper_kernel.arg_names == hopper_fwd.s2_fwd_hopper_kernel.arg_names


def test_a_kernel_with_other_arguments_is_refused(forward_ab, repo, monkeypatch):
    from s2megatron.ops.triton_s2 import hopper_fwd
    monkeypatch.setattr(hopper_fwd, "s2_fwd_hopper_kernel", types.SimpleNamespace(arg_names=["Q_DESC"]))
    with pytest.raises(ValueError, match="this tree's launcher passes"):
        forward_ab.load_base("HEAD", root=repo)
