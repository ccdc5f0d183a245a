"""A stand-in for the op's call plan with only the fields the Hopper kernels' policies and launchers read, for their
tests without a GPU (tests/test_hopper_fwd.py, tests/test_hopper_bwd.py)."""
import types


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
