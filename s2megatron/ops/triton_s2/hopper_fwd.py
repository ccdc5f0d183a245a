"""S2 forward on Hopper (sm_90), warp-specialised, written against warpgroup MMA and TMA directly (Gluon).

The Triton forward (``kernels.s2_fwd_kernel``) is latency bound on Hopper: in its ncu profile every scheduler holds
two warps, under 0.6 of them eligible per cycle, and the tensor pipe is active 49 % of the time. Triton 3.6 cannot
warp-specialise it (its automatic pass hangs on Hopper, see ``bench/warp_specialize_probe.py``), so this kernel
does it by hand, one CTA per 128-row query tile:

- a producer warp issues the TMA copies: the two 64-row halves of the query tile, then the K/V tiles of the row walk
  into a ring of ``STAGES`` shared-memory slots (``ready`` barriers), each slot once both consumers have released
  it (``empty`` barriers);
- two consumer warpgroups (64 query rows each, 240 registers per thread) walk the same key tiles. Per tile they
  issue S(t+1) = Q K(t+1)^T and O += P(t) V(t) together (P from registers), wait for both, release slot t, then
  run the softmax of S(t+1) and rescale O, while the other warpgroup's products run. Optionally (``PINGPONG``)
  they take turns issuing products; measured slower, so off.

Waiting for P(t) V(t) before the next softmax is deliberate: with it still running, ptxas serialises every wgmma of
the loop (C7514: the softmax would read registers of a running group).

The key tiles and masks are the Triton forward's, from the same helpers (``_row_walk``, ``_fast_split``): the
interior tiles of the S2 row walk (stripes, then the local blocks every row keeps) unmasked, then the first local
blocks and the diagonal with the causal and per-row (Merge-Q) mask. Rows of a key tile past the sequence are rows of
the same tensor (the next sequence or batch entry) or TMA zero fill past its end; the causal mask removes them, and
query rows outside the sequence are never stored.

Scope (:func:`hopper_forward_tiles`): an S2Layout of block 64 or 128, head dim 64 or 128, bf16/fp16, an sm_90 GPU,
tensors a TMA descriptor can read, and at least ``MIN_KEYS`` keys (below that the Triton forward measured faster).
Everything else takes the Triton forward, as does every call when the kernel fails to compile (another Triton
version: Gluon is experimental), with one warning.
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
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from .kernels import _LN2, _fast_split, _row_walk, _seq_bounds


@gluon.jit
def _key_block(t, n_in_e, w0, w1, w2, w3, m1, mid_start, vert_stride, SUBS: gl.constexpr):
    """Key block of key tile ``t`` in the kernel's order: the interior entries (``w1`` stripes ``w0 + e * V``,
    then local blocks from ``mid_start``), the first ``m1`` local blocks (from ``w2``), the diagonal (from ``w3``)."""
    e = t // SUBS
    em = e - n_in_e
    j_in = gl.where(e < w1, w0 + e * vert_stride, mid_start + e - w1)
    j_masked = gl.where(em < m1, w2 + em, w3 + em - m1)
    return gl.where(em < 0, j_in, j_masked)


@gluon.jit
def _issue_kv(t, n_all, n_in_e, w0, w1, w2, w3, m1, mid_start, vert_stride, kv_row0, k_col, v_col,
              K_DESC, V_DESC, k_smem, v_smem, ready,
              BS: gl.constexpr, BLOCK_N: gl.constexpr, SUBS: gl.constexpr, STAGES: gl.constexpr):
    """TMA copies of K and V of key tile ``t`` into ring slot ``t % STAGES`` (nothing when ``t >= n_all``)."""
    slot = t % STAGES
    j = _key_block(t, n_in_e, w0, w1, w2, w3, m1, mid_start, vert_stride, SUBS)
    row = (kv_row0 + j * BS + (t % SUBS) * BLOCK_N).to(gl.int32)
    pred = t < n_all
    bar = ready.index(slot)
    mbarrier.expect(bar, K_DESC.block_type.nbytes + V_DESC.block_type.nbytes, pred=pred)
    tma.async_copy_global_to_shared(K_DESC, [row, k_col], bar, k_smem.index(slot), pred=pred)
    tma.async_copy_global_to_shared(V_DESC, [row, v_col], bar, v_smem.index(slot), pred=pred)


@gluon.jit
def _masked_scores(s, t, n_in_e, w0, w1, w2, w3, m1, mid_start, width, vert_stride, q_pos, sub_row,
                   BS: gl.constexpr, ROWS: gl.constexpr, BLOCK_N: gl.constexpr, SUBS: gl.constexpr,
                   s_layout: gl.constexpr):
    """Scores of key tile ``t`` with the causal and per-row (Merge-Q) mask applied (a no-op on interior tiles)."""
    j = _key_block(t, n_in_e, w0, w1, w2, w3, m1, mid_start, vert_stride, SUBS)
    k_pos = j * BS + (t % SUBS) * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
    rl = gl.where((j % vert_stride) == w0, ROWS - 1, gl.minimum(j + width - 1 - w3, ROWS - 1))
    allowed = (k_pos[None, :] <= q_pos[:, None]) & (sub_row[:, None] <= rl)
    return gl.where(allowed, s, float("-inf"))


@gluon.jit
def _online_softmax(s, m_i, l_i, qk_scale):
    """(P, alpha, m_i, l_i) of one score tile, base 2, m_i in scaled units."""
    m_new = gl.maximum(m_i, gl.max(s, 1) * qk_scale)
    m_safe = gl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = gl.exp2(m_i - m_safe)
    p = gl.exp2(s * qk_scale - m_safe[:, None])
    return p, alpha, m_new, l_i * alpha + gl.sum(p, 1)


@gluon.jit
def _pingpong_step(t, n_all, p, acc, m_i, l_i, k, q, k_smem, v_smem, ready, empty, my_turn, other_turn,
                   qk_scale, n_in_e, w0, w1, w2, w3, m1, mid_start, width, vert_stride, q_pos, sub_row,
                   MASK_NEXT: gl.constexpr, HAS_NEXT: gl.constexpr, PINGPONG: gl.constexpr,
                   BS: gl.constexpr, ROWS: gl.constexpr, BLOCK_N: gl.constexpr, SUBS: gl.constexpr,
                   STAGES: gl.constexpr, s_layout: gl.constexpr, p_layout: gl.constexpr):
    """GEMM phase ``k`` of this warpgroup, on its turn: issue S(t+1) = Q K(t+1)^T and O += P(t) V(t), pass the turn
    to the other warpgroup, wait for both, release slot t; then (softmax phase, while the other warpgroup's GEMMs
    run) the softmax of S(t+1) and the rescale of O."""
    if HAS_NEXT:
        mbarrier.wait(ready.index((t + 1) % STAGES), ((t + 1) // STAGES) & 1)
    if PINGPONG:
        mbarrier.wait(my_turn, k & 1)
    if HAS_NEXT:
        s_tok = warpgroup_mma(q, k_smem.index((t + 1) % STAGES).permute((1, 0)),
                              gl.zeros([64, BLOCK_N], gl.float32, s_layout), use_acc=False, is_async=True)
    acc_tok = warpgroup_mma(gl.convert_layout(p.to(v_smem.dtype), p_layout), v_smem.index(t % STAGES), acc,
                            is_async=True)
    if PINGPONG:
        mbarrier.arrive(other_turn, count=1)
    if HAS_NEXT:
        s, acc = warpgroup_mma_wait(0, deps=(s_tok, acc_tok))
    else:
        acc = warpgroup_mma_wait(0, deps=(acc_tok, ))
    mbarrier.arrive(empty.index(t % STAGES), count=1)  # K(t) was read by S(t), V(t) by P(t) V(t)
    if HAS_NEXT:
        if MASK_NEXT:
            s = _masked_scores(s, t + 1, n_in_e, w0, w1, w2, w3, m1, mid_start, width, vert_stride, q_pos, sub_row,
                               BS, ROWS, BLOCK_N, SUBS, s_layout)
        p, alpha, m_i, l_i = _online_softmax(s, m_i, l_i, qk_scale)
        acc = acc * gl.convert_layout(alpha, gl.SliceLayout(1, acc.type.layout))[:, None]
    return p, acc, m_i, l_i, k + 1


@gluon.jit
def _ws_consume(wg: gl.constexpr, n_in, n_all, n_in_e, w0, w1, w2, w3, m1, mid_start, width, vert_stride,
                q_smem, k_smem, v_smem, ready, empty, q_bar, turns, O, LSE, b, h, tile_pos0, seq_start, kv_end, past,
                stride_ob, stride_os, stride_oh, stride_lb, stride_lh, qk_scale,
                HEAD_DIM: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr, BS: gl.constexpr,
                ROWS: gl.constexpr, SUBS: gl.constexpr, PINGPONG: gl.constexpr):
    """Consumer warpgroup ``wg``: rows ``64 wg .. 64 wg + 63`` of the query tile, every key tile of the walk. The
    two consumers take turns issuing their matrix products (``turns``: warpgroup ``wg`` waits on ``turns[wg]`` and
    passes to the other), so one's softmax runs while the other's products occupy the tensor cores."""
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, BLOCK_N, 16])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, HEAD_DIM, 16])
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    q = q_smem.index(wg)
    my_turn = turns.index(wg)
    other_turn = turns.index(1 - wg)
    rows = wg * 64 + gl.arange(0, 64, layout=gl.SliceLayout(1, s_layout))
    q_pos = tile_pos0 + rows
    sub_row = rows // BS
    m_i = gl.full([64], float("-inf"), gl.float32, gl.SliceLayout(1, s_layout))
    l_i = gl.zeros([64], gl.float32, gl.SliceLayout(1, s_layout))
    acc = gl.zeros([64, HEAD_DIM], gl.float32, o_layout)
    # turn parity: warpgroup 0 moves first (a fresh barrier passes a wait on parity 1)
    k = 1 - wg
    mbarrier.wait(q_bar, 0)
    mbarrier.wait(ready.index(0), 0)
    if PINGPONG:
        mbarrier.wait(my_turn, k & 1)
    s_tok = warpgroup_mma(q, k_smem.index(0).permute((1, 0)), gl.zeros([64, BLOCK_N], gl.float32, s_layout),
                          use_acc=False, is_async=True)
    if PINGPONG:
        mbarrier.arrive(other_turn, count=1)
    s = warpgroup_mma_wait(0, deps=(s_tok, ))
    k += 1
    s = _masked_scores(s, 0, n_in_e, w0, w1, w2, w3, m1, mid_start, width, vert_stride, q_pos, sub_row,
                       BS, ROWS, BLOCK_N, SUBS, s_layout)
    p, alpha, m_i, l_i = _online_softmax(s, m_i, l_i, qk_scale)
    for t in range(0, n_in - 1):  # the next tile is interior: no mask
        p, acc, m_i, l_i, k = _pingpong_step(
            t, n_all, p, acc, m_i, l_i, k, q, k_smem, v_smem, ready, empty, my_turn, other_turn, qk_scale,
            n_in_e, w0, w1, w2, w3, m1, mid_start, width, vert_stride, q_pos, sub_row, False, True, PINGPONG,
            BS, ROWS, BLOCK_N, SUBS, STAGES, s_layout, p_layout)
    for t in range(gl.maximum(n_in - 1, 0), n_all - 1):
        p, acc, m_i, l_i, k = _pingpong_step(
            t, n_all, p, acc, m_i, l_i, k, q, k_smem, v_smem, ready, empty, my_turn, other_turn, qk_scale,
            n_in_e, w0, w1, w2, w3, m1, mid_start, width, vert_stride, q_pos, sub_row, True, True, PINGPONG,
            BS, ROWS, BLOCK_N, SUBS, STAGES, s_layout, p_layout)
    p, acc, m_i, l_i, k = _pingpong_step(
        n_all - 1, n_all, p, acc, m_i, l_i, k, q, k_smem, v_smem, ready, empty, my_turn, other_turn, qk_scale,
        n_in_e, w0, w1, w2, w3, m1, mid_start, width, vert_stride, q_pos, sub_row, True, False, PINGPONG,
        BS, ROWS, BLOCK_N, SUBS, STAGES, s_layout, p_layout)

    empty_row = l_i == 0.0
    lse = gl.where(empty_row, float("-inf"), (m_i + gl.log2(gl.where(empty_row, 1.0, l_i))) * _LN2)
    l_o = gl.convert_layout(gl.where(empty_row, 1.0, l_i), gl.SliceLayout(1, o_layout))
    out = acc / l_o[:, None]
    rows_o = wg * 64 + gl.arange(0, 64, layout=gl.SliceLayout(1, o_layout))
    offs_d = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, o_layout))
    q_pos_o = tile_pos0 + rows_o
    row0 = seq_start + (tile_pos0 - past).to(gl.int64)
    o_ptrs = (O + b.to(gl.int64) * stride_ob + h * stride_oh + (row0 + rows_o)[:, None] * stride_os
              + offs_d[None, :])
    gl.store(o_ptrs, out.to(O.dtype.element_ty), mask=((q_pos_o >= past) & (q_pos_o < kv_end))[:, None])
    gl.store(LSE + b.to(gl.int64) * stride_lb + h * stride_lh + row0 + rows, lse,
             mask=(q_pos >= past) & (q_pos < kv_end))


@gluon.jit
def _ws_consume_wg0(n_in, n_all, n_in_e, w0, w1, w2, w3, m1, mid_start, width, vert_stride,
                    q_smem, k_smem, v_smem, ready, empty, q_bar, turns, O, LSE, b, h, tile_pos0, seq_start, kv_end,
                    past, stride_ob, stride_os, stride_oh, stride_lb, stride_lh, qk_scale,
                    HEAD_DIM: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr, BS: gl.constexpr,
                    ROWS: gl.constexpr, SUBS: gl.constexpr, PINGPONG: gl.constexpr):
    _ws_consume(0, n_in, n_all, n_in_e, w0, w1, w2, w3, m1, mid_start, width, vert_stride,
                q_smem, k_smem, v_smem, ready, empty, q_bar, turns, O, LSE, b, h, tile_pos0, seq_start, kv_end, past,
                stride_ob, stride_os, stride_oh, stride_lb, stride_lh, qk_scale, HEAD_DIM, BLOCK_N, STAGES, BS,
                ROWS, SUBS, PINGPONG)


@gluon.jit
def _ws_consume_wg1(n_in, n_all, n_in_e, w0, w1, w2, w3, m1, mid_start, width, vert_stride,
                    q_smem, k_smem, v_smem, ready, empty, q_bar, turns, O, LSE, b, h, tile_pos0, seq_start, kv_end,
                    past, stride_ob, stride_os, stride_oh, stride_lb, stride_lh, qk_scale,
                    HEAD_DIM: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr, BS: gl.constexpr,
                    ROWS: gl.constexpr, SUBS: gl.constexpr, PINGPONG: gl.constexpr):
    _ws_consume(1, n_in, n_all, n_in_e, w0, w1, w2, w3, m1, mid_start, width, vert_stride,
                q_smem, k_smem, v_smem, ready, empty, q_bar, turns, O, LSE, b, h, tile_pos0, seq_start, kv_end, past,
                stride_ob, stride_os, stride_oh, stride_lb, stride_lh, qk_scale, HEAD_DIM, BLOCK_N, STAGES, BS,
                ROWS, SUBS, PINGPONG)


@gluon.jit
def _ws_load(n_all, n_in_e, w0, w1, w2, w3, m1, mid_start, vert_stride, kv_row0, k_col, v_col, q_row0, q_col,
             Q_DESC, K_DESC, V_DESC, q_smem, k_smem, v_smem, ready, empty, q_bar,
             BS: gl.constexpr, BLOCK_N: gl.constexpr, SUBS: gl.constexpr, STAGES: gl.constexpr):
    """Producer warp: both 64-row halves of the query tile, then the key tiles of the walk into the ring, each
    once both consumers have released its slot (``empty``; a fresh barrier passes the first wait)."""
    mbarrier.expect(q_bar, 2 * Q_DESC.block_type.nbytes)
    tma.async_copy_global_to_shared(Q_DESC, [q_row0.to(gl.int32), q_col], q_bar, q_smem.index(0))
    tma.async_copy_global_to_shared(Q_DESC, [(q_row0 + 64).to(gl.int32), q_col], q_bar, q_smem.index(1))
    for t in range(0, n_all):
        mbarrier.wait(empty.index(t % STAGES), ((t // STAGES) & 1) ^ 1)
        _issue_kv(t, n_all, n_in_e, w0, w1, w2, w3, m1, mid_start, vert_stride, kv_row0, k_col, v_col,
                  K_DESC, V_DESC, k_smem, v_smem, ready, BS, BLOCK_N, SUBS, STAGES)


@gluon.jit
def s2_fwd_hopper_kernel(
    Q_DESC, K_DESC, V_DESC, O, LSE, CU_SEQLENS, HEAD_TO_PAT, RESIDUES,
    stride_qh, stride_kh, stride_vh, stride_ob, stride_os, stride_oh, stride_lb, stride_lh,
    qk_scale, q_len, kv_len, num_tiles, first_block, group, local_blocks, vert_stride, q_rows_b, kv_rows_b,
    HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, BS: gl.constexpr,
    STAGES: gl.constexpr, VARLEN: gl.constexpr, CONSUMER_REGS: gl.constexpr, PINGPONG: gl.constexpr,
    num_warps: gl.constexpr,
):
    """Warp-specialised form: a producer warp streams Q and the K/V ring with TMA, two consumer warpgroups (64
    query rows each) run the matrix products and the softmax; the warp scheduler interleaves the two."""
    ROWS: gl.constexpr = BLOCK_M // BS
    SUBS: gl.constexpr = BS // BLOCK_N
    gl.static_assert(BLOCK_M == 128, "two consumer warpgroups of 64 rows")
    gl.static_assert(num_warps == 4, "the default partition is one consumer warpgroup")
    tile = num_tiles - 1 - gl.program_id(0)
    h = gl.program_id(1)
    b = gl.program_id(2)
    seq_start, kv_end, past = _seq_bounds(CU_SEQLENS, b, q_len, kv_len, VARLEN)
    tile_pos0 = (first_block + tile * ROWS) * BS
    if tile_pos0 < kv_end:
        kvh = h // group
        n_ent, w0, w1, w2, w3, width = _row_walk(RESIDUES, RESIDUES, gl.load(HEAD_TO_PAT + h), tile, num_tiles,
                                                 first_block, kv_end, local_blocks, vert_stride, BS, ROWS, True)
        n_in_e, mid_start, m1, n_diag = _fast_split(n_ent, w0, w1, w2, w3, width, ROWS)
        n_in = n_in_e * SUBS
        n_all = (n_in_e + m1 + n_diag) * SUBS
        kv_row0 = b * kv_rows_b + seq_start
        q_row0 = b * q_rows_b + seq_start + tile_pos0 - past
        dtype: gl.constexpr = Q_DESC.dtype
        q_smem = gl.allocate_shared_memory(dtype, [2, 64, HEAD_DIM], Q_DESC.layout)
        k_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, HEAD_DIM], K_DESC.layout)
        v_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, HEAD_DIM], V_DESC.layout)
        ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
        turns = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(STAGES):
            mbarrier.init(ready.index(i), count=1)
            mbarrier.init(empty.index(i), count=2)
        for i in gl.static_range(2):
            mbarrier.init(turns.index(i), count=1)
        mbarrier.init(q_bar, count=1)
        gl.warp_specialize([
            (_ws_consume_wg0, (n_in, n_all, n_in_e, w0, w1, w2, w3, m1, mid_start, width, vert_stride,
                               q_smem, k_smem, v_smem, ready, empty, q_bar, turns, O, LSE, b, h, tile_pos0,
                               seq_start, kv_end, past, stride_ob, stride_os, stride_oh, stride_lb, stride_lh,
                               qk_scale, HEAD_DIM, BLOCK_N, STAGES, BS, ROWS, SUBS, PINGPONG)),
            (_ws_consume_wg1, (n_in, n_all, n_in_e, w0, w1, w2, w3, m1, mid_start, width, vert_stride,
                               q_smem, k_smem, v_smem, ready, empty, q_bar, turns, O, LSE, b, h, tile_pos0,
                               seq_start, kv_end, past, stride_ob, stride_os, stride_oh, stride_lb, stride_lh,
                               qk_scale, HEAD_DIM, BLOCK_N, STAGES, BS, ROWS, SUBS, PINGPONG)),
            (_ws_load, (n_all, n_in_e, w0, w1, w2, w3, m1, mid_start, vert_stride, kv_row0, kvh * stride_kh,
                        kvh * stride_vh, q_row0, h * stride_qh, Q_DESC, K_DESC, V_DESC, q_smem, k_smem, v_smem,
                        ready, empty, q_bar, BS, BLOCK_N, SUBS, STAGES)),
        ], [4, 1], [CONSUMER_REGS, 24])
        for i in gl.static_range(STAGES):
            mbarrier.invalidate(ready.index(i))
            mbarrier.invalidate(empty.index(i))
        mbarrier.invalidate(q_bar)
        for i in gl.static_range(2):
            mbarrier.invalidate(turns.index(i))


@dataclass(frozen=True)
class HopperTiles:
    stages: int            # K/V ring slots in shared memory
    consumer_regs: int = 240  # registers per thread of each consumer warpgroup (the producer warp keeps 24)
    maxnreg: int = 168     # launch limit: 12 warps x 168 registers fill the register file, then redistributed
    block_m: int = 128     # two consumer warpgroups of 64 query rows
    block_n: int = 64      # key tile (the layout block is a whole number of them)
    pingpong: bool = False  # consumers take turns issuing their matrix products (measured slower)


@lru_cache(maxsize=None)
def _is_sm90(device_index: int) -> bool:
    return torch.cuda.get_device_capability(device_index) == (9, 0)


# below this many keys the Triton forward measured faster (H200, L16V16, head dim 128: 0.95x at 8k, 1.02x at 16k;
# bench/results/hopper_forward_H200.md); S2MEGATRON_HOPPER_FWD=1 takes this kernel at any length, =0 never
MIN_KEYS = 16384
_broken: list = []  # the compile error, once the kernel failed to build in this process


def hopper_tiles(head_dim: int) -> HopperTiles:
    """Four K/V slots (128 KB at head dim 128, with the 32 KB query tile: one CTA per SM)."""
    return HopperTiles(stages=4)


def hopper_forward_tiles(plan, q) -> Optional[HopperTiles]:
    """The tiles of this kernel for the call, or None where the Triton forward runs instead: not an S2Layout with
    block 64 or 128, head dim not 64 or 128, not 16-bit, not an sm_90 GPU, fewer than ``MIN_KEYS`` keys, the kernel
    failed to compile earlier, or ``S2MEGATRON_HOPPER_FWD=0``."""
    mode = os.environ.get("S2MEGATRON_HOPPER_FWD", "auto")
    if mode == "0" or _broken:
        return None
    if mode != "1" and plan.kv_len < MIN_KEYS:
        return None
    if plan.device.type != "cuda" or not _is_sm90(plan.device.index):
        return None
    if not plan.analytic or plan.block_size not in (64, 128) or plan.head_dim not in (64, 128):
        return None
    if q.dtype not in (torch.float16, torch.bfloat16):
        return None
    return hopper_tiles(plan.head_dim)


def _descriptor(x, view, block_rows, head_dim):
    shape, strides, _ = view
    dtype = gl.bfloat16 if x.dtype == torch.bfloat16 else gl.float16
    layout = gl.NVMMASharedLayout.get_default_for([block_rows, head_dim], dtype)
    return TensorDescriptor(x, shape, strides, [block_rows, head_dim], layout)


def hopper_forward(plan, tiles: HopperTiles, q, k, v, out, lse, cu, qk_scale, row_view, qkv_strides,
                   lse_strides) -> bool:
    """Launch the kernel into ``out`` and ``lse``; False (nothing launched) where a tensor has no TMA row view
    (``op.row_view``: strides, alignment) or K and V lay out their batch entries differently."""
    views = [row_view(x, plan.varlen, plan.head_dim) for x in (q, k, v)]
    if any(view is None for view in views) or views[1][2] != views[2][2]:
        return False
    meta, residues = plan.metadata(tiles.block_m)
    q_desc = _descriptor(q, views[0], 64, plan.head_dim)
    k_desc, v_desc = (_descriptor(x, view, tiles.block_n, plan.head_dim) for x, view in zip((k, v), views[1:]))
    (_, _, sqh), (_, _, skh), (_, _, svh) = (qkv_strides(x, plan.varlen) for x in (q, k, v))
    sob, sos, soh = qkv_strides(out, plan.varlen)
    grid = (meta.num_tiles, plan.num_heads, plan.batch)
    try:
        s2_fwd_hopper_kernel[grid](
            q_desc, k_desc, v_desc, out, lse, cu, meta.head_to_pattern, residues, sqh, skh, svh, sob, sos, soh,
            *lse_strides(lse, plan.varlen), qk_scale, plan.q_len, plan.kv_len, meta.num_tiles, meta.first_block,
            plan.group, plan.local_blocks, plan.vert_stride, views[0][2], views[1][2],
            HEAD_DIM=plan.head_dim, BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n, BS=plan.block_size,
            STAGES=tiles.stages, VARLEN=plan.varlen, CONSUMER_REGS=tiles.consumer_regs, PINGPONG=tiles.pingpong,
            num_warps=4, maxnreg=tiles.maxnreg)
    except CompilationError as err:  # another Triton version: the Triton forward from now on
        _broken.append(err)
        warnings.warn(f"S2 Hopper forward failed to compile, using the Triton forward instead: {err}")
        return False
    return True
