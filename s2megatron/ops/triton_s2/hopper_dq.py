"""S2 dQ on Hopper (sm_90), warp-specialised, written against warpgroup MMA and TMA directly (Gluon).

The Triton dQ kernel (``kernels.s2_bwd_dq_kernel``) runs one CTA of eight warps per SM (236-240 registers per
thread), one per query tile: each CTA loads its tile, computes Delta and fills its pipeline while no other CTA on
the SM computes, and its key tiles are pipelined by the compiler only. This kernel computes the same dQ on the
Hopper forward's construction (``hopper_fwd``): work items are the forward's 128-row query tiles, one persistent
CTA per SM takes them in turns, and inside a CTA

- a producer warp (the forward's, ``hopper_fwd._ws_load``, given dO beside Q) issues the TMA copies: the first key
  tile of the row walk, the two 64-row halves of the query tile and of dO, then the other K/V tiles into a ring of
  ``STAGES`` shared-memory slots (``ready`` barriers), each slot once both consumers have released it (``empty``
  barriers);
- two consumer warpgroups (64 query rows each, 240 registers per thread) walk the same 64-key tiles. A consumer
  first computes its rows' Delta = rowsum(O * dO) - dLSE (dO from shared memory) and stores it for the dK/dV
  kernel, which runs after this one. Per interior key tile it issues dQ += dS(t) K(t) together with S(t+1) = Q
  K(t+1)^T and dP(t+1) = dO V(t+1)^T, releases slot t once dQ's product is done, and computes dS(t+1) = P (dP -
  Delta) with P = exp2(S scale - lse) while the other consumer's products use the tensor cores. Its dQ rows go
  out through a shared-memory buffer of its own and one TMA copy (``hopper_fwd._store_through_smem``), which the
  next query tile's epilogue waits for before it writes the buffer again.

The row walk and the masks are the forward's (``_work_item``, ``_masked_half``): interior key tiles unmasked, then
the masked ones (the first local block, the diagonal), which a consumer computes only where its 64 rows keep some
key of the tile (``hopper_fwd._keeps_part``: the per-row Merge-Q mask and the causal limit), one product after the
other. Query rows outside the sequence are neither given Delta nor stored.

Key tiles are 64 keys: dQ's three products hold S, dP and the dQ accumulator in registers (64 x 128 fp32 each at
128-key tiles: 192 of the 240 registers before the addresses), and the pipelined step keeps the next tile's S and dP
in flight with the current dS. It compiles to 168 registers per thread at the launch limit; ptxas spills up to 36
bytes of the walk's state at head dim 128 outside the key-tile loops (none at 64; at block 64 with Triton 3.6 none
either), since the epilogue has two ways out (the TMA copy of a whole tile, 16-byte stores of the rows of a tile at
the sequence's end; either alone spilled 4 bytes) and the next work item is loaded a turn ahead.

As in the forward, the layout's local blocks and vertical stride, the head count and the GQA group are compile-time
constants of the kernel (one build per layout and head shape): the work items' numbers, their walks and the masks
divide by them in products and shifts, and the one run-time division left is of the work item by the number of
query tiles (12 divisions and remainders in the PTX as run-time values; ptxas then spilled 28-44 bytes at every
budget shape). In one process on one H200 (``bench/forward_ab.py --kernel dq``, the kernel's own time over six
alternating rounds, dQ bitwise equal): 0.8 % less time at 8k and 2.4 % under GQA 32/8 in every round; at 16k-128k and
block 128 within the rounds' spread (``bench/results/logs/dq_ab_constexpr_layout_H200.log``).

The epilogue stored dQ from the MMA registers before, four bytes per instruction: under ncu's source counters the
consumers then spent 3.4 % of all warp samples at 8k and 2.3 % at 32k stalled on a full store queue
(``bench/results/logs/ncu_backward_stalls_H100.md``). Through shared memory and TMA, in one process on one H100 with
the gradients bitwise equal (``logs/backward_epilogue_ab_H100.log``, medians of four rounds in two calls): the dQ
kernel 2 / 8 % faster at 8k, 3 / 1 % at 32k, 1 % at 128k, 1 % slower under GQA 32/8 at 32k; the rounds of one variant
spread 2-5 %. With the dQ buffer, a ring of three slots (four and three measured the same without it) made the kernel
4 % slower at 32k in one call and 5 % at 128k, so the ring keeps four (224 KB of shared memory at head dim 128).

Against the Triton dQ, in one process on one H100 (``bench/hopper_dq.py``, ``bench/results/hopper_dq_*.md``): dQ
kernel time 0.83-0.91x from 2k to 128k at L16V16, 0.83x under GQA 32/8, 0.86x at block 128, 0.83x dense; forward +
backward 0.96-0.97x from 8k to 128k. Four ring slots and three measured the same (before the dQ buffer), two 1.1-1.2x
slower; one CTA per query tile instead of the persistent grid 1.05x slower at 8k, 1.03x at 32k, the same at 128k
(``bench/results/logs/hopper_dq_variants_H100.log``). Its launch costs about 36 us more host time than the Triton
dQ's (``logs/hopper_dq_host_H100.log``), which shows only where a call is host bound (one 2k call of 32 heads).

The turns are ``hopper_fwd.balanced_order``'s (the forward keeps round robin, CTA ``p`` taking items ``p, p + grid,
...``): each round of the round robin's items goes out longest first to the CTAs with the least work so far, costed
by the keys of each query tile's walk (``hopper_fwd.walk_keys``), and each CTA loads its next item from that order
one turn ahead. Round robin left the most loaded CTA 5.7 / 4.3 / 2.2 % over the mean at 8k / 16k / 32k in that cost
model, the balanced turns 3.4 / 0.6 / 0.2 %. In one process on one H100, against round robin and relative to the
dK/dV kernel of the same step (that machine's clock moved every kernel by up to 8 % between rounds): the dQ kernel
1 / 4 / 2 % faster at 8k / 16k / 32k, 2 % under GQA 32/8, 4.5 % at block 128, the same at 128k; the forward with the
same turns 0-1.6 % faster without GQA and 2.5-3.6 % slower with it, so it keeps round robin
(``bench/results/logs/hopper_item_order_ab_H100.log``). Packed sequences keep round robin (their lengths are on the
device).

Scope (:func:`hopper_dq_tiles`): that of the Hopper forward (an S2Layout of block 64 or 128, head dim 64 or 128,
bf16/fp16, an sm_90 GPU, TMA-readable tensors) at every length; everything else takes the Triton dQ kernel, as does
every call once this one failed to compile (Gluon is experimental), with one warning.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Optional

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import mbarrier, tma, warpgroup_mma, warpgroup_mma_wait

from . import hopper_fwd as _fwd
from .hopper_fwd import (_first_turn, _half_entry, _invalidate_barriers, _keeps_part, _masked_half, _next_turn,
                         _partition_barrier, _query_barriers, _ring_barriers, _store_through_smem, _work_item, _ws_load,
                         hopper_runnable, item_grid, launch_or_fall_back, row_descriptors, row_keys)
from .kernels import _LOG2E
from .rows import lse_strides, qkv_strides


@gluon.jit
def _scores(q, do, slot, k_smem, v_smem, BLOCK_N: gl.constexpr, s_layout: gl.constexpr):
    """S = Q K^T and dP = dO V^T of the key tile in ring slot ``slot``, issued together and waited for."""
    zeros = gl.zeros([64, BLOCK_N], gl.float32, s_layout)
    s_tok = warpgroup_mma(q, k_smem.index(slot).permute((1, 0)), zeros, use_acc=False, is_async=True)
    dp_tok = warpgroup_mma(do, v_smem.index(slot).permute((1, 0)), zeros, use_acc=False, is_async=True)
    return warpgroup_mma_wait(0, deps=(s_tok, dp_tok))


@gluon.jit
def _ds(s, dp, lse2, delta, qk_scale, dtype: gl.constexpr, a_layout: gl.constexpr):
    """dS = P (dP - Delta), P = exp2(S scale - lse), as the A operand of dQ's product (a masked score of -inf gives
    P = 0)."""
    p = gl.exp2(s * qk_scale - lse2[:, None])
    ds = p * (dp - delta[:, None])
    return gl.convert_layout(ds.to(dtype), a_layout)


@gluon.jit
def _interior_step(cur, ds, acc, q, do, k_smem, v_smem, ready, empty, lse2, delta, qk_scale, HAS_NEXT: gl.constexpr,
                   BLOCK_N: gl.constexpr, STAGES: gl.constexpr, s_layout: gl.constexpr, a_layout: gl.constexpr):
    """Interior key tile at ring position ``cur`` for one consumer, whose dS is ``ds``: issue dQ += dS K, and with it
    S and dP of the next tile (interior too: no mask); release this tile's slot once dQ's product is done (wait
    groups complete in order), then compute the next tile's dS."""
    slot = cur % STAGES
    acc_tok = warpgroup_mma(ds, k_smem.index(slot), acc, is_async=True)
    if HAS_NEXT:
        nxt = (cur + 1) % STAGES
        mbarrier.wait(ready.index(nxt), ((cur + 1) // STAGES) & 1)
        zeros = gl.zeros([64, BLOCK_N], gl.float32, s_layout)
        s_tok = warpgroup_mma(q, k_smem.index(nxt).permute((1, 0)), zeros, use_acc=False, is_async=True)
        dp_tok = warpgroup_mma(do, v_smem.index(nxt).permute((1, 0)), zeros, use_acc=False, is_async=True)
        acc = warpgroup_mma_wait(2, deps=(acc_tok, ))
        mbarrier.arrive(empty.index(slot), count=1)
        s, dp = warpgroup_mma_wait(0, deps=(s_tok, dp_tok))
        ds = _ds(s, dp, lse2, delta, qk_scale, k_smem.dtype, a_layout)
    else:
        acc = warpgroup_mma_wait(0, deps=(acc_tok, ))
        mbarrier.arrive(empty.index(slot), count=1)
    return ds, acc


@gluon.jit
def _row_delta(o_ptrs, do, ok, dlse_ptrs, HAS_DLSE: gl.constexpr):
    """Delta = rowsum(O * dO) - dLSE of a consumer's 64 rows (dO from shared memory, in the layout of ``o_ptrs``)."""
    o = gl.load(o_ptrs, mask=ok[:, None], other=0.0)
    delta = gl.sum(o.to(gl.float32) * do.to(gl.float32), 1)
    if HAS_DLSE:
        delta -= gl.load(dlse_ptrs, mask=ok, other=0.0)
    return delta


@gluon.jit
def _dq_consume(wg: gl.constexpr, q_smem, do_smem, k_smem, v_smem, dq_smem, ready, empty, q_bar, q_free, O, DQ,
                DQ_DESC, dq_rows_b, LSE, DLSE, DELTA, CU_SEQLENS, HEAD_TO_PAT, RESIDUES, ORDER, stride_ob, stride_os,
                stride_oh, stride_dqs, stride_dqh, stride_lb, stride_lh, sm_scale, qk_scale, q_len, kv_len, num_items,
                num_tiles, num_heads, first_block, group, local_blocks, vert_stride, q_rows_b, kv_rows_b,
                HEAD_DIM: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr, BS: gl.constexpr,
                ROWS: gl.constexpr, VARLEN: gl.constexpr, HAS_DLSE: gl.constexpr, ORDERED: gl.constexpr):
    """Consumer warpgroup ``wg``: rows ``64 wg .. 64 wg + 63`` of each query tile of the CTA, every key tile of its
    walk. ``it`` counts the ring's key tiles and ``j`` the query tiles over the CTA's work items."""
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, BLOCK_N, 16])
    acc_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                         instr_shape=[16, HEAD_DIM, 16])
    a_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=acc_layout, k_width=2)
    # O and dO row by row for Delta: eight 16-byte vectors per row of 128, four rows per warp per step
    o_layout: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [4, 1], [1, 0])
    row_layout: gl.constexpr = gl.SliceLayout(1, s_layout)
    q = q_smem.index(wg)
    do = do_smem.index(wg)
    it = 0
    j = 0
    nxt = _first_turn(ORDER, ORDERED)
    for i in range(gl.program_id(0), num_items, gl.num_programs(0)):
        w, nxt = _next_turn(ORDER, i, nxt, ORDERED)
        (valid, b, h, kvh, tile_pos0, seq_start, kv_end, past, n_ent, n_in_e, n_in, n_all, w0, w1, w2, w3, width, m1,
         mid_start, kv_row0, q_row0) = _work_item(w, RESIDUES, HEAD_TO_PAT, CU_SEQLENS, q_len, kv_len, num_tiles,
                                                  num_heads, first_block, group, local_blocks, vert_stride, q_rows_b,
                                                  kv_rows_b, BS, ROWS, BLOCK_N, VARLEN)
        if valid:
            row0 = seq_start + (tile_pos0 - past).to(gl.int64)  # token row of the tile's first query
            rows = wg * 64 + gl.arange(0, 64, layout=row_layout)
            ok = (tile_pos0 + rows >= past) & (tile_pos0 + rows < kv_end)
            l_ptrs = b.to(gl.int64) * stride_lb + h * stride_lh + row0 + rows
            lse2 = gl.load(LSE + l_ptrs, mask=ok, other=0.0) * _LOG2E
            rows_o = wg * 64 + gl.arange(0, 64, layout=gl.SliceLayout(1, o_layout))
            ok_o = (tile_pos0 + rows_o >= past) & (tile_pos0 + rows_o < kv_end)
            offs_do = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, o_layout))
            o_ptrs = (O + b.to(gl.int64) * stride_ob + h * stride_oh + (row0 + rows_o)[:, None] * stride_os
                      + offs_do[None, :])
            mbarrier.wait(q_bar, j & 1)
            delta = _row_delta(o_ptrs, do.load(o_layout), ok_o,
                               DLSE + b.to(gl.int64) * stride_lb + h * stride_lh + row0 + rows_o, HAS_DLSE)
            delta = gl.convert_layout(delta, row_layout)
            gl.store(DELTA + l_ptrs, delta, mask=ok)
            acc = gl.zeros([64, HEAD_DIM], gl.float32, acc_layout)
            if n_in > 0:  # interior tiles, pipelined: S and dP of the next tile with dQ's product of this one
                mbarrier.wait(ready.index(it % STAGES), (it // STAGES) & 1)
                s, dp = _scores(q, do, it % STAGES, k_smem, v_smem, BLOCK_N, s_layout)
                ds = _ds(s, dp, lse2, delta, qk_scale, k_smem.dtype, a_layout)
                for t in range(0, n_in - 1):
                    ds, acc = _interior_step(it + t, ds, acc, q, do, k_smem, v_smem, ready, empty, lse2, delta,
                                             qk_scale, True, BLOCK_N, STAGES, s_layout, a_layout)
                ds, acc = _interior_step(it + n_in - 1, ds, acc, q, do, k_smem, v_smem, ready, empty, lse2, delta,
                                         qk_scale, False, BLOCK_N, STAGES, s_layout, a_layout)
            for t in range(n_in, n_all):  # masked tiles: only those this consumer's rows keep
                cur = it + t
                slot = cur % STAGES
                mbarrier.wait(ready.index(slot), (cur // STAGES) & 1)
                e, off = _half_entry(t, 0, BS, BLOCK_N)
                if _keeps_part(True, e, off, wg, n_in_e, w0, w1, w2, w3, m1, mid_start, width, vert_stride,
                               tile_pos0, BS, ROWS):
                    s, dp = _scores(q, do, slot, k_smem, v_smem, BLOCK_N, s_layout)
                    s = _masked_half(s, t, 0, wg, n_in_e, w0, w1, w2, w3, m1, mid_start, width, vert_stride,
                                     tile_pos0, BS, ROWS, BLOCK_N, s_layout)
                    ds = _ds(s, dp, lse2, delta, qk_scale, k_smem.dtype, a_layout)
                    acc_tok = warpgroup_mma(ds, k_smem.index(slot), acc, is_async=True)
                    acc = warpgroup_mma_wait(0, deps=(acc_tok, ))
                mbarrier.arrive(empty.index(slot), count=1)
            mbarrier.arrive(q_free, count=1)  # every product reading Q and dO is done: the next tile may load

            tma.store_wait(0)  # the previous tile's copy has read the buffer
            _partition_barrier()
            first = tile_pos0 + wg * 64 - past  # query row of the consumer's first row
            _store_through_smem((acc * sm_scale).to(DQ.dtype.element_ty), dq_smem.index(wg), DQ_DESC, DQ,
                                b * dq_rows_b + seq_start + first, h * stride_dqh, stride_dqs, -first,
                                kv_end - past - first)
            it += n_all
            j += 1
    tma.store_wait(0)


@gluon.jit
def s2_dq_hopper_kernel(
    Q_DESC, DO_DESC, K_DESC, V_DESC, O, DQ, DQ_DESC, LSE, DLSE, DELTA, CU_SEQLENS, HEAD_TO_PAT, RESIDUES, ORDER,
    stride_qh, stride_doh, stride_kh, stride_vh, stride_ob, stride_os, stride_oh, stride_dqs, stride_dqh,
    stride_lb, stride_lh,
    sm_scale, qk_scale, q_len, kv_len, num_items, num_tiles, num_heads: gl.constexpr, first_block, group: gl.constexpr,
    local_blocks: gl.constexpr, vert_stride: gl.constexpr, q_rows_b, kv_rows_b, dq_rows_b,
    HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, BS: gl.constexpr,
    STAGES: gl.constexpr, VARLEN: gl.constexpr, HAS_DLSE: gl.constexpr, ORDERED: gl.constexpr,
    CONSUMER_REGS: gl.constexpr, num_warps: gl.constexpr,
):
    """Warp-specialised dQ: a producer warp streams Q, dO and the K/V ring with TMA, two consumer warpgroups (64
    query rows each) compute Delta, the products and dS; a CTA takes the work items (query tile, head, batch entry)
    at positions ``program_id, program_id + grid, ...`` of ``ORDER`` (where ``ORDERED``: the turns of
    ``hopper_fwd.balanced_order``), else those items themselves, as the forward does."""
    ROWS: gl.constexpr = BLOCK_M // BS
    gl.static_assert(BLOCK_M == 128, "two consumer warpgroups of 64 rows")
    gl.static_assert(BLOCK_N == 64, "64-key tiles (S, dP and dQ in registers)")
    gl.static_assert(num_warps == 4, "the default partition is one consumer warpgroup")
    dtype: gl.constexpr = Q_DESC.dtype
    q_smem = gl.allocate_shared_memory(dtype, [2, 64, HEAD_DIM], Q_DESC.layout)
    do_smem = gl.allocate_shared_memory(dtype, [2, 64, HEAD_DIM], DO_DESC.layout)
    k_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, HEAD_DIM], K_DESC.layout)
    v_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, HEAD_DIM], V_DESC.layout)
    dq_smem = gl.allocate_shared_memory(dtype, [2, 64, HEAD_DIM], DQ_DESC.layout)  # each consumer's dQ rows going out
    ready, empty = _ring_barriers(STAGES)
    q_bar, q_free = _query_barriers()
    gl.warp_specialize([
        (_dq_consume, (0, q_smem, do_smem, k_smem, v_smem, dq_smem, ready, empty, q_bar, q_free, O, DQ, DQ_DESC,
                       dq_rows_b, LSE, DLSE, DELTA, CU_SEQLENS, HEAD_TO_PAT, RESIDUES, ORDER, stride_ob, stride_os,
                       stride_oh, stride_dqs, stride_dqh, stride_lb, stride_lh, sm_scale, qk_scale, q_len, kv_len,
                       num_items, num_tiles, num_heads, first_block, group, local_blocks, vert_stride, q_rows_b,
                       kv_rows_b, HEAD_DIM, BLOCK_N, STAGES, BS, ROWS, VARLEN, HAS_DLSE, ORDERED)),
        (_dq_consume, (1, q_smem, do_smem, k_smem, v_smem, dq_smem, ready, empty, q_bar, q_free, O, DQ, DQ_DESC,
                       dq_rows_b, LSE, DLSE, DELTA, CU_SEQLENS, HEAD_TO_PAT, RESIDUES, ORDER, stride_ob, stride_os,
                       stride_oh, stride_dqs, stride_dqh, stride_lb, stride_lh, sm_scale, qk_scale, q_len, kv_len,
                       num_items, num_tiles, num_heads, first_block, group, local_blocks, vert_stride, q_rows_b,
                       kv_rows_b, HEAD_DIM, BLOCK_N, STAGES, BS, ROWS, VARLEN, HAS_DLSE, ORDERED)),
        (_ws_load, (Q_DESC, DO_DESC, K_DESC, V_DESC, q_smem, do_smem, k_smem, v_smem, ready, empty, q_bar, q_free,
                    CU_SEQLENS, HEAD_TO_PAT, RESIDUES, ORDER, stride_qh, stride_doh, stride_kh, stride_vh, q_len,
                    kv_len, num_items, num_tiles, num_heads, first_block, group, local_blocks, vert_stride, q_rows_b,
                    kv_rows_b, BS, ROWS, BLOCK_N, STAGES, VARLEN, ORDERED)),
    ], [4, 1], [CONSUMER_REGS, 24])
    _invalidate_barriers(ready, empty, q_bar, q_free, STAGES)


@dataclass(frozen=True)
class HopperDqTiles:
    stages: int = 4           # K/V ring slots of 64 keys (32 KB each at head dim 128; with Q, dO and dQ 224 KB)
    consumer_regs: int = 240  # registers per thread of each consumer warpgroup (the producer warp keeps 24)
    maxnreg: int = 168        # launch limit: 12 warps x 168 registers fill the register file, then redistributed
    block_m: int = 128        # two consumer warpgroups of 64 query rows (the forward's query tiles)
    block_n: int = 64         # key tile
    persistent: bool = True   # one CTA per SM taking work items in turn; else one CTA per work item


# the persistent grid takes its work items in hopper_fwd.balanced_order's turns (False: round robin): 1-4.5 % less dQ
# time at 8k-32k, GQA and block 128 on an H100, none at 128k (module docstring)
BALANCED_ORDER = True
_broken: list = []  # the compile error, once the kernel failed to build in this process


def hopper_dq_tiles(plan, q) -> Optional[HopperDqTiles]:
    """The tiles of this kernel for the call, or None where the Triton dQ kernel runs instead: outside the Hopper
    forward's scope (``hopper_fwd.hopper_runnable``: an S2Layout with block 64 or 128, head dim 64 or 128, 16-bit,
    an sm_90 GPU), the kernel failed to compile earlier, or ``S2MEGATRON_HOPPER_DQ=0``. There is no length rule
    (unlike the forward's ``MIN_ROW_KEYS``): on an H100 its kernel time was 0.83-0.91x the Triton dQ's from 2k to
    128k (``bench/results/hopper_dq_H100_80GB_HBM3.md``). The grid is persistent where the rows keep under
    ``hopper_fwd.PERSISTENT_ROW_SHARE`` of the keys, as the forward's."""
    if os.environ.get("S2MEGATRON_HOPPER_DQ", "auto") == "0" or _broken or not hopper_runnable(plan, q):
        return None
    patterns = plan.metadata(HopperDqTiles.block_m)[0].patterns  # cached per shape
    keys = row_keys(patterns, plan.layout, plan.kv_len)
    return dataclasses.replace(HopperDqTiles(), persistent=keys < _fwd.PERSISTENT_ROW_SHARE * plan.kv_len)


def hopper_dq(plan, tiles: HopperDqTiles, q, k, v, out, dout, dq, lse, dlse, delta, cu, sm_scale, qk_scale) -> bool:
    """Launch the kernel into ``dq`` and ``delta``; False (nothing launched) where a tensor has no TMA row view
    (:func:`rows.row_view`) or Q and dO, K and V lay out their batch entries differently."""
    part = min(plan.block_size, tiles.block_n)
    rows = (row_descriptors((q, dout), plan, 64), row_descriptors((k, v), plan, part),
            row_descriptors((dq, ), plan, 64))
    if None in rows:
        return False
    (q_desc, do_desc, q_rows_b), (k_desc, v_desc, kv_rows_b), (dq_desc, dq_rows_b) = rows
    meta, residues = plan.metadata(tiles.block_m)
    (_, _, sqh), (_, _, sdoh), (_, _, skh), (_, _, svh) = (qkv_strides(x, plan.varlen) for x in (q, dout, k, v))
    items, grid, order = item_grid(plan, meta, tiles.persistent, BALANCED_ORDER)
    return launch_or_fall_back(
        s2_dq_hopper_kernel, (grid, ), _broken, "dQ",
        q_desc, do_desc, k_desc, v_desc, out, dq, dq_desc, lse, dlse if dlse is not None else delta, delta, cu,
        meta.head_to_pattern, residues, order, sqh, sdoh, skh, svh,
        *qkv_strides(out, plan.varlen), *qkv_strides(dq, plan.varlen)[1:], *lse_strides(lse, plan.varlen), sm_scale,
        qk_scale, plan.q_len, plan.kv_len, items, meta.num_tiles, plan.num_heads, meta.first_block, plan.group,
        plan.local_blocks, plan.vert_stride, q_rows_b, kv_rows_b, dq_rows_b, HEAD_DIM=plan.head_dim,
        BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n, BS=plan.block_size, STAGES=tiles.stages, VARLEN=plan.varlen,
        HAS_DLSE=dlse is not None, ORDERED=order is not None, CONSUMER_REGS=tiles.consumer_regs, num_warps=4,
        maxnreg=tiles.maxnreg)
