"""A stand-in for the op's call plan with only the fields the Hopper kernels' policies and launchers read, and the
scope checks the policies share, for their tests without a GPU (tests/test_hopper_fwd.py, test_hopper_dq.py,
test_hopper_bwd.py)."""
import types

import torch


def plan_stub(**fields):
    """The plan of ``fields`` (``layout`` and ``num_heads`` among them). Unless given: the layout's local blocks and
    stripe distance, and ``metadata(rows)`` returning the layout's stride patterns for ``num_heads`` heads."""
    plan = types.SimpleNamespace(**fields)
    layout = plan.layout
    vars(plan).setdefault("local_blocks", layout.local_blocks)
    vars(plan).setdefault("vert_stride", layout.vert_stride)
    if "metadata" not in fields:
        patterns = layout.head_patterns(layout.resolve(plan.num_heads))
        plan.metadata = lambda rows: (types.SimpleNamespace(patterns=patterns), None)
    return plan


def check_policy_scope(policy, plan, env, declined, monkeypatch, hopper_fwd):
    """What the Hopper policies share: ``policy(plan(**over), q)`` is None for every ``over`` in ``declined`` and
    for float32 inputs; ``env`` = 1 takes the kernel at any length, = 0 never; not on sm_90 (sm_80, or sm_100 with no
    wgmma) never. Leaves ``env`` unset and the GPU reported as not sm_90."""
    q = torch.empty(1, dtype=torch.bfloat16)
    for over in declined:
        assert policy(plan(**over), q) is None, over
    assert policy(plan(), q.float()) is None
    monkeypatch.setenv(env, "1")  # any length
    assert policy(plan(kv_len=100), q) is not None
    monkeypatch.setenv(env, "0")
    assert policy(plan(), q) is None
    monkeypatch.delenv(env)
    monkeypatch.setattr(hopper_fwd, "_is_sm90", lambda index: False)
    assert policy(plan(), q) is None
