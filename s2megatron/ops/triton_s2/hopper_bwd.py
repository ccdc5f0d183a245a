"""S2 dK/dV on Hopper (sm_90), warp-specialised, written against warpgroup MMA and TMA directly (Gluon).

The Triton dK/dV kernel (``kernels.s2_bwd_dkdv_kernel``) is the largest part of the backward and latency bound on
Hopper (ncu: two warps per scheduler, under 0.5 eligible, the tensor pipe idle half the time, spills). This kernel
keeps its column walk and its ownership (one CTA per (64-key tile, kv head), walking every query head of the GQA
group in order; no atomics) and splits the work inside the CTA the way the Hopper forward does:

- a producer warp loads the key tile's K and V once, then streams the query chunks of the walk (64 rows of Q and of
  dO) into a ring of ``STAGES`` shared-memory slots with TMA (``ready`` barriers), each slot once its consumer has
  released it (``empty`` barriers);
- two consumer warpgroups (240 registers per thread) take the chunks in turn (even and odd chunks of the walk).
  Per chunk a consumer computes, transposed (keys are rows), S^T = K Q^T and dP^T = V dO^T, then
  P^T = exp2(S^T - lse), dV += P^T dO (issued at once), dS^T = P^T (dP^T - Delta), dK += dS^T Q, with P^T and dS^T
  from registers; the warp scheduler runs one consumer's elementwise work while the other's products use the
  tensor cores.
- At the end each consumer hands the other one partial sum through shared memory (the Q and dO rings, free by then:
  its dV to the first, its dK to the second); the first adds and stores dK, the second dV: two backward passes give
  bitwise-identical gradients.

The walk and the masks are the Triton kernel's, from the same helpers (``_col_chunks``): the interior chunks (every
query row at or after every key of the tile, inside the run and the queries) unmasked, then the diagonal chunks and
the tail with the causal, run and query masks. Query rows outside the sequence get lse = +inf, hence P = 0; key rows
past the sequence (the next sequence's rows, or TMA zero fill) are computed and not stored.

Scope (:func:`hopper_dkdv_tiles`): an S2Layout of block 64 or 128, head dim 64 or 128, bf16/fp16, an sm_90 GPU and
tensors a TMA descriptor can read; everything else takes the Triton kernel, as does every call once this one failed
to compile (Gluon is experimental), with one warning.
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from functools import lru_cache
from typing import Optional

import torch
from triton.compiler.errors import CompilationError
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import mbarrier, tma, warpgroup_mma, warpgroup_mma_wait

from .hopper_fwd import _descriptor, _is_sm90
from .kernels import _LOG2E, _col_chunks, _seq_bounds
from .rows import lse_strides, qkv_strides, row_view

# the CTA barrier (within a warp-specialised partition: that partition's warps) is gl.barrier from Triton 3.7 on
_partition_barrier = getattr(gl, "barrier", None) or gl.thread_barrier


@gluon.jit
def _chunk_pos(i, n_int, q_lo, c0, c1, BLOCK_M: gl.constexpr):
    """First query position of the ``i``-th chunk of a head's walk: the interior chunks ``c0 .. c1 - 1`` first,
    then the masked ones (``0 .. c0 - 1``, then ``c1 ..``)."""
    m = i - n_int
    c = gl.where(i < n_int, c0 + i, gl.where(m < c0, m, c1 + m - c0))
    return q_lo + c * BLOCK_M


@gluon.jit
def _dkdv_chunk(it, pos, dk, dv, k_smem, v_smem, q_smem, do_smem, lse_smem, delta_smem, ready, empty, qk_scale,
                k_pos, hi_b, first_block, MASKED: gl.constexpr, DV_FIRST: gl.constexpr,
                BS: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
                s_layout: gl.constexpr, a_layout: gl.constexpr):
    """Query chunk ``it`` of the walk (ring slot ``it % STAGES``, first query position ``pos``) for one consumer."""
    slot = it % STAGES
    col_layout: gl.constexpr = gl.SliceLayout(0, s_layout)
    mbarrier.wait(ready.index(slot), (it // STAGES) & 1)
    q = q_smem.index(slot)
    do = do_smem.index(slot)
    zeros = gl.zeros([BLOCK_N, BLOCK_M], gl.float32, s_layout)
    s_tok = warpgroup_mma(k_smem, q.permute((1, 0)), zeros, use_acc=False, is_async=True)
    dp_tok = warpgroup_mma(v_smem, do.permute((1, 0)), zeros, use_acc=False, is_async=True)
    s, dp = warpgroup_mma_wait(0, deps=(s_tok, dp_tok))
    p = gl.exp2(s * qk_scale - lse_smem.index(slot).load(col_layout)[None, :])
    if MASKED:
        cols = pos + gl.arange(0, BLOCK_M, layout=col_layout)
        allowed = (k_pos[:, None] <= cols[None, :]) & ((cols[None, :] // BS - first_block) <= hi_b)
        p = gl.where(allowed, p, 0.0)
    if DV_FIRST:  # dV's product runs while dS is computed
        dv_tok = warpgroup_mma(gl.convert_layout(p.to(q.dtype), a_layout), do, dv, is_async=True)
        ds = p * (dp - delta_smem.index(slot).load(col_layout)[None, :])
    else:
        ds = p * (dp - delta_smem.index(slot).load(col_layout)[None, :])
        dv_tok = warpgroup_mma(gl.convert_layout(p.to(q.dtype), a_layout), do, dv, is_async=True)
    dk_tok = warpgroup_mma(gl.convert_layout(ds.to(q.dtype), a_layout), q, dk, is_async=True)
    dv, dk = warpgroup_mma_wait(0, deps=(dv_tok, dk_tok))
    mbarrier.arrive(empty.index(slot), count=1)
    return dk, dv


@gluon.jit
def _dkdv_consume(wg: gl.constexpr, k_smem, v_smem, q_smem, do_smem, lse_smem, delta_smem, ready, empty,
                  kv_bar, red_bar, DK, DV, HEAD_TO_PAT, RESIDUES, b, kvh, k_pos0, seq_start, kv_end, past,
                  stride_dkb, stride_dks, stride_dkh, stride_dvb, stride_dvs, stride_dvh,
                  sm_scale, qk_scale, first_block, group, local_blocks, vert_stride,
                  HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, BS: gl.constexpr,
                  STAGES: gl.constexpr, DV_FIRST: gl.constexpr):
    """Consumer warpgroup ``wg``: the chunks of the walk whose index has parity ``wg``; then consumer 0 stores dK and
    consumer 1 dV, each adding the other's partial sum."""
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, BLOCK_M, 16])
    acc_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                         instr_shape=[16, HEAD_DIM, 16])
    a_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=acc_layout, k_width=2)
    k_pos = k_pos0 + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, s_layout))
    dk = gl.zeros([BLOCK_N, HEAD_DIM], gl.float32, acc_layout)
    dv = gl.zeros([BLOCK_N, HEAD_DIM], gl.float32, acc_layout)
    mbarrier.wait(kv_bar, 0)
    base = 0  # chunks of the walk before this head's
    for g in range(0, group):
        h = kvh * group + g
        pat = gl.load(HEAD_TO_PAT + h)
        q_lo, n_tot, c0, c1, hi_b = _col_chunks(RESIDUES, RESIDUES, RESIDUES, pat, k_pos0, first_block, kv_end,
                                                past, local_blocks, vert_stride, BS, BLOCK_M, BLOCK_N, True)
        n_int = c1 - c0
        for i in range((wg + base) % 2, n_int, 2):
            dk, dv = _dkdv_chunk(base + i, q_lo + (c0 + i) * BLOCK_M, dk, dv, k_smem, v_smem, q_smem, do_smem,
                                 lse_smem, delta_smem, ready, empty, qk_scale, k_pos, hi_b, first_block,
                                 False, DV_FIRST, BS, BLOCK_M, BLOCK_N, STAGES, s_layout, a_layout)
        for i in range(n_int + (wg + base + n_int) % 2, n_tot, 2):
            dk, dv = _dkdv_chunk(base + i, _chunk_pos(i, n_int, q_lo, c0, c1, BLOCK_M), dk, dv, k_smem, v_smem,
                                 q_smem, do_smem, lse_smem, delta_smem, ready, empty, qk_scale, k_pos, hi_b,
                                 first_block, True, DV_FIRST, BS, BLOCK_M, BLOCK_N, STAGES, s_layout, a_layout)
        base += n_tot
    # each consumer hands the other the partial sum that one stores (consumer 0 stores dK, consumer 1 dV), through
    # the Q and dO rings once both consumers are done with them
    mbarrier.arrive(red_bar.index(2), count=1)
    mbarrier.wait(red_bar.index(2), 0)
    red_layout: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, order=[1, 0])
    dk_red = q_smem._reinterpret(gl.float32, [BLOCK_N, HEAD_DIM], red_layout)
    dv_red = do_smem._reinterpret(gl.float32, [BLOCK_N, HEAD_DIM], red_layout)
    rows = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, acc_layout))
    offs_d = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, acc_layout))
    row = seq_start + k_pos0 + rows
    ok = ((k_pos0 + rows) < kv_end)[:, None]
    off_b = b.to(gl.int64)
    if wg == 0:
        dv_red.store(dv)
        _partition_barrier()  # every thread's part is in shared memory before the (single-thread) arrive
        mbarrier.arrive(red_bar.index(1), count=1)
        mbarrier.wait(red_bar.index(0), 0)
        dk = (dk + dk_red.load(acc_layout)) * sm_scale
        gl.store(DK + off_b * stride_dkb + kvh * stride_dkh + row[:, None] * stride_dks + offs_d[None, :],
                 dk.to(DK.dtype.element_ty), mask=ok)
    else:
        dk_red.store(dk)
        _partition_barrier()
        mbarrier.arrive(red_bar.index(0), count=1)
        mbarrier.wait(red_bar.index(1), 0)
        dv = dv_red.load(acc_layout) + dv
        gl.store(DV + off_b * stride_dvb + kvh * stride_dvh + row[:, None] * stride_dvs + offs_d[None, :],
                 dv.to(DV.dtype.element_ty), mask=ok)


@gluon.jit
def _dkdv_load(K_DESC, V_DESC, Q_DESC, DO_DESC, LSE, DELTA, k_smem, v_smem, q_smem, do_smem, lse_smem, delta_smem,
               ready, empty, kv_bar, HEAD_TO_PAT, RESIDUES, b, kvh, k_pos0, kv_row0, q_row0, seq_start, kv_end, past,
               stride_qh, stride_doh, stride_kh, stride_vh, stride_lb, stride_lh, first_block, group, local_blocks,
               vert_stride, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, BS: gl.constexpr, STAGES: gl.constexpr):
    """Producer warp: K and V of the key tile, then Q and dO of every chunk of the walk, in the consumers' order,
    with the chunk's lse (base 2; +inf on rows outside the queries, so that P = 0 there) and Delta."""
    mbarrier.expect(kv_bar, K_DESC.block_type.nbytes + V_DESC.block_type.nbytes)
    tma.async_copy_global_to_shared(K_DESC, [(kv_row0 + k_pos0).to(gl.int32), kvh * stride_kh], kv_bar, k_smem)
    tma.async_copy_global_to_shared(V_DESC, [(kv_row0 + k_pos0).to(gl.int32), kvh * stride_vh], kv_bar, v_smem)
    rows: gl.constexpr = gl.BlockedLayout([BLOCK_M // 32], [32], [1], [0])
    offs = gl.arange(0, BLOCK_M, layout=rows)
    it = 0
    for g in range(0, group):
        h = kvh * group + g
        pat = gl.load(HEAD_TO_PAT + h)
        q_lo, n_tot, c0, c1, hi_b = _col_chunks(RESIDUES, RESIDUES, RESIDUES, pat, k_pos0, first_block, kv_end,
                                                past, local_blocks, vert_stride, BS, BLOCK_M, BLOCK_N, True)
        l_off = b.to(gl.int64) * stride_lb + h * stride_lh + seq_start - past
        for i in range(0, n_tot):
            slot = it % STAGES
            pos = _chunk_pos(i, c1 - c0, q_lo, c0, c1, BLOCK_M)
            q_ok = (pos + offs >= past) & (pos + offs < kv_end)
            lse2 = gl.load(LSE + l_off + pos + offs, mask=q_ok, other=float("inf")) * _LOG2E
            delta = gl.load(DELTA + l_off + pos + offs, mask=q_ok, other=0.0)
            mbarrier.wait(empty.index(slot), ((it // STAGES) & 1) ^ 1)
            lse_smem.index(slot).store(lse2)
            delta_smem.index(slot).store(delta)
            _partition_barrier()  # every lane's stores before the (single-thread) arrive of the expect
            bar = ready.index(slot)
            mbarrier.expect(bar, Q_DESC.block_type.nbytes + DO_DESC.block_type.nbytes)
            row = (q_row0 + pos).to(gl.int32)
            tma.async_copy_global_to_shared(Q_DESC, [row, h * stride_qh], bar, q_smem.index(slot))
            tma.async_copy_global_to_shared(DO_DESC, [row, h * stride_doh], bar, do_smem.index(slot))
            it += 1


@gluon.jit
def s2_dkdv_hopper_kernel(
    Q_DESC, K_DESC, V_DESC, DO_DESC, DK, DV, LSE, DELTA, CU_SEQLENS, HEAD_TO_PAT, RESIDUES,
    stride_qh, stride_kh, stride_vh, stride_doh, stride_dkb, stride_dks, stride_dkh, stride_dvb, stride_dvs,
    stride_dvh, stride_lb, stride_lh,
    sm_scale, qk_scale, q_len, kv_len, first_block, num_kv_heads, group, local_blocks, vert_stride, q_rows_b,
    kv_rows_b,
    HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, BS: gl.constexpr,
    STAGES: gl.constexpr, VARLEN: gl.constexpr, HEADS_FASTEST: gl.constexpr, CONSUMER_REGS: gl.constexpr,
    PRODUCER_REGS: gl.constexpr, DV_FIRST: gl.constexpr,
    num_warps: gl.constexpr,
):
    """dK/dV of one 64-key tile of one kv head, summed over the query heads of its GQA group in order; grid and
    program order as the Triton kernel's (``HEADS_FASTEST``)."""
    gl.static_assert(BLOCK_N == 64, "one consumer warpgroup holds the 64 keys of the tile")
    gl.static_assert(STAGES * BLOCK_M >= 2 * BLOCK_N, "a ring holds one float32 partial sum at the end")
    # with an even ring each slot belongs to one consumer (chunk parity), which waits on its phases in order; with an
    # odd one a consumer could wait on the parity of a slot's next fill while the other's fill is still pending
    gl.static_assert(STAGES % 2 == 0, "an even number of ring slots")
    gl.static_assert(num_warps == 4, "the default partition is one consumer warpgroup")
    if HEADS_FASTEST:
        kvh = gl.program_id(0) % num_kv_heads
        k_pos0 = (gl.program_id(0) // num_kv_heads) * BLOCK_N
    else:
        key_tiles = (kv_len + BLOCK_N - 1) // BLOCK_N
        kvh = gl.program_id(0) // key_tiles
        k_pos0 = (gl.program_id(0) % key_tiles) * BLOCK_N
    b = gl.program_id(1)
    seq_start, kv_end, past = _seq_bounds(CU_SEQLENS, b, q_len, kv_len, VARLEN)
    if k_pos0 < kv_end:
        kv_row0 = b * kv_rows_b + seq_start
        q_row0 = b * q_rows_b + seq_start - past  # token row of query position 0
        dtype: gl.constexpr = Q_DESC.dtype
        k_smem = gl.allocate_shared_memory(dtype, [BLOCK_N, HEAD_DIM], K_DESC.layout)
        v_smem = gl.allocate_shared_memory(dtype, [BLOCK_N, HEAD_DIM], V_DESC.layout)
        q_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_M, HEAD_DIM], Q_DESC.layout)
        do_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_M, HEAD_DIM], DO_DESC.layout)
        vec_layout: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, order=[0])
        lse_smem = gl.allocate_shared_memory(gl.float32, [STAGES, BLOCK_M], vec_layout)
        delta_smem = gl.allocate_shared_memory(gl.float32, [STAGES, BLOCK_M], vec_layout)
        ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        kv_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
        red_bar = gl.allocate_shared_memory(gl.int64, [3, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(STAGES):
            mbarrier.init(ready.index(i), count=1)
            mbarrier.init(empty.index(i), count=1)
        mbarrier.init(kv_bar, count=1)
        mbarrier.init(red_bar.index(0), count=1)
        mbarrier.init(red_bar.index(1), count=1)
        mbarrier.init(red_bar.index(2), count=2)
        gl.warp_specialize([
            (_dkdv_consume, (0, k_smem, v_smem, q_smem, do_smem, lse_smem, delta_smem, ready, empty,
                             kv_bar, red_bar, DK, DV, HEAD_TO_PAT, RESIDUES, b, kvh, k_pos0, seq_start, kv_end, past,
                             stride_dkb, stride_dks, stride_dkh, stride_dvb, stride_dvs, stride_dvh, sm_scale, qk_scale, first_block, group, local_blocks, vert_stride,
                             HEAD_DIM, BLOCK_M, BLOCK_N, BS, STAGES, DV_FIRST)),
            (_dkdv_consume, (1, k_smem, v_smem, q_smem, do_smem, lse_smem, delta_smem, ready, empty,
                             kv_bar, red_bar, DK, DV, HEAD_TO_PAT, RESIDUES, b, kvh, k_pos0, seq_start, kv_end, past,
                             stride_dkb, stride_dks, stride_dkh, stride_dvb, stride_dvs, stride_dvh, sm_scale, qk_scale, first_block, group, local_blocks, vert_stride,
                             HEAD_DIM, BLOCK_M, BLOCK_N, BS, STAGES, DV_FIRST)),
            (_dkdv_load, (K_DESC, V_DESC, Q_DESC, DO_DESC, LSE, DELTA, k_smem, v_smem, q_smem, do_smem, lse_smem,
                          delta_smem, ready, empty, kv_bar, HEAD_TO_PAT, RESIDUES, b, kvh, k_pos0, kv_row0, q_row0,
                          seq_start, kv_end, past, stride_qh, stride_doh, stride_kh, stride_vh, stride_lb, stride_lh,
                          first_block, group, local_blocks, vert_stride, BLOCK_M, BLOCK_N, BS, STAGES)),
        ], [4, 1], [CONSUMER_REGS, PRODUCER_REGS])
        for i in gl.static_range(STAGES):
            mbarrier.invalidate(ready.index(i))
            mbarrier.invalidate(empty.index(i))
        mbarrier.invalidate(kv_bar)
        for i in gl.static_range(3):
            mbarrier.invalidate(red_bar.index(i))


@dataclass(frozen=True)
class HopperDkdvTiles:
    stages: int = 4           # Q/dO ring slots (32 KB each at head dim 128)
    consumer_regs: int = 240  # registers per thread of each consumer warpgroup
    producer_regs: int = 24   # of the producer warp (what it releases is what the consumers take: 4 x 144 = 8 x 72)
    maxnreg: int = 168        # launch limit: 12 warps x 168 registers fill the register file, then redistributed
    block_m: int = 64         # query chunk
    block_n: int = 64         # key tile: one consumer warpgroup's 64 rows
    dv_first: int = 0         # issue dV += P^T dO before computing dS (overlap; otherwise dS first)


# the Triton kernel measured as fast or faster where a CTA's walk is short (H100, head dim 128, fwd+bwd): L16V16 at
# 8k-32k (1162-1972 query rows per key tile, 0.96-1.01x), equal for L8V8 at block 128 and 32k (2940 rows); from 64k
# (3003 rows) 1.11x, GQA 32/8 at 32k (4 x 1972) 1.03x, dense 32k 1.06-1.14x (bench/results/hopper_dkdv_*.md).
# S2MEGATRON_HOPPER_BWD=1 takes this kernel for every call it can run, =0 never
MIN_COL_ROWS = 2560
_broken: list = []  # the compile error, once the kernel failed to build in this process


@lru_cache(maxsize=256)
def col_rows(residues: tuple, local_blocks: int, vert_stride: int, block: int, kv_len: int) -> float:
    """Query rows that keep a key block, averaged over the key blocks and over heads with stripe ``residues`` (-1:
    dense): a key block is kept by the ``L`` query blocks from its own (fewer at the end), a stripe (or every block
    of a dense head) by every query block from its own to the last. The length of a dK/dV CTA's walk per query
    head (queries and keys of equal length)."""
    blocks = -(-kv_len // block)
    local = min(local_blocks, blocks)
    local_sum = local * (blocks - local) + local * (local + 1) // 2  # sum over j of min(L, blocks - j)
    total = 0
    for r in residues:
        stripes = range(0, blocks) if r < 0 else range(r, blocks, vert_stride)
        total += local_sum + sum((blocks - j) - min(local, blocks - j) for j in stripes)
    return block * total / (len(residues) * blocks)


def hopper_dkdv_tiles(plan, q) -> Optional[HopperDkdvTiles]:
    """The tiles of this kernel for the call, or None where the Triton dK/dV kernel runs instead: not an S2Layout
    with block 64 or 128, head dim not 64 or 128, not 16-bit, not an sm_90 GPU, walks shorter than
    ``MIN_COL_ROWS`` query rows per CTA (:func:`col_rows` times the GQA group), the kernel failed to compile
    earlier, or ``S2MEGATRON_HOPPER_BWD=0``."""
    mode = os.environ.get("S2MEGATRON_HOPPER_BWD", "auto")
    if mode == "0" or _broken:
        return None
    if plan.device.type != "cuda" or not _is_sm90(plan.device.index):
        return None
    if not (plan.analytic and plan.merge_q) or plan.block_size not in (64, 128) or plan.head_dim not in (64, 128):
        return None
    if q.dtype not in (torch.float16, torch.bfloat16):
        return None
    if mode != "1":
        patterns = plan.metadata(plan.cfg.block_m)[0].patterns  # cached per shape
        residues = tuple(patterns.residues[p] for p in patterns.head_to_pattern)
        rows = col_rows(residues, plan.local_blocks, plan.vert_stride, plan.block_size, plan.kv_len)
        if plan.group * rows < MIN_COL_ROWS:
            return None
    return HopperDkdvTiles()


def hopper_dkdv(plan, tiles: HopperDkdvTiles, q, k, v, dout, dk, dv, lse, delta, cu, sm_scale, qk_scale,
                first_block: int, head_to_pattern, residues, heads_fastest: bool) -> bool:
    """Launch the kernel into ``dk`` and ``dv``; False (nothing launched) where a tensor has no TMA row view
    (:func:`rows.row_view`) or Q and dO, K and V lay out their batch entries differently."""
    views = [row_view(x, plan.varlen, plan.head_dim) for x in (q, dout, k, v)]
    if any(view is None for view in views) or views[0][2] != views[1][2] or views[2][2] != views[3][2]:
        return False
    q_desc, do_desc = (_descriptor(x, view, tiles.block_m, plan.head_dim) for x, view in zip((q, dout), views[:2]))
    k_desc, v_desc = (_descriptor(x, view, tiles.block_n, plan.head_dim) for x, view in zip((k, v), views[2:]))
    (_, _, sqh), (_, _, sdoh), (_, _, skh), (_, _, svh) = (qkv_strides(x, plan.varlen) for x in (q, dout, k, v))
    grid = (-(-plan.kv_len // tiles.block_n) * plan.num_kv_heads, plan.batch)
    try:
        s2_dkdv_hopper_kernel[grid](
            q_desc, k_desc, v_desc, do_desc, dk, dv, lse, delta, cu, head_to_pattern, residues,
            sqh, skh, svh, sdoh, *qkv_strides(dk, plan.varlen), *qkv_strides(dv, plan.varlen),
            *lse_strides(lse, plan.varlen), sm_scale, qk_scale, plan.q_len, plan.kv_len, first_block,
            plan.num_kv_heads, plan.group, plan.local_blocks, plan.vert_stride, views[0][2], views[2][2],
            HEAD_DIM=plan.head_dim, BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n, BS=plan.block_size,
            STAGES=tiles.stages, VARLEN=plan.varlen, HEADS_FASTEST=heads_fastest,
            CONSUMER_REGS=tiles.consumer_regs, PRODUCER_REGS=tiles.producer_regs,
            DV_FIRST=bool(tiles.dv_first), num_warps=4, maxnreg=tiles.maxnreg)
    except CompilationError as err:  # another Triton version: the Triton kernel from now on
        _broken.append(err)
        warnings.warn(f"S2 Hopper dK/dV failed to compile, using the Triton kernel instead: {err}")
        return False
    return True
