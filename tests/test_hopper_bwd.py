"""The warp-specialised Hopper dK/dV (s2megatron/ops/triton_s2/hopper_bwd.py) without a GPU: which calls take it,
the fallback when it fails to compile, and that it compiles for sm_90a with the register and shared-memory budget it
is launched with. Its numerics are checked on the GPU (tests/gpu/test_triton_s2_gpu.py: the float64 reference)."""
import dataclasses
import types
import warnings

import pytest
import torch

from hopper_plans import check_policy_scope, check_sm90_budget, l16v16_plan  # noqa: E402
from triton_interpret import InterpreterEnv, interpreted  # noqa: E402

_ENV = InterpreterEnv()  # before triton and the kernels are imported

import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.compiler.errors import CompilationError  # noqa: E402
from triton.runtime.errors import OutOfResources  # noqa: E402

from s2megatron.ops.triton_s2 import hopper_bwd, hopper_fwd  # noqa: E402
from s2megatron.ops.triton_s2 import kernels as _kernels  # noqa: E402
from s2megatron.ops.triton_s2 import op as _op  # noqa: E402
from s2megatron.sparsity import S2Layout, get_metadata  # noqa: E402

_kernels = interpreted(_kernels, "s2_fwd_kernel")  # the CPU test of the op runs the Triton kernels
_interpreter_env = _ENV.fixture()
_pair_tiles = _kernels._pair_tiles


@triton.jit
def _pairs_kernel(R, OUT, kv_end, vert_stride, BS: tl.constexpr, BLOCK_N: tl.constexpr):
    p = tl.program_id(0)
    pos_a, pos_b, ok_a, ok_b = _pair_tiles(p, tl.load(R), kv_end, vert_stride, BS, BLOCK_N)
    tl.store(OUT + 4 * p, pos_a)
    tl.store(OUT + 4 * p + 1, pos_b)
    tl.store(OUT + 4 * p + 2, ok_a.to(tl.int32))
    tl.store(OUT + 4 * p + 3, ok_b.to(tl.int32))


def _plan(**over):
    return l16v16_plan(**{**dict(kv_len=131072, group=1, merge_q=True, cfg=types.SimpleNamespace(block_m=128)), **over})


@pytest.fixture
def sm90(monkeypatch):
    monkeypatch.delenv("S2MEGATRON_HOPPER_BWD", raising=False)
    monkeypatch.setattr(hopper_fwd, "_is_sm90", lambda index: True)  # the scope check (hopper_fwd.hopper_runnable)
    monkeypatch.setattr(hopper_bwd, "_broken", [])


def test_which_calls_take_the_hopper_dkdv(sm90, monkeypatch):
    q = torch.empty(1, dtype=torch.bfloat16)
    assert hopper_bwd.hopper_dkdv_tiles(_plan(), q) == hopper_bwd.HopperDkdvTiles()
    assert hopper_bwd.hopper_dkdv_tiles(_plan(kv_len=8192, head_dim=64), q.half()) is not None
    assert hopper_bwd.hopper_dkdv_tiles(_plan(kv_len=2048, group=4), q) is not None  # GQA: 4 heads per walk
    assert hopper_bwd.hopper_dkdv_tiles(_plan(layout=S2Layout(64, 1, 1), kv_len=2048), q) is not None  # dense
    declined = (dict(kv_len=4096), dict(analytic=False), dict(merge_q=False), dict(block_size=32),
                dict(block_size=256), dict(head_dim=80), dict(head_dim=256), dict(device=torch.device("cpu")))
    check_policy_scope(hopper_bwd.hopper_dkdv_tiles, _plan, "S2MEGATRON_HOPPER_BWD", declined, monkeypatch,
                       hopper_fwd)


@pytest.mark.parametrize("layout,kv_len,heads", [
    (S2Layout(64, 16, 16), 8192, 32), (S2Layout(64, 16, 16), 32768 + 100, 8), (S2Layout(64, 1, 1), 4000, 4),
    (S2Layout(128, 8, 8, num_dense_heads=2), 20000, 8), (S2Layout(64, 4, 3, num_dense_heads=1), 1000, 3),
    (S2Layout(16, 3, 5, head_sliding=False), 700, 5)])
def test_col_rows_is_the_column_lists_length(layout, kv_len, heads):
    """The policy's walk length equals the query blocks of the column lists in the metadata, per key block,
    averaged over key blocks and heads."""
    meta = get_metadata(layout, heads, kv_len, kv_len, device="cpu", rows_per_tile=1)
    blocks = meta.col_ptr.shape[1] - 1
    kept = [int(meta.col_ptr[p, -1] - meta.col_ptr[p, 0]) for p in meta.head_to_pattern.tolist()]
    patterns = layout.head_patterns(layout.resolve(heads))
    residues = tuple(patterns.residues[p] for p in patterns.head_to_pattern)
    got = hopper_bwd.col_rows(residues, layout.local_blocks, layout.vert_stride, layout.block_size, kv_len)
    assert got == pytest.approx(layout.block_size * sum(kept) / (heads * blocks))


@pytest.mark.parametrize("block,vert_stride,residue,kv_end", [
    (64, 16, 3, 64 * 40 - 17), (64, 16, 15, 64 * 7), (64, 16, 0, 64 * 33), (64, 5, 4, 64 * 21 + 1),
    (64, 2, 1, 64 * 9), (64, 1, 0, 64 * 11 - 5), (64, 16, -1, 64 * 5), (64, 3, 2, 64), (64, 4, 0, 64 * 2),
    (128, 8, 3, 128 * 9 - 70), (128, 1, 0, 128 * 4)])
def test_pairs_cover_every_key_tile_once(block, vert_stride, residue, kv_end):
    """The Hopper dK/dV's pairing (kernels._pair_tiles, run under the interpreter over the launcher's pair count):
    every 64-key tile below the sequence end belongs to exactly one pair; at block 64 both tiles of a pair are
    stripes or both are not, stripe pairs come first, and a second tile exists only with a first."""
    pairs = hopper_bwd.pair_count(kv_end, block, 64)  # as hopper_dkdv launches
    out = torch.full((pairs, 4), -7, dtype=torch.int32)
    _pairs_kernel[(pairs,)](torch.tensor([residue], dtype=torch.int32), out, kv_end, vert_stride, BS=block,
                            BLOCK_N=64)
    tiles = []
    classes = []
    for pos_a, pos_b, ok_a, ok_b in out.tolist():
        assert ok_a or not ok_b
        pair = [pos for pos, ok in ((pos_a, ok_a), (pos_b, ok_b)) if ok]
        tiles += pair
        if block == 64 and pair:
            stripe = [residue < 0 or (pos // 64) % vert_stride == residue for pos in pair]
            assert len(set(stripe)) == 1, (pair, stripe)
            classes.append(stripe[0])
    assert sorted(tiles) == list(range(0, kv_end, 64))
    assert classes == sorted(classes, reverse=True)  # stripe pairs (True) before the others
    if block == 64 and vert_stride > 1 and residue >= 0:  # program_order runs pair indices below stripe_pairs first
        assert classes.count(True) <= hopper_bwd.stripe_pairs(kv_end, block, vert_stride)


def test_program_order():
    """Kv head fastest below ``stripes_first_from`` keys; from there one kv head's pairs together, the stripe pairs
    of every kv head first (block 64 S2 layouts), or all of a head's pairs in turn (dense layouts at every length,
    block 128). The stripe pairs are those of residue 0, the most any head has, also when a sequence ends inside a
    stripe period."""
    tiles = hopper_bwd.HopperDkdvTiles()
    order = lambda **over: hopper_bwd.program_order(_plan(**over), tiles)  # noqa: E731
    assert order(kv_len=tiles.stripes_first_from - 1) == (True, 0)
    assert order(kv_len=tiles.stripes_first_from) == (False, 8)  # 256 blocks, 16 stripes of residue 0
    assert order(kv_len=32768 + 64) == (False, 17)  # 513 blocks: residue 0 has 33 stripes
    assert order(layout=S2Layout(64, 1, 1), vert_stride=1, kv_len=2048) == (False, 0)
    assert order(layout=S2Layout(128, 8, 8), block_size=128, kv_len=65536) == (False, 0)
    assert hopper_bwd.program_order(_plan(kv_len=65536), dataclasses.replace(tiles, stripes_first_from=1 << 40)) \
        == (True, 0)


@pytest.mark.parametrize("error", [CompilationError("k.py", None, "unsupported"),
                                   OutOfResources(232448 + 16, 232448, "shared memory")],
                         ids=["compile-error", "out-of-shared-memory"])
def test_compile_failure_falls_back_to_the_triton_kernel(error, sm90, monkeypatch):
    """A Triton whose Gluon cannot build the kernel, or builds it to more shared memory than a CTA may use (the
    Hopper kernels fill most of the 227 KB): one warning, nothing launched, and no further attempts."""
    def failing_launch(*args, **kwargs):
        raise error

    monkeypatch.setattr(hopper_bwd, "s2_dkdv_hopper_kernel", {(2, 1): failing_launch}, raising=True)
    monkeypatch.setattr(hopper_fwd, "_descriptor", lambda *args: None)  # row_descriptors builds them there
    plan = _plan(varlen=False, num_kv_heads=1, batch=1, q_len=64, kv_len=64)
    q = torch.empty(1, 64, 1, 128, dtype=torch.bfloat16)
    lse = torch.empty(1, 1, 64)
    with pytest.warns(UserWarning, match="Hopper dK/dV failed to compile"):
        launched = hopper_bwd.hopper_dkdv(plan, hopper_bwd.HopperDkdvTiles(), q, q, q, q, q, q, lse, lse, None,
                                          1.0, 1.0, 0, None, None)
    assert launched is False
    monkeypatch.setenv("S2MEGATRON_HOPPER_BWD", "1")  # forced, so that only the failed compile can decline
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert hopper_bwd.hopper_dkdv_tiles(plan, q) is None


def test_op_takes_the_triton_kernel_where_the_hopper_dkdv_declines(monkeypatch):
    """The launcher's contract with op._backward: a False return (no TMA row view) means the Triton kernel runs,
    and the gradients are those of the reference."""
    calls = []
    monkeypatch.setattr(_op._hopper_bwd, "hopper_dkdv_tiles", lambda plan, q: hopper_bwd.HopperDkdvTiles())
    monkeypatch.setattr(_op._hopper_bwd, "hopper_dkdv", lambda *args: calls.append(1) or False)
    from s2megatron.ops.reference import reference_attention
    from s2megatron.ops.triton_s2 import triton_s2_attention
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 40, 2, 16, generator=gen, requires_grad=True) for _ in range(3))
    layout = S2Layout(16, 1, 2)
    grads = torch.autograd.grad(triton_s2_attention(q, k, v, layout, sm_scale=0.25).sum(), (k, v))
    q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
    ref = torch.autograd.grad(reference_attention(q64, k64, v64, layout, sm_scale=0.25)[0].sum(), (k64, v64))
    assert calls == [1]
    for got, want in zip(grads, ref):
        assert torch.allclose(got.double(), want, atol=1e-4, rtol=1e-4)


def test_compiles_for_sm90_within_its_budget():
    """ptxas for sm_90a (Triton ships it), at head dim 128 / block 64, 64 / 64 and 128 / 128: 12 warps (4 + 4
    consumers, 1 producer rounded up to a warpgroup), the 168-register launch limit, shared memory within the 227 KB
    a CTA may use, and at most a few scalars spilled (at head dim 128 ptxas spills 108 bytes of the walk's loop
    state; the chunk's tiles stay in registers), none inside the query-chunk loops. In a fresh process: the interpreter
    that these tests run under (TRITON_INTERPRET) replaces the jit helpers the kernel calls."""
    rows = check_sm90_budget("dkdv", hopper_bwd.HopperDkdvTiles().maxnreg, 128, 128)
    assert rows[1]["spill_store_bytes"] == 0, rows[1]  # head dim 64: nothing spilled


_ENV.restore()  # last line: the interpreter only while this module imports and runs
