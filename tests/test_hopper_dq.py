"""The warp-specialised Hopper dQ (s2megatron/ops/triton_s2/hopper_dq.py) without a GPU: which calls take it, the
fallback when it fails to compile or declines, and that it compiles for sm_90a with the register and shared-memory
budget it is launched with. Its numerics are checked on the GPU (tests/gpu/test_triton_s2_gpu.py: the float64
reference)."""
import types
import warnings

import pytest
import torch

from hopper_plans import (BUDGET_SHAPES, check_layout_constants, check_policy_scope, check_sm90_budget,  # noqa: E402
                          l16v16_plan)
from triton_interpret import InterpreterEnv, interpreted  # noqa: E402

_ENV = InterpreterEnv()  # before triton and the kernels are imported

from triton.compiler.errors import CompilationError  # noqa: E402

from s2megatron.ops.triton_s2 import hopper_dq, hopper_fwd  # noqa: E402
from s2megatron.ops.triton_s2 import kernels as _kernels  # noqa: E402
from s2megatron.ops.triton_s2 import op as _op  # noqa: E402
from s2megatron.sparsity import S2Layout  # noqa: E402

_kernels = interpreted(_kernels, "s2_fwd_kernel")  # the CPU test of the op runs the Triton kernels
_interpreter_env = _ENV.fixture()


_plan = l16v16_plan


@pytest.fixture
def sm90(monkeypatch):
    monkeypatch.delenv("S2MEGATRON_HOPPER_DQ", raising=False)
    monkeypatch.setattr(hopper_fwd, "_is_sm90", lambda index: True)
    monkeypatch.setattr(hopper_dq, "_broken", [])


def test_which_calls_take_the_hopper_dq(sm90, monkeypatch):
    """The forward's scope at every length (no row-length rule), and the forward's grid: persistent for S2 rows, one
    CTA per query tile for dense ones (``hopper_fwd.PERSISTENT_ROW_SHARE``)."""
    q = torch.empty(1, dtype=torch.bfloat16)
    assert hopper_dq.hopper_dq_tiles(_plan(), q) == hopper_dq.HopperDqTiles()  # persistent: S2 rows
    assert hopper_dq.hopper_dq_tiles(_plan(kv_len=8192), q).persistent  # 1472 kept keys, 18 %
    assert hopper_dq.hopper_dq_tiles(_plan(kv_len=4096), q).persistent  # 1216 kept keys, 30 %
    assert not hopper_dq.hopper_dq_tiles(_plan(kv_len=1000), q).persistent  # every key kept
    assert hopper_dq.hopper_dq_tiles(_plan(block_size=128, head_dim=64), q.half()) is not None
    dense = hopper_dq.hopper_dq_tiles(_plan(layout=S2Layout(64, 1, 1), kv_len=8192), q)
    assert dense is not None and not dense.persistent
    with monkeypatch.context() as m:
        m.setattr(hopper_fwd, "PERSISTENT_ROW_SHARE", 0.0)  # one rule for both kernels
        assert not hopper_dq.hopper_dq_tiles(_plan(), q).persistent
    declined = (dict(analytic=False), dict(block_size=32), dict(block_size=256),
                dict(head_dim=80), dict(head_dim=256), dict(device=torch.device("cpu")))
    check_policy_scope(hopper_dq.hopper_dq_tiles, _plan, "S2MEGATRON_HOPPER_DQ", declined, monkeypatch, hopper_fwd)


def test_compile_failure_falls_back_to_the_triton_dq(sm90, monkeypatch):
    """A Triton whose Gluon cannot build the kernel: one warning, nothing launched, and no further attempts."""
    def failing_launch(*args, **kwargs):
        raise CompilationError("k.py", None, "unsupported")

    monkeypatch.setattr(hopper_dq, "s2_dq_hopper_kernel", {(1, ): failing_launch}, raising=True)
    monkeypatch.setattr(hopper_fwd, "_sm_count", lambda index: 132, raising=True)
    monkeypatch.setattr(hopper_fwd, "_descriptor", lambda *args: None)  # row_descriptors builds them there
    plan = _plan(varlen=False, num_heads=1, batch=1, q_len=64, group=1, local_blocks=1, vert_stride=1,
                 metadata=lambda rows: (types.SimpleNamespace(num_tiles=1, first_block=0, head_to_pattern=None), None))
    q = torch.empty(1, 64, 1, 128, dtype=torch.bfloat16)
    lse = torch.empty(1, 1, 64)
    with pytest.warns(UserWarning, match="Hopper dQ failed to compile"):
        launched = hopper_dq.hopper_dq(plan, hopper_dq.HopperDqTiles(), q, q, q, q, q, q, lse, None, lse, None, 1.0,
                                       1.0)
    assert launched is False
    monkeypatch.setenv("S2MEGATRON_HOPPER_DQ", "1")  # forced, so that only the failed compile can decline
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert hopper_dq.hopper_dq_tiles(plan, q) is None


def test_op_takes_the_triton_dq_where_the_hopper_dq_declines(monkeypatch):
    """The launcher's contract with op._backward: a False return (no TMA row view) means the Triton dQ kernel runs,
    and dQ (and dK, dV, which read the Delta it writes) are those of the reference."""
    calls = []
    monkeypatch.setattr(_op._hopper_dq, "hopper_dq_tiles", lambda plan, q: hopper_dq.HopperDqTiles())
    monkeypatch.setattr(_op._hopper_dq, "hopper_dq", lambda *args: calls.append(1) or False)
    from s2megatron.ops.reference import reference_attention
    from s2megatron.ops.triton_s2 import triton_s2_attention
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 40, 2, 16, generator=gen, requires_grad=True) for _ in range(3))
    dout = torch.randn(1, 40, 2, 16, generator=gen)
    layout = S2Layout(16, 1, 2)
    grads = torch.autograd.grad(triton_s2_attention(q, k, v, layout, sm_scale=0.25), (q, k, v), dout)
    q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
    ref = torch.autograd.grad(reference_attention(q64, k64, v64, layout, sm_scale=0.25)[0], (q64, k64, v64),
                              dout.double())
    assert calls == [1]
    for got, want in zip(grads, ref):
        assert torch.allclose(got.double(), want, atol=1e-4, rtol=1e-4)


@pytest.fixture(scope="module")
def sm90_build():
    """ptxas for sm_90a (Triton ships it), at head dim 128 / block 64, 64 / 64 and 128 / 128: 12 warps (4 + 4
    consumers, 1 producer rounded up to a warpgroup), the 168-register launch limit, shared memory within the 227 KB
    a CTA may use, and at most a few scalars spilled, none inside the key-tile loops (ptxas spills up to 36 bytes of
    the walk's state at head dim 128 since the epilogue has two ways out: a TMA copy of whole tiles, 16-byte stores
    of the rows of a tile at the sequence's end). In a fresh process: the interpreter that these tests run under
    (TRITON_INTERPRET) replaces the jit helpers the kernel calls. Compiled once for the tests below."""
    return check_sm90_budget("dq", hopper_dq.HopperDqTiles().maxnreg, 128, 128)


def test_compiles_for_sm90_within_its_budget(sm90_build):
    assert len(sm90_build) == len(BUDGET_SHAPES)


def test_layout_and_head_counts_are_compile_time_constants(sm90_build):
    """As in the forward, whose work items, walks and masks the dQ shares: the layout's local blocks and vertical
    stride, the head count and the GQA group are compile-time constants, and the one division left at run time is of
    the work item by the number of query tiles, once per partition (12 divisions and remainders as run-time
    values)."""
    check_layout_constants(hopper_dq.s2_dq_hopper_kernel, sm90_build)


_ENV.restore()  # last line: the interpreter only while this module imports and runs
