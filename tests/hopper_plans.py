"""A stand-in for the op's call plan with only the fields the Hopper kernels' policies and launchers read, the
scope checks the policies share, the compile budget the kernels share and the compile-time layout constants of the
two that walk query tiles, for their tests without a GPU (tests/test_hopper_fwd.py, test_hopper_dq.py,
test_hopper_bwd.py)."""
import types

import torch

from triton_interpret import compiled_in_fresh_process

# (head dim, layout block) at which the budget tests compile each Hopper kernel
BUDGET_SHAPES = ((128, 64), (64, 64), (128, 128))


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


def l16v16_plan(**over):
    """The plan of an L16V16 call at block 64 (32 heads of dim 128, 32k keys, on cuda:0), ``over`` replacing or
    adding fields: the shape the Hopper policies' tests start from."""
    from s2megatron.sparsity import S2Layout  # at call time: the tests import this module before the interpreter env
    return plan_stub(**{**dict(device=torch.device("cuda", 0), layout=S2Layout(64, 16, 16), kv_len=32768,
                               num_heads=32, analytic=True, block_size=64, head_dim=128), **over})


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


def check_sm90_budget(kernel: str, maxnreg: int, max_spill_store: int, max_spill_load: int) -> list:
    """``kernel_resources.compile_hopper_<kernel>`` at each of ``BUDGET_SHAPES``, in a fresh process (the interpreter
    the CPU tests run under replaces the jit helpers a kernel calls): what every Hopper kernel must keep to, 12 warps
    (4 + 4 consumers, 1 producer rounded up to a warpgroup), at most ``maxnreg`` registers (the launch limit), at
    most the given spill bytes and none inside the tensor-core loops, shared memory within the 227 KB a CTA may use.
    Returns the rows, one per shape, for the kernel's own checks."""
    rows = compiled_in_fresh_process(
        "import json, kernel_resources\n"
        f"print(json.dumps([kernel_resources.compile_hopper_{kernel}(d, b) for d, b in {BUDGET_SHAPES!r}]))")
    for row in rows:
        assert row["warps"] == 12, row
        assert row["registers"] <= maxnreg, row
        assert row["spill_store_bytes"] <= max_spill_store and row["spill_load_bytes"] <= max_spill_load, row
        assert row["loop_local_memory"] == 0, row
        assert row["shared_bytes"] <= 227 * 1024, row
    return rows


def check_layout_constants(kernel, rows: list):
    """The layout's local blocks and vertical stride, the head count and the GQA group are compile-time constants of
    ``kernel`` (a Hopper kernel that walks query tiles: the forward, the dQ), and each of its builds ``rows``
    (``check_sm90_budget``, compiled with these four as the launcher passes them) keeps one run-time division in its
    PTX per partition (two consumers, the producer): the work item by the number of query tiles."""
    constants = {kernel.arg_names[i] for i in kernel.constexprs}
    assert {"num_heads", "group", "local_blocks", "vert_stride"} <= constants, constants
    for row in rows:
        assert row["int_divisions"] == 3, row
