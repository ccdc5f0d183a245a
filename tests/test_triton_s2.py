"""Triton S2 kernels (forward and backward) against the float64 reference.

Without CUDA the kernels run under the Triton interpreter (TRITON_INTERPRET=1, set here only when CUDA is absent and
before the kernels are decorated); with CUDA the same tests run on the GPU. Sizes are small (CI: 2 CPU cores) but
every length reaches well past local_blocks * block_size, where the pattern differs from dense causal.
"""
import dataclasses
import math

import pytest
import torch

from triton_interpret import DEVICE, InterpreterEnv, compiled_in_fresh_process, interpreted  # noqa: E402
from numerics import rel_err  # noqa: E402

_ENV = InterpreterEnv()  # before triton and the kernels are imported

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from s2megatron.ops import s2_attention  # noqa: E402
from s2megatron.ops.reference import reference_attention  # noqa: E402
from s2megatron.ops.triton_s2 import kernels as _kernels  # noqa: E402
from s2megatron.ops.triton_s2 import op as _op  # noqa: E402
from s2megatron.ops.triton_s2 import triton_s2_attention  # noqa: E402
from s2megatron.sparsity import BlockMaskLayout, S2Layout, get_metadata  # noqa: E402

_kernels = interpreted(_kernels, "s2_fwd_kernel")


_interpreter_env = _ENV.fixture()


TOL = {torch.float32: 2e-4, torch.bfloat16: 1e-2, torch.float16: 3e-3}


def make_inputs(shape_q, shape_kv, dtype, seed):
    g = torch.Generator(device="cpu").manual_seed(seed)
    q = torch.randn(*shape_q, generator=g).to(DEVICE, dtype)
    k = torch.randn(*shape_kv, generator=g).to(DEVICE, dtype)
    v = torch.randn(*shape_kv, generator=g).to(DEVICE, dtype)
    return q, k, v


def run_and_check(layout, q, k, v, *, cu_seqlens=None, heads=None, tol=None, via_dispatch=False, seed=0):
    """Forward (out, lse) and backward (through out and lse) of the Triton path vs the float64 reference.

    Returns the Triton gradients (dq, dk, dv)."""
    heads = heads or {}
    tol = tol or TOL[q.dtype]
    d = q.shape[-1]
    sm_scale = 1.0 / math.sqrt(d)
    qt, kt, vt = (x.detach().clone().requires_grad_() for x in (q, k, v))
    if via_dispatch:
        out, lse = s2_attention(qt, kt, vt, layout, cu_seqlens=cu_seqlens, return_lse=True, backend="triton", **heads)
    else:
        out, lse = triton_s2_attention(qt, kt, vt, layout, sm_scale=sm_scale, cu_seqlens=cu_seqlens, return_lse=True,
                                       **heads)
    assert out.shape == q.shape and out.dtype == q.dtype
    q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
    ref_out, ref_lse = reference_attention(q64, k64, v64, layout, sm_scale=sm_scale,
                                           cu_seqlens=None if cu_seqlens is None else cu_seqlens.cpu(), **heads)
    assert lse.shape == ref_lse.shape
    g = torch.Generator(device="cpu").manual_seed(seed + 1)
    dout = torch.randn(out.shape, generator=g).to(DEVICE, out.dtype)
    dlse = torch.randn(lse.shape, generator=g).to(DEVICE) * 0.5
    grads = torch.autograd.grad((out.float() * dout.float()).sum() + (lse * dlse).sum(), (qt, kt, vt))
    ref_grads = torch.autograd.grad((ref_out * dout.double()).sum() + (ref_lse * dlse.double()).sum(),
                                    (q64, k64, v64))
    for name, got, ref in (("out", out, ref_out), ("lse", lse, ref_lse), *zip(("dq", "dk", "dv"), grads, ref_grads)):
        assert torch.isfinite(got).all(), f"{name} has non-finite values"
        err = rel_err(got, ref.detach())
        assert err < tol, f"{name}: relative error {err:.2e} >= {tol:.0e}"
    return grads


@triton.jit
def _walk_probe(RES, OUT_J, OUT_LAST, OUT_N, num_tiles, first_block, kv_end, local_blocks, vert_stride,
                MAX_ENT: tl.constexpr, BS: tl.constexpr, ROWS: tl.constexpr):
    pat = tl.program_id(0)
    tile = tl.program_id(1)
    n, w0, w1, w2, w3, width = _kernels._row_walk(RES, RES, pat, tile, num_tiles, first_block, kv_end, local_blocks,
                                                  vert_stride, BS, ROWS, True)
    slot = pat * num_tiles + tile
    tl.store(OUT_N + slot, n)
    for e in range(0, n):
        j, last = _kernels._row_entry(e, e < n, w0, w1, w2, w3, width, vert_stride, RES, RES, ROWS, True)
        tl.store(OUT_J + slot * MAX_ENT + e, j)
        tl.store(OUT_LAST + slot * MAX_ENT + e, last)


@pytest.mark.parametrize("block,local,stride,dense_heads,q_len,kv_len,rows", [
    (64, 2, 3, 0, 448, 448, 2), (16, 3, 5, 1, 300, 700, 8), (32, 1, 4, 0, 333, 333, 4), (128, 4, 2, 2, 900, 1900, 1),
    (64, 16, 16, 0, 3000, 3000, 2), (64, 3, 1, 0, 500, 500, 2)])
def test_analytic_row_walk_matches_metadata(block, local, stride, dense_heads, q_len, kv_len, rows):
    """The kernels compute S2 row lists from the formula; they must equal the metadata's lists (and last rows, for
    the rows that exist)."""
    lay = S2Layout(block, local, stride, num_dense_heads=dense_heads)
    heads = 8
    meta = get_metadata(lay, heads, q_len, kv_len, rows_per_tile=rows, device=DEVICE)
    ameta = _op._analytic_meta(lay, heads, heads, 0, None, None, q_len, kv_len, rows, meta.head_to_pattern.device)
    assert (ameta.first_block, ameta.last_block, ameta.num_tiles, ameta.num_key_blocks) == (
        meta.first_block, meta.last_block, meta.num_tiles, meta.num_key_blocks)
    assert torch.equal(ameta.head_to_pattern, meta.head_to_pattern)
    res = ameta.residues
    p, t = meta.num_patterns, meta.num_tiles
    max_ent = meta.num_key_blocks
    out_j = torch.full((p * t * max_ent,), -9, dtype=torch.int32, device=DEVICE)
    out_last, out_n = out_j.clone(), torch.zeros(p * t, dtype=torch.int32, device=DEVICE)
    _walk_probe[(p, t)](res, out_j, out_last, out_n, t, meta.first_block, kv_len, local, stride, MAX_ENT=max_ent,
                        BS=block, ROWS=rows)
    for pat in range(p):
        for tile in range(t):
            a, b = meta.row_ptr[pat, tile].item(), meta.row_ptr[pat, tile + 1].item()
            slot = pat * t + tile
            n = out_n[slot].item()
            got_j = out_j[slot * max_ent: slot * max_ent + n]
            assert got_j.tolist() == meta.row_cols[a:b].tolist(), (pat, tile)
            rows_here = min(rows, meta.last_block + 1 - (meta.first_block + tile * rows))
            got_last = out_last[slot * max_ent: slot * max_ent + n].clamp(max=rows_here - 1)
            assert got_last.tolist() == meta.row_last[a:b].tolist(), (pat, tile)


@triton.jit
def _col_probe(RES, OUT, first_block, kv_end, local_blocks, vert_stride, NK: tl.constexpr, BS: tl.constexpr):
    pat = tl.program_id(0)
    j = tl.arange(0, NK)
    has, lo, hi = _kernels._col_run(RES, RES, RES, pat, j, j * BS < kv_end, first_block, kv_end, local_blocks,
                                    vert_stride, BS, True)
    tl.store(OUT + pat * 3 * NK + j, has.to(tl.int32))
    tl.store(OUT + pat * 3 * NK + NK + j, lo)
    tl.store(OUT + pat * 3 * NK + 2 * NK + j, hi)


@pytest.mark.parametrize("block,local,stride,dense_heads,q_len,kv_len", [
    (64, 2, 3, 0, 448, 448), (16, 3, 5, 1, 300, 700), (128, 4, 2, 2, 900, 1900), (64, 16, 16, 0, 3000, 3000)])
def test_analytic_column_runs_match_metadata(block, local, stride, dense_heads, q_len, kv_len):
    """dK/dV computes each key block's run of keeping query blocks from the formula; it must equal the first and
    last entries of the metadata's column lists (and be empty exactly where they are)."""
    lay = S2Layout(block, local, stride, num_dense_heads=dense_heads)
    heads = 8
    meta = get_metadata(lay, heads, q_len, kv_len, device=DEVICE)
    ameta = _op._analytic_meta(lay, heads, heads, 0, None, None, q_len, kv_len, 1, meta.head_to_pattern.device)
    nk = meta.num_key_blocks
    npow = triton.next_power_of_2(nk)
    p = meta.num_patterns
    out = torch.full((p * 3 * npow,), -9, dtype=torch.int32, device=DEVICE)
    _col_probe[(p,)](ameta.residues, out, meta.first_block, kv_len, local, stride, NK=npow, BS=block)
    out = out.view(p, 3, npow)[:, :, :nk].cpu()
    for pat in range(p):
        for j in range(nk):
            cs, ce = meta.col_ptr[pat, j].item(), meta.col_ptr[pat, j + 1].item()
            assert bool(out[pat, 0, j]) == (ce > cs), (pat, j)
            if ce > cs:
                assert (out[pat, 1, j].item(), out[pat, 2, j].item()) == (
                    meta.col_rows[cs].item(), meta.col_rows[ce - 1].item()), (pat, j)


def test_sparse_differs_from_dense_at_test_lengths():
    """Guard: at these lengths the pattern matters, so a pattern bug cannot hide behind dense causal."""
    q, k, v = make_inputs((1, 448, 2, 64), (1, 448, 2, 64), torch.float64, 0)
    sparse, _ = reference_attention(q, k, v, S2Layout(64, 2, 3), sm_scale=0.125)
    dense, _ = reference_attention(q, k, v, S2Layout(64, 1, 1), sm_scale=0.125)
    assert (sparse - dense).abs().max() > 0.1


def test_s2_block64_heads_heterogeneous_via_dispatch():
    q, k, v = make_inputs((1, 448, 4, 64), (1, 448, 4, 64), torch.float32, 1)
    run_and_check(S2Layout(64, 2, 3), q, k, v, via_dispatch=True)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision(dtype):
    q, k, v = make_inputs((2, 448, 2, 64), (2, 448, 2, 64), dtype, 2)
    run_and_check(S2Layout(64, 2, 3), q, k, v)


def test_merge_q_block16():
    """Block 16 under the forward's 64-row and dQ's 128-row query tiles: four and eight layout rows share one union
    list (rows_per_tile 4 and 8)."""
    q, k, v = make_inputs((1, 320, 2, 32), (1, 320, 2, 32), torch.float32, 3)
    lay = S2Layout(16, 3, 5)
    meta = get_metadata(lay, 2, 320, rows_per_tile=8)
    assert (meta.row_last < 7).any()  # some kept blocks are masked for upper rows of a tile
    run_and_check(lay, q, k, v)


def test_block128_and_block32():
    q, k, v = make_inputs((1, 448, 2, 64), (1, 448, 2, 64), torch.float32, 4)
    run_and_check(S2Layout(128, 1, 2), q, k, v)
    run_and_check(S2Layout(32, 3, 4, sliding_offset=0), q, k, v)


def _random_custom_mask(num_heads, num_blocks, seed):
    g = torch.Generator().manual_seed(seed)
    m = torch.rand(num_heads, num_blocks, num_blocks, generator=g) < 0.35
    m |= torch.eye(num_blocks, dtype=torch.bool)  # every row keeps its diagonal block
    return m


def test_custom_layout_small_blocks_not_kv_efficient():
    """dkernel D4: a custom layout that is not KV-cache efficient with block < 64 must keep its exact mask in
    forward and backward (no Merge-Q), not the merged row union."""
    lay = BlockMaskLayout(_random_custom_mask(2, 16, 5), block_size=16)
    assert not lay.is_kv_cache_efficient()
    q, k, v = make_inputs((1, 250, 2, 32), (1, 250, 2, 32), torch.float32, 5)
    run_and_check(lay, q, k, v)


def test_custom_layout_kv_efficient_merges():
    m = torch.tril(torch.ones(7, 7, dtype=torch.bool))
    m[:, 2:4] &= torch.arange(7)[:, None] <= 4  # columns 2, 3 kept by rows up to 4 only: still a run per column
    m[:, 0] = True
    lay = BlockMaskLayout(m[None], block_size=64)
    assert lay.is_kv_cache_efficient()
    q, k, v = make_inputs((1, 448, 2, 64), (1, 448, 2, 64), torch.float32, 6)
    run_and_check(lay, q, k, v)


def test_gqa_heterogeneous_group_deterministic():
    """dkernel D3: GQA in training (K/V never repeated); heads of one group have different patterns; the dK/dV sum
    over the group is deterministic (bitwise equal twice)."""
    lay = S2Layout(64, 2, 4)
    q, k, v = make_inputs((1, 448, 4, 64), (1, 448, 2, 64), torch.float32, 7)
    meta = get_metadata(lay, 4, 448, num_kv_heads=2)
    assert meta.head_to_pattern[0] != meta.head_to_pattern[1]  # one group, two patterns
    g1 = run_and_check(lay, q, k, v)
    qt, kt, vt = (x.detach().clone().requires_grad_() for x in (q, k, v))
    out = triton_s2_attention(qt, kt, vt, lay, sm_scale=0.125)
    g2 = torch.autograd.grad(out, (qt, kt, vt), torch.ones_like(out))
    g3 = torch.autograd.grad(triton_s2_attention(qt, kt, vt, lay, sm_scale=0.125), (qt, kt, vt), torch.ones_like(out))
    for a, b in zip(g2, g3):
        assert torch.equal(a, b)
    assert g1[1].shape == k.shape


def test_varlen_packed():
    cu = torch.tensor([0, 77, 300, 448], dtype=torch.int32, device=DEVICE)
    q, k, v = make_inputs((448, 2, 64), (448, 1, 64), torch.float32, 8)
    run_and_check(S2Layout(64, 2, 3), q, k, v, cu_seqlens=cu)


def test_varlen_without_max_seqlen_on_device_uses_packed_bound():
    cu = torch.tensor([0, 200, 320], dtype=torch.int32, device=DEVICE)
    q, k, v = make_inputs((320, 2, 32), (320, 2, 32), torch.float32, 9)
    lay = S2Layout(32, 2, 3)
    out = triton_s2_attention(q, k, v, lay, sm_scale=0.2, cu_seqlens=cu, max_seqlen=320)  # the T bound
    ref, _ = reference_attention(q.double(), k.double(), v.double(), lay, sm_scale=0.2, cu_seqlens=cu.cpu())
    assert rel_err(out, ref) < TOL[torch.float32]


@pytest.mark.parametrize("q_len,kv_len,block", [(130, 448, 64), (100, 300, 32)])
def test_kv_prefix_chunked_prefill(q_len, kv_len, block):
    """dkernel D6: chunked prefill (1 < q_len < kv_len, prefix not block aligned) reads the right pattern rows;
    backward gives dK/dV for the prefix keys too."""
    q, k, v = make_inputs((1, q_len, 2, 64), (1, kv_len, 2, 64), torch.float32, 10)
    run_and_check(S2Layout(block, 2, 3), q, k, v)


def test_decode_inside_merged_tile():
    """dkernel D5: a query whose layout row is not the first row of a merged tile must not attend the union of the
    tile's rows. Single decode queries at several in-block offsets, and a short chunk whose queries span sub-rows
    0..2 of one merged tile (block 16: the forward's 4-row tile, dQ's 8-row tile)."""
    lay = S2Layout(16, 2, 5)
    for past in (212, 220, 239):
        q, k, v = make_inputs((1, 1, 2, 64), (1, past + 1, 2, 64), torch.float32, past)
        run_and_check(lay, q, k, v)
    q, k, v = make_inputs((1, 40, 2, 64), (1, 240, 2, 64), torch.float32, 11)
    meta = get_metadata(lay, 2, 40, 240, rows_per_tile=8)
    assert meta.num_tiles == 1 and meta.last_block - meta.first_block == 2
    run_and_check(lay, q, k, v)


@pytest.mark.parametrize("head_dim", [80, 24, 33])
def test_head_dims_not_power_of_two(head_dim):
    """dkernel D1/D2: head dims that are not a power of two (and 2^k+1) are masked correctly. q/k/v are slices of
    NaN-filled buffers, so reading one dim too far (or another head) poisons the output."""
    s, h = 192, 2
    bufs = []
    for seed, heads in ((12, h), (13, h), (14, h)):
        buf = torch.full((1, s, heads + 1, 64 if head_dim <= 64 else 128), float("nan"), device=DEVICE)
        vals = torch.randn(1, s, heads, head_dim, generator=torch.Generator().manual_seed(seed))
        buf[:, :, :heads, :head_dim] = vals.to(DEVICE)
        bufs.append(buf[:, :, :heads, :head_dim])
    run_and_check(S2Layout(32, 2, 3), *bufs)


def _nan_padded(shape, head_dim, seed, dtype=torch.float32):
    """A [.., heads, head_dim] view of a NaN-filled buffer one head and some dims wider: any read outside the view
    poisons the result."""
    *lead, heads, _ = shape
    buf = torch.full((*lead, heads + 1, max(head_dim, 64) + 16), float("nan"), device=DEVICE, dtype=dtype)
    buf[..., :heads, :head_dim] = torch.randn(*lead, heads, head_dim,
                                              generator=torch.Generator().manual_seed(seed)).to(DEVICE, dtype)
    return buf[..., :heads, :head_dim]


@pytest.mark.parametrize("layout,head_dim,heads,kv_heads,q_len,kv_len", [
    (S2Layout(64, 5, 3), 80, 4, 2, 900, 900),
    (S2Layout(128, 3, 2), 64, 2, 1, 1000, 1000),
    (S2Layout(64, 4, 2, num_dense_heads=1), 64, 2, 2, 300, 900),
])
def test_interior_tiles_of_long_local_windows(layout, head_dim, heads, kv_heads, q_len, kv_len):
    """Local windows longer than a query tile: most key tiles are interior (every row keeps them, all below the
    tile: loaded and computed without masks), the first local and the diagonal tiles masked. GQA, a dense head, a
    KV prefix, block 128 (two key tiles per block) and head dim 80 in NaN-padded buffers."""
    q = _nan_padded((1, q_len, heads, head_dim), head_dim, 21)
    k = _nan_padded((1, kv_len, kv_heads, head_dim), head_dim, 22)
    v = _nan_padded((1, kv_len, kv_heads, head_dim), head_dim, 23)
    run_and_check(layout, q, k, v)


@pytest.mark.parametrize("fwd_rows,dq_rows", [(128, 64), (64, 128), (128, 128)])
def test_forward_and_dq_query_tiles_independent(monkeypatch, fwd_rows, dq_rows):
    """The forward and dQ query tiles are chosen separately (config.TileConfig.fwd_block_m / block_m), each with
    its own metadata. Every pairing gives the reference result: block 16 merges 4 or 8 layout rows per tile, block
    64 with a long window has interior tiles, and a KV prefix starts the queries inside a tile."""
    from s2megatron.ops.triton_s2 import config as tiles
    base = tiles.tile_config

    def swapped(block_size, head_dim, merge_q, *args, **kw):
        cfg = base(block_size, head_dim, merge_q, *args, **kw)
        if not merge_q:
            return cfg
        fwd_m, dq_m = max(fwd_rows, block_size), max(dq_rows, block_size)
        return dataclasses.replace(cfg, fwd_block_m=fwd_m, block_m=dq_m, fwd_warps=8 if fwd_m >= 128 else 4,
                                   dq_warps=8 if dq_m >= 128 else 4)

    monkeypatch.setattr(tiles, "tile_config", swapped)
    run_and_check(S2Layout(16, 3, 5), *make_inputs((1, 320, 2, 32), (1, 320, 2, 32), torch.float32, 31))
    run_and_check(S2Layout(64, 5, 3), *make_inputs((1, 700, 4, 64), (1, 700, 2, 64), torch.float32, 32))
    run_and_check(S2Layout(32, 2, 3), *make_inputs((1, 150, 2, 64), (1, 400, 2, 64), torch.float32, 33))


_TILE_CONFIG = _op._config.tile_config  # the shipped tile choice, before any test patches it


def _tiles_replaced(monkeypatch, **fields):
    """Every call's tiles are the shipped ones with ``fields`` replaced."""
    monkeypatch.setattr(_op._config, "tile_config",
                        lambda *args, **kw: dataclasses.replace(_TILE_CONFIG(*args, **kw), **fields))


def _descriptor_variants(monkeypatch, enabled):
    """Tile configs with descriptor loads switched on or off in every Triton kernel; returns a list that records,
    per launch, whether the kernel got descriptors. The Hopper kernels, which would take some of the calls on an
    sm_90 GPU (and always read through descriptors), are switched off."""
    for kernel in ("FWD", "DQ", "BWD"):
        monkeypatch.setenv(f"S2MEGATRON_HOPPER_{kernel}", "0")
    used, pick = [], _op._row_descriptors

    def spy(*args):
        out = pick(*args)
        used.append(out[3])
        return out

    _tiles_replaced(monkeypatch, fwd_tma=enabled, dq_tma=enabled, dkdv_tma=enabled)
    monkeypatch.setattr(_op, "_row_descriptors", spy)
    return used


def test_row_descriptor_only_where_a_tma_copy_reads_exactly_the_head():
    """A descriptor over the token rows is built for 16-bit tensors whose head dim fills the tile, with 16-byte
    aligned strides and batch entries a whole number of rows apart; otherwise the kernels keep pointer loads."""
    x = torch.zeros(2, 96, 3, 64, dtype=torch.bfloat16, device=DEVICE)
    desc, rows_b = _op.row_descriptor(x, False, 64, 64)
    assert rows_b == 96 and list(desc.shape) == [2 * 96, 3 * 64] and list(desc.strides) == [3 * 64, 1]
    packed, rows_b = _op.row_descriptor(x[0], True, 64, 64)
    assert rows_b == 0 and list(packed.shape) == [96, 3 * 64]
    padded = _nan_padded((2, 96, 3, 64), 64, 1, torch.bfloat16)  # heads 80 apart, rows of 4 * 80: span of 3 heads
    desc, rows_b = _op.row_descriptor(padded, False, 64, 64)
    assert rows_b == 96 and list(desc.shape) == [2 * 96, 2 * 80 + 64] and list(desc.strides) == [4 * 80, 1]
    assert _op.row_descriptor(x.float(), False, 64, 64)[0] is None                       # 32-bit
    assert _op.row_descriptor(x[..., :48], False, 64, 64)[0] is None                     # head dim below the tile
    assert _op.row_descriptor(x.transpose(0, 1), False, 64, 64)[0] is None               # batch entries interleaved
    odd = torch.zeros(1, 96, 2, 68, dtype=torch.bfloat16, device=DEVICE)[..., :64]
    assert _op.row_descriptor(odd, False, 64, 64)[0] is None                             # 136-byte head stride
    assert _op.row_descriptor(x[:, :1].expand(2, 96, 3, 64), False, 64, 64)[0] is None  # one token row repeated


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_descriptor_loads_equal_pointer_loads(monkeypatch, dtype):
    """Interior tiles read through tensor descriptors (K/V in the forward and dQ, Q/dO in dK/dV) give the
    reference result and, under the interpreter, the pointer path's result bit for bit: two batch entries with GQA,
    views into NaN-padded buffers (any read past the head poisons the result), and a packed varlen batch."""
    lay = S2Layout(64, 3, 3)
    q = _nan_padded((2, 640, 4, 64), 64, 51, dtype)
    k = _nan_padded((2, 640, 2, 64), 64, 52, dtype)
    v = _nan_padded((2, 640, 2, 64), 64, 53, dtype)
    cu = torch.tensor([0, 200, 840, 1280], dtype=torch.int32, device=DEVICE)
    packed = [x.reshape(-1, *x.shape[2:]) for x in make_inputs((2, 640, 4, 64), (2, 640, 2, 64), dtype, 54)]
    results = []
    for enabled in (True, False):
        used = _descriptor_variants(monkeypatch, enabled)
        grads = run_and_check(lay, q, k, v, seed=55)
        grads_packed = run_and_check(lay, *packed, cu_seqlens=cu, seed=56)
        assert used == [enabled] * 6  # forward, dQ, dK/dV of both calls
        results.append((*grads, *grads_packed))
    if DEVICE == "cpu":
        assert all(torch.equal(a, b) for a, b in zip(*results))


def test_dkdv_program_order_leaves_gradients_unchanged(monkeypatch):
    """dK/dV programs run kv head fastest for short sequences and one head's key tiles together for long ones
    (``TileConfig.dkdv_heads_fastest_below``); each program owns its key tile, so both orders give the same
    gradients bit for bit: two batch entries with GQA and a dense head, and a packed varlen batch."""
    lay = S2Layout(64, 2, 3, num_dense_heads=1)
    q, k, v = make_inputs((2, 520, 4, 64), (2, 520, 2, 64), torch.bfloat16, 81)
    cu = torch.tensor([0, 130, 1040], dtype=torch.int32, device=DEVICE)
    packed = [x.reshape(-1, *x.shape[2:]) for x in (q, k, v)]
    results = []
    for below in (0, 1 << 40):  # key tiles together everywhere, then kv head fastest everywhere
        _tiles_replaced(monkeypatch, dkdv_heads_fastest_below=below)
        results.append((*run_and_check(lay, q, k, v, seed=82), *run_and_check(lay, *packed, cu_seqlens=cu, seed=83)))
    assert all(torch.equal(a, b) for a, b in zip(*results))
    assert _TILE_CONFIG(64, 128, True).dkdv_heads_fastest_below == 65536


def test_launch_device_and_tma_gate(monkeypatch):
    """Triton launches on the current CUDA device, so the launchers make the tensors' device current when it is not;
    descriptor loads are used only from compute capability 9.0 (TMA) on."""
    import contextlib
    from s2megatron.triton_runtime import on_device
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    assert isinstance(on_device(torch.device("cpu")), contextlib.nullcontext)
    assert isinstance(on_device(torch.device("cuda", 0)), contextlib.nullcontext)
    guard = on_device(torch.device("cuda", 1))
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1
    for capability, has in (((8, 0), False), ((8, 9), False), ((9, 0), True), ((10, 0), True)):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index, c=capability: c)
        _op._has_tma.cache_clear()
        assert _op._has_tma(0) is has
    _op._has_tma.cache_clear()


def test_packed_qkv_views_get_gradients():
    """dkernel D8: q/k/v as views of one packed buffer: the packed gradient is assembled correctly."""
    qkv = torch.randn(1, 320, 3, 2, 64, generator=torch.Generator().manual_seed(15)).to(DEVICE).requires_grad_()
    lay = S2Layout(64, 2, 3)
    out = triton_s2_attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], lay, sm_scale=0.125)
    dout = torch.randn_like(out)
    (grad,) = torch.autograd.grad(out, qkv, dout)
    ref_in = qkv.detach().double().requires_grad_()
    ref, _ = reference_attention(ref_in[:, :, 0], ref_in[:, :, 1], ref_in[:, :, 2], lay, sm_scale=0.125)
    (ref_grad,) = torch.autograd.grad(ref, ref_in, dout.double())
    assert rel_err(grad, ref_grad) < TOL[torch.float32]


def test_dense_layout_same_kernel():
    q, k, v = make_inputs((1, 256, 2, 64), (1, 256, 2, 64), torch.float32, 16)
    run_and_check(S2Layout(64, 1, 1), q, k, v)


def test_lse_only_gradient_and_tensor_parallel_heads():
    """Gradient through lse alone (no out gradient), with global head ids of a tensor-parallel rank."""
    lay = S2Layout(64, 2, 4)
    heads = dict(head_offset=2, total_heads=4, total_kv_heads=2)
    q, k, v = make_inputs((1, 384, 2, 64), (1, 384, 1, 64), torch.float32, 17)
    qt, kt, vt = (x.clone().requires_grad_() for x in (q, k, v))
    _, lse = triton_s2_attention(qt, kt, vt, lay, sm_scale=0.125, return_lse=True, **heads)
    grads = torch.autograd.grad(lse.sum(), (qt, kt, vt))
    q64, k64, v64 = (x.double().requires_grad_() for x in (q, k, v))
    _, ref_lse = reference_attention(q64, k64, v64, lay, sm_scale=0.125, **heads)
    assert rel_err(lse, ref_lse) < TOL[torch.float32]
    ref = torch.autograd.grad(ref_lse.sum(), (q64, k64))
    for a, b in zip(grads, ref):
        assert rel_err(a, b) < TOL[torch.float32]
    assert torch.equal(grads[2], torch.zeros_like(v))  # lse does not depend on v


@pytest.mark.parametrize("custom", [False, True])
def test_torch_compile_fullgraph(custom):
    """The op compiles into one graph with its backward (an S2Layout, or a custom layout already used eagerly): the
    graph holds the custom op, and its gradients equal the eager path's (an autograd function around the same
    launchers) bit for bit."""
    if custom:
        lay = BlockMaskLayout(torch.tril(torch.ones(1, 4, 4, dtype=torch.bool)), block_size=64)
        triton_s2_attention(*make_inputs((1, 64, 2, 64), (1, 64, 2, 64), torch.float32, 20), lay, sm_scale=0.125)
    else:
        lay = S2Layout(64, 2, 3)
    q, k, v = make_inputs((1, 256, 2, 64), (1, 256, 2, 64), torch.float32, 18)

    def f(q, k, v):
        return triton_s2_attention(q, k, v, lay, sm_scale=0.125).square().sum()

    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return torch._dynamo.backends.debugging.aot_eager(gm, example_inputs)

    compiled = torch.compile(f, fullgraph=True, backend=backend)
    qt, kt, vt = (x.clone().requires_grad_() for x in (q, k, v))
    loss = compiled(qt, kt, vt)
    grads = torch.autograd.grad(loss, (qt, kt, vt))
    qe, ke, ve = (x.clone().requires_grad_() for x in (q, k, v))
    ref_loss = f(qe, ke, ve)
    ref = torch.autograd.grad(ref_loss, (qe, ke, ve))
    assert len(graphs) == 1 and "s2megatron.triton_s2_fwd" in graphs[0].code
    assert torch.allclose(loss, ref_loss)
    for a, b in zip(grads, ref):
        assert torch.equal(a, b)


@pytest.mark.parametrize("reentrant", [True, False])
def test_activation_checkpointing_reruns_the_same_forward(reentrant):
    """Under activation checkpointing (reentrant like megatron's recompute, or not) the forward runs again in the
    backward: the gradients equal those of the plain call bit for bit, and an unused lse gradient stays unused."""
    from torch.utils.checkpoint import checkpoint
    lay = S2Layout(32, 3, 4)
    q, k, v = make_inputs((1, 400, 4, 64), (1, 400, 2, 64), torch.float32, 41)
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(42)).to(DEVICE)

    def layer(q, k, v):
        return triton_s2_attention(q, k, v, lay, sm_scale=0.125) * 2.0

    grads = []
    for wrap in (False, True):
        qt, kt, vt = (x.clone().requires_grad_() for x in (q, k, v))
        out = checkpoint(layer, qt, kt, vt, use_reentrant=reentrant) if wrap else layer(qt, kt, vt)
        out.backward(dout)  # (reentrant checkpointing does not support autograd.grad)
        grads.append((qt.grad, kt.grad, vt.grad))
    assert all(torch.equal(a, b) for a, b in zip(*grads))
    q64, k64, v64 = (x.double().requires_grad_() for x in (q, k, v))
    ref = reference_attention(q64, k64, v64, lay, sm_scale=0.125)[0] * 2.0
    for got, want in zip(grads[1], torch.autograd.grad(ref, (q64, k64, v64), dout.double())):
        assert rel_err(got, want) < TOL[torch.float32]


def test_layout_registry_and_metadata_cache():
    """dkernel D7 (a cache that aliases objects): equal layouts share one key and one metadata object; different
    layouts never do."""
    a, b, c = S2Layout(64, 2, 3), S2Layout(64, 2, 3), S2Layout(64, 2, 4)
    assert _op.layout_key(a) == _op.layout_key(b) != _op.layout_key(c)
    assert get_metadata(a, 2, 256, device=DEVICE) is get_metadata(b, 2, 256, device=DEVICE)
    assert get_metadata(a, 2, 256, device=DEVICE) is not get_metadata(c, 2, 256, device=DEVICE)


def test_bad_inputs_raise():
    lay = S2Layout(64, 2, 3)
    q, k, v = make_inputs((1, 64, 2, 64), (1, 64, 2, 64), torch.float32, 19)
    with pytest.raises(ValueError, match="float64"):
        triton_s2_attention(q.double(), k.double(), v.double(), lay, sm_scale=0.1)
    big = torch.zeros(1, 64, 2, 320, device=DEVICE)
    with pytest.raises(ValueError, match="head dim 320"):
        triton_s2_attention(big, big, big, lay, sm_scale=0.1)
    with pytest.raises(ValueError, match="multiple of kv heads"):
        triton_s2_attention(q, k[:, :, :1].expand(1, 64, 3, 64), v[:, :, :1].expand(1, 64, 3, 64), lay, sm_scale=0.1)
    cu = torch.tensor([0, 64], dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match="max_seqlen"):
        triton_s2_attention(q[0], k[0], v[0], lay, sm_scale=0.1, cu_seqlens=cu, max_seqlen=65)
    many = torch.zeros(65536, 1, 16, device=DEVICE)  # 65536 one-token sequences: one more than a grid axis holds
    with pytest.raises(ValueError, match="65536 sequences in one call exceed"):
        triton_s2_attention(many, many, many, lay, sm_scale=0.1, max_seqlen=1,
                            cu_seqlens=torch.arange(65537, dtype=torch.int32, device=DEVICE))


_COMPILE_DQ = """
import json
import kernel_resources
from s2megatron.ops.triton_s2 import config
rows = []
for arch, head_dim in ((80, 128), (80, 96), (90, 128)):
    rows.append(dict(kernel_resources.report(config.tile_config(64, head_dim, True), head_dim, 64, arch)["dq"],
                     arch=arch, head_dim=head_dim))
print(json.dumps(rows))
"""


def test_dq_kernel_compiles_within_its_register_limit():
    """The dQ kernel (which also computes Delta) compiled by ptxas as launched, with ``TileConfig.dq_maxnreg``: on
    sm_80 it may use the whole register file (ptxas left to itself caps it at 128 registers and spills 2.7 KB at
    head dim 128), spilling under 1 KB; on sm_90 nothing. In a fresh process, without the interpreter."""
    rows = compiled_in_fresh_process(_COMPILE_DQ, timeout=600)
    for row in rows:
        assert row["registers"] > 128, row
        assert row["spill_store_bytes"] < 1024, row
        if row["arch"] == 90:
            assert row["spill_store_bytes"] == 0, row


_ENV.restore()  # after this module's kernels are decorated
