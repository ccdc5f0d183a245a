"""The warp-specialised Hopper forward (s2megatron/ops/triton_s2/hopper_fwd.py) without a GPU: which calls take it,
the fallback when it fails to compile, and that it compiles for sm_90a with the register and shared-memory budget it
is launched with. Its numerics are checked on the GPU (tests/gpu/test_triton_s2_gpu.py: the float64 reference)."""
import types
import warnings

import pytest
import torch

from hopper_plans import (BUDGET_SHAPES, check_layout_constants, check_policy_scope, check_sm90_budget,  # noqa: E402
                          l16v16_plan)
from triton_interpret import InterpreterEnv, compiled_in_fresh_process, interpreted  # noqa: E402

_ENV = InterpreterEnv()  # before triton and the kernels are imported

from triton.compiler.errors import CompilationError  # noqa: E402

from s2megatron.ops.triton_s2 import hopper_fwd  # noqa: E402
from s2megatron.ops.triton_s2 import kernels as _kernels  # noqa: E402
from s2megatron.ops.triton_s2 import op as _op  # noqa: E402
from s2megatron.sparsity import S2Layout, get_metadata  # noqa: E402

_kernels = interpreted(_kernels, "s2_fwd_kernel")  # the CPU test of the op runs the Triton kernels
_interpreter_env = _ENV.fixture()


_plan = l16v16_plan


@pytest.fixture
def sm90(monkeypatch):
    monkeypatch.delenv("S2MEGATRON_HOPPER_FWD", raising=False)
    monkeypatch.setattr(hopper_fwd, "_is_sm90", lambda index: True)
    monkeypatch.setattr(hopper_fwd, "_broken", [])


def test_which_calls_take_the_hopper_forward(sm90, monkeypatch):
    q = torch.empty(1, dtype=torch.bfloat16)
    assert hopper_fwd.hopper_forward_tiles(_plan(), q) == hopper_fwd.hopper_tiles()  # persistent: S2 rows
    assert hopper_fwd.hopper_forward_tiles(_plan(kv_len=16384), q).persistent  # 1984 kept keys, 12 %
    assert hopper_fwd.hopper_forward_tiles(_plan(block_size=128, head_dim=64), q.half()) is not None
    dense = hopper_fwd.hopper_forward_tiles(_plan(layout=S2Layout(64, 1, 1), kv_len=8192), q)
    assert dense is not None and not dense.persistent  # every key kept: one CTA per query tile
    assert hopper_fwd.hopper_forward_tiles(_plan(kv_len=8192), q).persistent  # 1472 kept keys, 18 %
    monkeypatch.setenv("S2MEGATRON_HOPPER_FWD", "1")  # forced where the length rule declines: still persistent
    assert hopper_fwd.hopper_forward_tiles(_plan(kv_len=4096), q).persistent  # 1216 kept keys, 30 %
    monkeypatch.delenv("S2MEGATRON_HOPPER_FWD")
    declined = (dict(kv_len=4096), dict(analytic=False), dict(block_size=32), dict(block_size=256),
                dict(head_dim=80), dict(head_dim=256), dict(device=torch.device("cpu")))
    check_policy_scope(hopper_fwd.hopper_forward_tiles, _plan, "S2MEGATRON_HOPPER_FWD", declined, monkeypatch,
                       hopper_fwd)


@pytest.mark.parametrize("layout,kv_len,heads", [
    (S2Layout(64, 16, 16), 8192, 32), (S2Layout(64, 16, 16), 32768 + 100, 8), (S2Layout(64, 1, 1), 4000, 4),
    (S2Layout(128, 8, 8, num_dense_heads=2), 20000, 8), (S2Layout(64, 4, 3, num_dense_heads=1), 1000, 3)])
def test_row_keys_is_the_last_rows_kept_keys(layout, kv_len, heads):
    """The policy's row length equals the kept keys of the last query block in the metadata, averaged over heads."""
    meta = get_metadata(layout, heads, kv_len, kv_len, device="cpu", rows_per_tile=1)
    kept = [int(meta.row_ptr[p, -1] - meta.row_ptr[p, -2]) for p in meta.head_to_pattern.tolist()]
    patterns = layout.head_patterns(layout.resolve(heads))
    assert hopper_fwd.row_keys(patterns, layout, kv_len) == pytest.approx(layout.block_size * sum(kept) / heads)


@pytest.mark.parametrize("layout,q_len,kv_len,heads", [
    (S2Layout(64, 16, 16), 8192, 8192, 32), (S2Layout(64, 16, 16), 5000, 32768 + 100, 8),
    (S2Layout(128, 8, 8, num_dense_heads=2), 20000, 20000, 8), (S2Layout(64, 4, 3, num_dense_heads=1), 1000, 1000, 3),
    (S2Layout(64, 1, 1), 4000, 4000, 4)])
def test_walk_keys_are_each_query_tiles_kept_keys(layout, q_len, kv_len, heads):
    """The scheduler's cost of a work item: the keys of its query tile's row list in the metadata (Merge-Q over the
    128 rows of the Hopper kernels' tiles), per head, with a KV prefix and lengths that are not whole tiles."""
    meta = get_metadata(layout, heads, q_len, kv_len, device="cpu", rows_per_tile=128 // layout.block_size)
    patterns = layout.head_patterns(layout.resolve(heads))
    keys = hopper_fwd.walk_keys(patterns, layout, meta.first_block, meta.num_tiles, meta.rows_per_tile, kv_len)
    kept = (meta.row_ptr[:, 1:] - meta.row_ptr[:, :-1])[meta.head_to_pattern.long()]
    assert keys.shape == (heads, meta.num_tiles)
    assert torch.equal(keys, layout.block_size * kept.long())


def _totals(order, costs, ctas):
    """Work per CTA of a turn order (CTA p takes positions p, p + ctas, ...)."""
    totals = torch.zeros(ctas, dtype=torch.int64)
    totals.index_add_(0, torch.arange(costs.numel()) % ctas, costs[order.long()])
    return totals


def test_balanced_order_evens_out_the_ctas_work_round_by_round():
    # two CTAs, items of cost 5 1 5 1: round robin gives them 10 and 2; here the second round's long item goes to
    # the CTA that took the short one
    order = hopper_fwd.balanced_order(torch.tensor([5, 1, 5, 1]), 2)
    assert order.tolist() == [0, 1, 3, 2, 0, 0] and order.dtype == torch.int32
    gen = torch.Generator().manual_seed(0)
    for n, ctas in ((1000, 7), (2048, 132), (131, 132), (132 * 3, 132)):
        costs = torch.randint(1, 100, (n, ), generator=gen)
        order = hopper_fwd.balanced_order(costs, ctas)
        assert order.numel() == n + ctas and not order[n:].any()  # padded for the load one turn ahead
        order = order[:n].long()
        assert torch.equal(torch.sort(order).values, torch.arange(n))
        for k in range(0, n, ctas):  # each round holds the round robin's items of that round
            assert torch.equal(torch.sort(order[k:k + ctas]).values, torch.arange(k, min(n, k + ctas)))
        assert _totals(order, costs, ctas).max() <= _totals(torch.arange(n), costs, ctas).max()
    # the work items at 8k (L16V16, 32 heads, 132 SMs): the most loaded CTA 5.7 % over the mean in round robin, 3.4 %
    # in balanced turns
    layout = S2Layout(64, 16, 16)
    costs = hopper_fwd.item_costs(layout.head_patterns(layout.resolve(32)), layout, 0, 64, 2, 8192, 1)
    w = torch.arange(costs.numel())
    spread = [(t.max() / t.float().mean()).item() for t in
              (_totals(w, costs, 132), _totals(hopper_fwd.balanced_order(costs, 132)[:w.numel()], costs, 132))]
    assert spread[0] > 1.05 and spread[1] < 1.035, spread


def test_item_grid_orders_the_turns_of_persistent_grids_over_whole_sequences(monkeypatch):
    monkeypatch.setattr(hopper_fwd, "_sm_count", lambda index: 132)
    layout = S2Layout(64, 16, 16)
    meta = types.SimpleNamespace(num_tiles=64, first_block=0, patterns=layout.head_patterns(layout.resolve(32)))
    plan = _plan(device=torch.device("cpu"), kv_len=8192, batch=2, varlen=False)
    items, grid, order = hopper_fwd.item_grid(plan, meta, True, True)
    assert (items, grid, order.numel(), order.device.type) == (64 * 32 * 2, 132, 64 * 32 * 2 + 132, "cpu")
    assert hopper_fwd.item_grid(plan, meta, True, False) == (items, 132, None)  # round robin
    assert hopper_fwd.item_grid(plan, meta, False, True) == (items, items, None)  # one CTA per item
    assert hopper_fwd.item_grid(_plan(device=torch.device("cpu"), kv_len=8192, batch=2, varlen=True), meta,
                                True, True)[2] is None  # packed: the lengths are on the device
    monkeypatch.setattr(hopper_fwd, "_sm_count", lambda index: 10 ** 4)
    assert hopper_fwd.item_grid(plan, meta, True, True) == (items, items, None)  # no more items than CTAs


def test_compile_failure_falls_back_to_the_triton_forward(sm90, monkeypatch):
    """A Triton whose Gluon cannot build the kernel: one warning, nothing launched, and no further attempts."""
    def failing_launch(*args, **kwargs):
        raise CompilationError("k.py", None, "unsupported")

    monkeypatch.setattr(hopper_fwd, "s2_fwd_hopper_kernel", {(1, ): failing_launch}, raising=True)
    monkeypatch.setattr(hopper_fwd, "_sm_count", lambda index: 132, raising=True)
    monkeypatch.setattr(hopper_fwd, "_descriptor", lambda *args: None)
    plan = _plan(varlen=False, num_heads=1, batch=1, q_len=64, group=1, local_blocks=1, vert_stride=1,
                 metadata=lambda rows: (types.SimpleNamespace(num_tiles=1, first_block=0, head_to_pattern=None), None))
    q = torch.empty(1, 64, 1, 128, dtype=torch.bfloat16)
    with pytest.warns(UserWarning, match="Hopper forward failed to compile"):
        launched = hopper_fwd.hopper_forward(plan, hopper_fwd.hopper_tiles(), q, q, q, q, q, None, 1.0)
    assert launched is False
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert hopper_fwd.hopper_forward_tiles(plan, q) is None


def test_op_takes_the_triton_forward_where_the_hopper_forward_declines(monkeypatch):
    """The launcher's contract with op._forward: a False return (no TMA row view) means the Triton kernel runs."""
    calls = []
    monkeypatch.setattr(_op._hopper, "hopper_forward_tiles", lambda plan, q: hopper_fwd.hopper_tiles())
    monkeypatch.setattr(_op._hopper, "hopper_forward", lambda *args: calls.append(1) or False)
    from s2megatron.ops.triton_s2 import triton_s2_attention
    from s2megatron.sparsity import S2Layout
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 40, 2, 16, generator=gen) for _ in range(3))
    out = triton_s2_attention(q, k, v, S2Layout(16, 1, 2), sm_scale=0.25)
    assert calls == [1] and torch.isfinite(out).all()


_SASS = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
        /*0010*/                   STL [R1], R2 ;
.L_x_0:
        /*0020*/                   HGMMA.64x64x16.F32.BF16 R24, gdesc[UR4], R24 ;
        /*0030*/                   {SPILL_IN_LOOP}
.L_x_1:
        /*0040*/                   SYNCS.PHASECHK.TRANS64.TRYWAIT P0, [UR5], R3 ;
        /*0050*/              @!P0 BRA `(.L_x_2) ;
        /*0060*/               @P1 BRA `(.L_x_0) ;
        /*0070*/                   LDL R2, [R1] ;
        /*0080*/                   EXIT ;
.L_x_2:
        /*0090*/                   LDL R5, [R1+0x4] ;
        /*00a0*/                   BRA `(.L_x_1) ;
"""


def test_row_descriptors_only_where_a_tma_copy_covers_exactly_the_rows():
    """The Hopper kernels read (Q and dO, K and V) and write (dQ; dK and dV) through TMA copies of the tensors' row
    views: one descriptor per tensor and the rows per batch entry they share; None (the launcher then declines, and
    the Triton kernel runs) where a tensor has no row view or the tensors lay out their batch entries differently."""
    plan = types.SimpleNamespace(varlen=False, head_dim=64)
    dk, dv = (torch.empty(2, 100, 4, 64, dtype=torch.bfloat16) for _ in range(2))
    desc_k, desc_v, rows_b = hopper_fwd.row_descriptors((dk, dv), plan, 64)
    assert rows_b == 100 and list(desc_k.block_shape) == [64, 64] and list(desc_k.shape) == [200, 256]
    assert list(desc_v.strides) == [256, 1]
    wide = torch.empty(2, 120, 4, 64, dtype=torch.bfloat16)[:, :100]  # 120 rows per batch entry
    assert hopper_fwd.row_descriptors((dk, wide), plan, 64) is None
    assert hopper_fwd.row_descriptors((wide, ), plan, 64)[1] == 120
    shifted = torch.empty(2 * 100 * 4 * 64 + 1, dtype=torch.bfloat16)[1:].view(2, 100, 4, 64)  # not 16-byte aligned
    assert hopper_fwd.row_descriptors((shifted, ), plan, 64) is None
    assert hopper_fwd.row_descriptors((dk.float(), ), plan, 64) is None
    packed = types.SimpleNamespace(varlen=True, head_dim=64)
    desc, rows_b = hopper_fwd.row_descriptors((dk[0], ), packed, 64)
    assert rows_b == 0 and list(desc.shape) == [100, 256]


def test_loop_local_memory_counts_spills_inside_the_key_tile_loops_only():
    """The SASS check behind the budget tests: a spill between a loop's tensor-core instruction and its backward
    branch counts; the spill and reload outside the loop and the out-of-line retry after ``EXIT`` (which branches
    back into the loop) do not."""
    code = ("import json, kernel_resources\n"
            f"sass = {_SASS!r}\n"
            "print(json.dumps([kernel_resources.loop_local_memory(sass.replace('{SPILL_IN_LOOP}', s))"
            " for s in ('NOP ;', 'LDL R6, [R1+0x8] ;', 'STL.64 [R1+0x8], R6 ;')]))")
    assert compiled_in_fresh_process(code) == [0, 1, 1]


@pytest.fixture(scope="module")
def sm90_build():
    """ptxas for sm_90a (Triton ships it) at each of ``BUDGET_SHAPES`` (head dim 128 / block 64, 64 / 64, 128 / 128),
    within the budget every Hopper kernel keeps to (``check_sm90_budget``: 12 warps, the 168-register launch limit,
    the ring within the 227 KB a CTA may use), here with no spills. In a fresh process: the interpreter that these
    tests run under (TRITON_INTERPRET) replaces the jit helpers the kernel calls. Compiled once for the tests below."""
    return check_sm90_budget("forward", hopper_fwd.hopper_tiles().maxnreg, 0, 0)


def test_compiles_for_sm90_within_its_budget(sm90_build):
    assert len(sm90_build) == len(BUDGET_SHAPES)


def test_output_rows_go_out_in_eight_byte_stores_without_shared_memory(sm90_build):
    """Each consumer stores its 64 x d output tile in 8-byte stores, d / 8 per thread (four-byte stores straight from
    the MMA layout would be twice as many), plus one four-byte lse store for each of its two rows per thread, and the
    regrouping before them (``_eight_byte_rows``) goes through warp shuffles: no ``ldmatrix`` (Triton's shared-memory
    path for a layout conversion), and no shared memory beyond the query tile, the K/V ring and their barriers."""
    tiles = hopper_fwd.hopper_tiles()
    for (d, _), row in zip(BUDGET_SHAPES, sm90_build):
        assert row["global_stores"] == {"st.global.v2.b32": 2 * d // 8, "st.global.b32": 2 * 2}, row
        assert row["ldmatrix"] == 0, row
        buffers = 2 * (tiles.block_m * d + tiles.stages * 2 * tiles.block_n * d)  # the query tile, the K/V ring
        assert buffers <= row["shared_bytes"] <= buffers + 1024, row


def test_layout_and_head_counts_are_compile_time_constants(sm90_build):
    """The layout's local blocks and vertical stride, the head count and the GQA group are compile-time constants of
    the forward, so the walks, masks and work-item numbers divide by them in products and shifts; the one division
    left at run time is of the work item by the number of query tiles, once per partition (two consumers, the
    producer). With all of them as run-time values the PTX held 25 divisions and remainders."""
    check_layout_constants(hopper_fwd.s2_fwd_hopper_kernel, sm90_build)


def _run_rescale_ptx(asm: str, acc: list, alpha: list):
    """Execute :func:`hopper_fwd._rescale_asm`'s PTX (its five instruction forms) on one thread's registers: ``acc``
    in ``$pack + r`` (tied to ``$r``), ``alpha`` in ``$2 pack + r``; returns (the outputs, the products executed)."""
    pack = len(acc)
    regs = {f"${r}": float(x) for r, x in enumerate(acc)}
    regs.update({f"${pack + r}": float(x) for r, x in enumerate(acc)})
    regs.update({f"${2 * pack + r}": float(x) for r, x in enumerate(alpha)})
    one = "0f3F800000"
    lines = [line.strip() for line in asm.splitlines()]
    keep, products, i = None, 0, 0
    while i < len(lines):
        op, *args = lines[i].rstrip(";").replace(",", " ").split()
        if op == "setp.eq.f32":
            assert args[0] == "keep" and args[2] == one, lines[i]
            keep = regs[args[1]] == 1.0
        elif op == "setp.eq.and.f32":
            assert args[0] == "keep" and args[2] == one and args[3] == "keep", lines[i]
            keep = keep and regs[args[1]] == 1.0
        elif op == "@keep":
            assert args == ["bra", "DONE"], lines[i]
            if keep:
                i = lines.index("DONE:")
        elif op == "mul.f32":
            regs[args[0]] = regs[args[1]] * regs[args[2]]
            products += 1
        else:
            assert op in ("{", "}", ".reg", "DONE:"), lines[i]
        i += 1
    return [regs[f"${r}"] for r in range(pack)], products


def test_rescale_skips_the_products_only_where_every_row_of_the_thread_keeps_its_reference():
    """O *= alpha in the pipelined loop (``_rescale``): the registers of a thread hold two rows (the MMA
    accumulator's register bases: column 1, row 8, then columns 8, 16, ...); the PTX tests one alpha per row and
    skips all the products only when both are 1. Each register is multiplied by its own row's alpha otherwise."""
    bases = [[0, 1], [8, 0], [0, 8], [0, 16]]
    asm = hopper_fwd._rescale_asm(bases, 16)
    assert asm.count("setp.") == 2, asm  # one test per row
    acc = [float(r + 1) for r in range(16)]
    row8 = [bool(r & 2) for r in range(16)]  # register bit 1 is the row-8 basis
    for a0, a8 in ((1.0, 1.0), (0.5, 1.0), (1.0, 0.25), (0.5, 0.25)):
        out, products = _run_rescale_ptx(asm, acc, [a8 if r else a0 for r in row8])
        assert out == [x * (a8 if r else a0) for x, r in zip(acc, row8)], (a0, a8, out)
        assert products == (0 if a0 == a8 == 1.0 else 16), (a0, a8, products)
    assert hopper_fwd._rescale_constraints(2) == "=r,=r,0,1,r,r"


_ENV.restore()  # last line: the interpreter only while this module imports and runs
