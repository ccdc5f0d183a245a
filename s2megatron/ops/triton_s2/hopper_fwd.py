"""S2 forward on Hopper (sm_90), warp-specialised, written against warpgroup MMA and TMA directly (Gluon).

The Triton forward (``kernels.s2_fwd_kernel``) is latency bound on Hopper: in its ncu profile every scheduler holds
two warps, under 0.6 of them eligible per cycle, and the tensor pipe is active 49 % of the time. Triton 3.6 cannot
warp-specialise it (its automatic pass hangs on Hopper, see ``bench/warp_specialize_probe.py``), so this kernel
does it by hand. A CTA computes 128-row query tiles (work items: query tile, head, batch entry):

- a producer warp issues the TMA copies: the two 64-row halves of the query tile, then the K/V tiles of the row walk
  into a ring of ``STAGES`` shared-memory slots (``ready`` barriers), each slot once both consumers have released
  it (``empty`` barriers);
- two consumer warpgroups (64 query rows each, 240 registers per thread) walk the same key tiles. Per tile they
  issue S(t+1) = Q K(t+1)^T and O += P(t) V(t) together (P from registers), run the softmax of S(t+1), rescale O
  and release slot t; the warp scheduler runs one warpgroup's softmax while the other's products occupy the tensor
  cores.

Key tiles are 128 keys: two 64-key layout blocks of the walk gathered into one ring slot (two TMA copies each for K
and V; a second block past the walk repeats the first, masked), or one 128-key block. Larger tiles halve the
barrier round trips and the per-row reductions per key.

Explicit turns for the two consumers' products (FA3's ping-pong) measured slower through mbarriers and no faster
through named barriers, so the scheduler interleaves them freely; a query-barrier pair per consumer, so that one
consumer may start its next query tile while the other finishes the last, measured no faster either, so the two share
one pair (measurements: ``bench/results/attention_NOTES.md``).

The online softmax of the interior key tiles at head dim 128 rescales O lazily (FA4's conditional rescale): a row's
reference point m_i moves only when a tile's maximum exceeds it by more than ``RESCALE_SLACK`` (2^8), so after the
first tiles alpha is exactly 1 and a branch skips O's rescale, 64 of the about 450 instructions a consumer thread runs
per key tile (:func:`_rescale`). Under load the card runs this kernel at its power limit (on an H200, 700 W at an SM
clock of about 1.6 GHz instead of 1.98), where its time follows the energy it spends: the lazy rescale measured 1-2 %
less forward time at 8k-128k in one process, while a quarter of the exponentials on the FMA pipe instead of the MUFU
(more instructions, a shorter MUFU queue) measured 5-7 % more (bench/results/attention_NOTES.md).

Grid: for S2 rows (under ``PERSISTENT_ROW_SHARE`` of the keys kept) one CTA per SM, each taking the work items
``program_id, program_id + grid, ...``; the ring and its barriers carry over, so the next query tile and its first
key tile load while the consumers finish the previous one (``q_free``: both consumers' last S product is done), and
no CTA pays a launch and a cold pipeline per query tile. Dense layouts keep one CTA per query tile: their rows read
the head's whole K/V prefix, and there the persistent grid measured slower (its CTAs drift apart in the item order,
while the hardware starts CTAs in order; the cause was not profiled). A counter-based (dynamic) persistent schedule
measured slower for S2 rows and equal for dense ones, and was not kept. Orders that balance the CTAs' items better
(heads fastest, or every other round reversed) measured slower too: they spread the items in flight over more K/V.
The dQ's turns (:func:`balanced_order`, the same items in flight) measured no faster here: 0-1.6 % less time
without GQA, 2.5-3.6 % more with GQA 32/8.

The row walk and masks are the Triton forward's, from the same helpers (``_row_walk``, ``_fast_split``): the
interior blocks of the S2 row walk (stripes, then the local blocks every row keeps) unmasked, then the first local
blocks and the diagonal with the causal and per-row (Merge-Q) mask. Rows of a key tile past the sequence are rows of
the same tensor (the next sequence or batch entry) or TMA zero fill past its end; the causal mask removes them, and
query rows outside the sequence are never stored.

The masked key tiles (at most two per query tile) run 64 keys at a time, and each consumer computes only the halves
its own 64 query rows keep (``_live_halves``): a 128-row tile walks the union of its two layout rows, so whole
128-key masked tiles computed, for one row or the other, the first local block only the first row keeps, the
diagonal block past the first row and the repeat that pads the last tile. Counted from the pattern (L16V16, block
64), the products computed over the (query, key) pairs kept were 1.104 / 1.064 / 1.025 at 8k / 32k / 128k with whole
tiles, and are 1.028 / 1.016 / 1.006 (the diagonal blocks' upper triangles) with halves. The halves are not
pipelined (S, softmax and P V of one, then the next): issuing a half's S with the previous half's P V measured no
faster, and slower at most shapes (bench/results/attention_NOTES.md). Against whole tiles, in one process on one H100:
5 / 4 / 2 % faster at 16k / 32k / 128k (block 128 at 32k 3 %, dense 0-2 %); at 8k 8 % slower in that timer, which
was host bound there in part, and 12-13 % faster under ncu (0.39 against 0.445 ms; 32k 2.17 against 2.35).

The layout's local blocks and vertical stride, the head count and the GQA group are compile-time constants of the
kernel (one build per layout and head shape, as Triton caches them): the walks, the masks and the work-item numbers
divide by them in products and shifts. As run-time values they cost 25 integer divisions and remainders in the PTX,
about 85 instructions per work item and 40 per masked key tile in each consumer; now the one left divides the work
item by the number of query tiles (about 1 % less forward time at 16k-128k on an H200,
bench/results/attention_NOTES.md).

Scope (:func:`hopper_forward_tiles`): an S2Layout of block 64 or 128, head dim 64 or 128, bf16/fp16, an sm_90 GPU,
tensors a TMA descriptor can read, and rows of at least ``MIN_ROW_KEYS`` kept keys (with whole masked tiles the
Triton forward measured faster on shorter rows; with the halves, rows under 1400 keys were not measured). Everything
else takes the Triton forward, as does every call once the kernel failed to compile (another Triton version: Gluon is
experimental), with one warning.
"""
from __future__ import annotations

import dataclasses
import os
import warnings
from dataclasses import dataclass
from functools import lru_cache
from typing import Optional

import torch
from triton.compiler.errors import CompilationError
from triton.runtime.errors import OutOfResources
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma, warpgroup_mma,
                                                                 warpgroup_mma_wait)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from .kernels import _LN2, _fast_split, _interior_block, _last_keeping_row, _row_walk, _seq_bounds
from .rows import lse_strides, qkv_strides, row_view

# the CTA barrier (within a warp-specialised partition: that partition's warps) is gl.barrier from Triton 3.7 on
_partition_barrier = getattr(gl, "barrier", None) or gl.thread_barrier


@gluon.jit
def _entry_block(e, n_in_e, w0, w1, w2, w3, m1, mid_start, vert_stride):
    """Key block of walk entry ``e`` (scalar or vector) in the kernel's order: the interior entries (``w1`` stripes
    ``w0 + e * V``, then local blocks from ``mid_start``), the first ``m1`` local blocks (from ``w2``), the diagonal
    blocks (from ``w3``)."""
    em = e - n_in_e
    j_in = _interior_block(e, w0, w1, mid_start, vert_stride)
    j_masked = gl.where(em < m1, w2 + em, w3 + em - m1)
    return gl.where(em < 0, j_in, j_masked)


@gluon.jit
def _tile_part(t, g, n_ent, BS: gl.constexpr, BLOCK_N: gl.constexpr):
    """(walk entry, key offset in its block) of part ``g`` of key tile ``t``: a key tile gathers ``BLOCK_N // BS``
    whole blocks (block smaller than the tile; a part past the walk repeats part 0, which no consumer computes) or is
    a ``BLOCK_N`` slice of one block."""
    if BS < BLOCK_N:
        e = t * (BLOCK_N // BS) + g
        return gl.where(e < n_ent, e, t * (BLOCK_N // BS)), 0
    else:
        return t // (BS // BLOCK_N), (t % (BS // BLOCK_N)) * BLOCK_N


@gluon.jit
def _issue_kv(t, slot, n_ent, n_all, n_in_e, w0, w1, w2, w3, m1, mid_start, vert_stride, kv_row0, k_col, v_col,
              K_DESC, V_DESC, k_smem, v_smem, ready, BS: gl.constexpr, BLOCK_N: gl.constexpr):
    """TMA copies of K and V of key tile ``t`` of the walk into ring slot ``slot``, one copy per part (the
    descriptors' block is a part: ``min(BS, BLOCK_N)`` rows)."""
    PART: gl.constexpr = K_DESC.block_type.shape[0]
    bar = ready.index(slot)
    mbarrier.expect(bar, (BLOCK_N // PART) * (K_DESC.block_type.nbytes + V_DESC.block_type.nbytes))
    for g in gl.static_range(BLOCK_N // PART):
        e, off = _tile_part(t, g, n_ent, BS, BLOCK_N)
        row = (kv_row0 + _entry_block(e, n_in_e, w0, w1, w2, w3, m1, mid_start, vert_stride) * BS + off)
        row = row.to(gl.int32)
        tma.async_copy_global_to_shared(K_DESC, [row, k_col], bar, k_smem.index(slot).slice(g * PART, PART))
        tma.async_copy_global_to_shared(V_DESC, [row, v_col], bar, v_smem.index(slot).slice(g * PART, PART))


@gluon.jit
def _half_entry(t, g: gl.constexpr, BS: gl.constexpr, BLOCK_N: gl.constexpr):
    """(walk entry, key offset in its block) of the 64 keys ``64 g .. 64 g + 63`` of key tile ``t``."""
    gl.static_assert(BS >= 64, "a 64-key half lies in one layout block")
    if BS < BLOCK_N:
        return t * (BLOCK_N // BS) + (g * 64) // BS, (g * 64) % BS
    else:
        return t // (BS // BLOCK_N), (t % (BS // BLOCK_N)) * BLOCK_N + g * 64


@gluon.jit
def _keeps_part(in_walk, e, off, wg: gl.constexpr, n_in_e, w0, w1, w2, w3, m1, mid_start, width, vert_stride,
                tile_pos0, BS: gl.constexpr, ROWS: gl.constexpr):
    """Whether consumer ``wg``'s 64 query rows keep some key of the keys from ``off`` in the block of walk entry ``e``
    (``in_walk``: the entry is one of the walk's): the block is kept by the layout row of the consumer's first row or
    an earlier one (Merge-Q), and its first key there is at or before the consumer's last query (causal). Which
    parts of the masked key tiles a consumer computes, in the forward (:func:`_live_halves`) and in the dQ
    (``hopper_dq``)."""
    j = _entry_block(e, n_in_e, w0, w1, w2, w3, m1, mid_start, vert_stride)
    return (in_walk & ((wg * 64) // BS <= _last_keeping_row((j % vert_stride) == w0, j, w3, width, ROWS))
            & (j * BS + off <= tile_pos0 + wg * 64 + 63))


@gluon.jit
def _live_halves(wg: gl.constexpr, n_ent, n_in_e, n_in, w0, w1, w2, w3, m1, mid_start, width, vert_stride, tile_pos0,
                 BS: gl.constexpr, ROWS: gl.constexpr, BLOCK_N: gl.constexpr):
    """Which 64-key halves of the masked key tiles consumer ``wg``'s 64 query rows keep, as bits
    ``2 (t - n_in) + g``: the half is a block of the walk (not the repeat that pads the last tile) and the
    consumer's rows keep some key of it (:func:`_keeps_part`). Computed once per query tile, after the interior walk.
    There are at most two masked tiles: ``m1`` is 0 or 1 (``_fast_split``), the diagonal is ``ROWS`` blocks (one
    tile at block 128), and one interior block may share the first of them."""
    bits = 0
    for u in gl.static_range(2 * (BLOCK_N // 64)):
        e, off = _half_entry(n_in + u // (BLOCK_N // 64), u % (BLOCK_N // 64), BS, BLOCK_N)
        live = _keeps_part(e < n_ent, e, off, wg, n_in_e, w0, w1, w2, w3, m1, mid_start, width, vert_stride,
                           tile_pos0, BS, ROWS)
        bits = bits | (live.to(gl.int32) << u)
    return bits


@gluon.jit
def _masked_half(s, t, g: gl.constexpr, wg: gl.constexpr, n_in_e, w0, w1, w2, w3, m1, mid_start, width, vert_stride,
                 tile_pos0, BS: gl.constexpr, ROWS: gl.constexpr, BLOCK_N: gl.constexpr, s_layout: gl.constexpr):
    """Scores of the keys ``64 g .. 64 g + 63`` of key tile ``t`` (one layout block: BS >= 64) for consumer
    ``wg``'s rows, with the causal and the per-row (Merge-Q) mask."""
    rows = wg * 64 + gl.arange(0, 64, layout=gl.SliceLayout(1, s_layout))
    q_pos = tile_pos0 + rows
    sub_row = rows // BS
    e, off = _half_entry(t, g, BS, BLOCK_N)
    j = _entry_block(e, n_in_e, w0, w1, w2, w3, m1, mid_start, vert_stride)
    k_pos = j * BS + off + gl.arange(0, 64, layout=gl.SliceLayout(0, s_layout))
    row_keeps = sub_row <= _last_keeping_row((j % vert_stride) == w0, j, w3, width, ROWS)
    allowed = (k_pos[None, :] <= q_pos[:, None]) & row_keeps[:, None]
    return gl.where(allowed, s, float("-inf"))


@gluon.constexpr_function
def _eight_byte_rows(head_dim):
    """The layout in which a consumer stores its 64 x ``head_dim`` output tile: the MMA accumulator's layout
    (``NVMMADistributedLayout`` v3: four warps of 16 rows, each thread two adjacent columns of every 8-column group)
    with its register basis of column 8 and its lane basis of column 2 exchanged, so that each thread holds four
    adjacent columns. The stores are 8 bytes wide and half as many as from the MMA layout, whose four-byte stores
    filled the store queue (about 6 % of a consumer's time at 8k under ncu; 3-6 % less forward time with these).
    Triton converts a single register-lane exchange with warp shuffles; 16-byte rows would take two exchanges, which
    it converts through shared memory, and the query tile and the K/V ring leave the forward none."""
    cols = [[0, 16 << i] for i in range((head_dim // 16).bit_length() - 1)]
    return gl.DistributedLinearLayout(reg_bases=[[0, 1], [0, 2], [8, 0]] + cols,
                                      lane_bases=[[0, 8], [0, 4], [1, 0], [2, 0], [4, 0]],
                                      warp_bases=[[16, 0], [32, 0]], block_bases=[], shape=[64, head_dim])


# a row's reference point m_i moves only when a score tile exceeds it by more than this (base 2), in the interior
# key tiles at head dims from LAZY_RESCALE_HEAD_DIM on: P stays within 2^RESCALE_SLACK, and O is rescaled only in
# the steps where m_i moves (:func:`_rescale`). At head dim 64 a thread's rescale is 32 products, and skipping them
# measured 2 % slower (bench/results/attention_NOTES.md): there m_i is the running maximum, as in the masked halves
RESCALE_SLACK = gl.constexpr(8.0)
LAZY_RESCALE_HEAD_DIM = gl.constexpr(128)


@gluon.jit
def _online_softmax(s, m_i, l_i, qk_scale, LAZY: gl.constexpr = False):
    """(P, alpha, m_i, l_i) of one score tile, base 2, m_i in scaled units. With ``LAZY``, ``m_i`` is the row's
    reference point, not its maximum: it moves to the new maximum only when that exceeds it by more than
    ``RESCALE_SLACK`` (or it is still -inf); otherwise alpha is exactly 1 and O needs no rescale. Either way the lse
    is m_i + log2(l_i). The row maximum as a tree of pairwise maxima instead of ``gl.max``'s chain (31 dependent
    maxima per row at 128 keys) measured no faster: the chain's latency is hidden (bench/results/attention_NOTES.md)."""
    m_max = gl.maximum(m_i, gl.max(s, 1) * qk_scale)
    if LAZY:
        m_new = gl.where(m_max > m_i + RESCALE_SLACK, m_max, m_i)
        m_safe = gl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = gl.where(m_new == m_i, 1.0, gl.exp2(m_i - m_safe))
    else:
        m_new = m_max
        m_safe = gl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = gl.exp2(m_i - m_safe)
    p = gl.exp2(s * qk_scale - m_safe[:, None])
    return p, alpha, m_new, l_i * alpha + gl.sum(p, 1)


@gluon.constexpr_function
def _rescale_asm(reg_bases, pack):
    """PTX for O *= alpha over one thread's ``pack`` accumulator registers (``$pack + r`` tied to ``$r``, alpha of
    register r's row in ``$2 pack + r``), skipping the products where every row the thread holds has alpha 1.
    ``reg_bases``: the accumulator layout's register bases (row, column), from which the registers of each distinct
    row are found: the test of one register per row is enough."""
    first = {}
    for r in range(pack):
        row = 0
        for i in range(len(reg_bases)):
            if (r >> i) & 1:
                row ^= reg_bases[i][0]
        first.setdefault(row, r)
    regs = sorted(first.values())
    lines = ["{", ".reg .pred keep;", f"setp.eq.f32 keep, ${2 * pack + regs[0]}, 0f3F800000;"]
    lines += [f"setp.eq.and.f32 keep, ${2 * pack + r}, 0f3F800000, keep;" for r in regs[1:]]
    lines.append("@keep bra DONE;")
    lines += [f"mul.f32 ${r}, ${r}, ${2 * pack + r};" for r in range(pack)]
    lines += ["DONE:", "}"]
    return "\n".join(lines)


@gluon.constexpr_function
def _rescale_constraints(pack):
    return ",".join(["=r"] * pack + [str(r) for r in range(pack)] + ["r"] * pack)


@gluon.jit
def _rescale(acc, alpha):
    """O * alpha (alpha per row, in the row layout of ``acc``), where a thread whose rows all have alpha 1 (their
    reference points did not move, :func:`_online_softmax` with ``LAZY``) skips its HEAD_DIM / 2 products: at head
    dim 128, 64 of the about 450 instructions a consumer thread runs per key tile. Under load the card runs at its
    power limit, where the clock follows the energy spent (bench/results/attention_NOTES.md)."""
    ROWS: gl.constexpr = acc.type.shape[0]
    COLS: gl.constexpr = acc.type.shape[1]
    PACK: gl.constexpr = ROWS * COLS // (32 * gl.num_warps())
    reg_bases: gl.constexpr = gl.to_linear_layout(acc.type.layout, acc.type.shape).reg_bases
    return gl.inline_asm_elementwise(_rescale_asm(reg_bases, PACK), _rescale_constraints(PACK),
                                     [acc, alpha[:, None]], dtype=gl.float32, is_pure=True, pack=PACK)


@gluon.jit
def _consumer_step(t, base, p, acc, m_i, l_i, q, k_smem, v_smem, ready, empty, qk_scale, HAS_NEXT: gl.constexpr,
                   BLOCK_N: gl.constexpr, STAGES: gl.constexpr, s_layout: gl.constexpr, p_layout: gl.constexpr):
    """Interior key tile ``t`` of the walk (ring position ``base + t``) for one consumer warpgroup: issue S(t+1) =
    Q K(t+1)^T (the next tile is interior too: no mask) and O += P(t) V(t) (P from registers), wait for both, run the
    softmax of S(t+1), rescale O and release tile t's slot (K(t) was read by S(t), V(t) by P(t) V(t)). Starting the
    softmax while P(t) V(t) still runs measured no faster at 128-key tiles and spills; tried again with the
    compile-time layout, 2-5 % slower at 8k, under GQA and at head dim 64 (bench/results/attention_NOTES.md)."""
    cur = base + t
    if HAS_NEXT:
        mbarrier.wait(ready.index((cur + 1) % STAGES), ((cur + 1) // STAGES) & 1)
        s_tok = warpgroup_mma(q, k_smem.index((cur + 1) % STAGES).permute((1, 0)),
                              gl.zeros([64, BLOCK_N], gl.float32, s_layout), use_acc=False, is_async=True)
    acc_tok = warpgroup_mma(gl.convert_layout(p.to(v_smem.dtype), p_layout), v_smem.index(cur % STAGES), acc,
                            is_async=True)
    if HAS_NEXT:
        s, acc_tok = warpgroup_mma_wait(0, deps=(s_tok, acc_tok))
        LAZY: gl.constexpr = acc.type.shape[1] >= LAZY_RESCALE_HEAD_DIM
        p, alpha, m_i, l_i = _online_softmax(s, m_i, l_i, qk_scale, LAZY)
        acc = warpgroup_mma_wait(0, deps=(acc_tok, ))
        alpha = gl.convert_layout(alpha, gl.SliceLayout(1, acc.type.layout))
        if LAZY:
            acc = _rescale(acc, alpha)
        else:
            acc = acc * alpha[:, None]
    else:
        acc = warpgroup_mma_wait(0, deps=(acc_tok, ))
    mbarrier.arrive(empty.index(cur % STAGES), count=1)
    return p, acc, m_i, l_i


@gluon.jit
def _half_step(t, g: gl.constexpr, wg: gl.constexpr, slot, acc, m_i, l_i, q, k_smem, v_smem, qk_scale,
               n_in_e, w0, w1, w2, w3, m1, mid_start, width, vert_stride, tile_pos0,
               BS: gl.constexpr, ROWS: gl.constexpr, BLOCK_N: gl.constexpr, h_layout: gl.constexpr,
               p_layout: gl.constexpr):
    """The keys ``64 g .. 64 g + 63`` of masked key tile ``t`` (ring slot ``slot``) for one consumer: S = Q K^T over
    those 64 keys, the masks, the softmax, O rescaled, O += P V. ``m_i`` and ``l_i`` stay in the row layout of the
    128-key score tiles (the same rows per thread)."""
    k_half = k_smem.index(slot).slice(g * 64, 64)
    v_half = v_smem.index(slot).slice(g * 64, 64)
    s_tok = warpgroup_mma(q, k_half.permute((1, 0)), gl.zeros([64, 64], gl.float32, h_layout), use_acc=False,
                          is_async=True)
    s = warpgroup_mma_wait(0, deps=(s_tok, ))
    rows_layout: gl.constexpr = gl.SliceLayout(1, h_layout)
    s = _masked_half(s, t, g, wg, n_in_e, w0, w1, w2, w3, m1, mid_start, width, vert_stride, tile_pos0,
                     BS, ROWS, BLOCK_N, h_layout)
    p, alpha, m_h, l_h = _online_softmax(s, gl.convert_layout(m_i, rows_layout), gl.convert_layout(l_i, rows_layout),
                                         qk_scale)
    acc = acc * gl.convert_layout(alpha, gl.SliceLayout(1, acc.type.layout))[:, None]
    acc_tok = warpgroup_mma(gl.convert_layout(p.to(v_smem.dtype), p_layout), v_half, acc, is_async=True)
    acc = warpgroup_mma_wait(0, deps=(acc_tok, ))
    return acc, gl.convert_layout(m_h, m_i.type.layout), gl.convert_layout(l_h, l_i.type.layout)


@gluon.jit
def _first_turn(ORDER, ORDERED: gl.constexpr):
    """The CTA's first work item: ``ORDER[program_id]`` (:func:`balanced_order`), else ``program_id``."""
    if ORDERED:
        return gl.load(ORDER + gl.program_id(0))
    else:
        return gl.program_id(0)


@gluon.jit
def _next_turn(ORDER, i, nxt, ORDERED: gl.constexpr):
    """(work item of the CTA's turn at position ``i``, the item of its next turn): ``i`` itself, else ``nxt``, the
    entry of ``ORDER`` loaded one turn ahead, so the item's start does not wait for the load."""
    if ORDERED:
        return nxt, gl.load(ORDER + i + gl.num_programs(0))
    else:
        return i, nxt


@gluon.jit
def _work_item(w, RESIDUES, HEAD_TO_PAT, CU_SEQLENS, q_len, kv_len, num_tiles, num_heads, first_block, group,
               local_blocks, vert_stride, q_rows_b, kv_rows_b,
               BS: gl.constexpr, ROWS: gl.constexpr, BLOCK_N: gl.constexpr, VARLEN: gl.constexpr):
    """Query tile, head and batch entry of work item ``w`` (tiles of a head from the last, the longest walks, to the
    first; then the next head), whether the tile holds a query row of its sequence, and its row walk: the
    interior / all key-tile counts, the walk state, and the tensors' first rows."""
    tile = num_tiles - 1 - w % num_tiles
    h = (w // num_tiles) % num_heads
    b = (w // num_tiles) // num_heads
    seq_start, kv_end, past = _seq_bounds(CU_SEQLENS, b, q_len, kv_len, VARLEN)
    tile_pos0 = (first_block + tile * ROWS) * BS
    n_ent, w0, w1, w2, w3, width = _row_walk(RESIDUES, RESIDUES, gl.load(HEAD_TO_PAT + h), tile, num_tiles,
                                             first_block, kv_end, local_blocks, vert_stride, BS, ROWS, True)
    n_in_e, mid_start, m1, n_diag = _fast_split(n_ent, w0, w1, w2, w3, width, ROWS)
    if BS < BLOCK_N:  # key tiles of BLOCK_N // BS whole blocks; one mixing interior and masked entries is masked
        n_in = n_in_e // (BLOCK_N // BS)
        n_all = (n_ent + BLOCK_N // BS - 1) // (BLOCK_N // BS)
    else:
        n_in = n_in_e * (BS // BLOCK_N)
        n_all = n_ent * (BS // BLOCK_N)
    kv_row0 = b * kv_rows_b + seq_start
    q_row0 = b * q_rows_b + seq_start + tile_pos0 - past
    return (tile_pos0 < kv_end, b, h, h // group, tile_pos0, seq_start, kv_end, past, n_ent, n_in_e, n_in, n_all,
            w0, w1, w2, w3, width, m1, mid_start, kv_row0, q_row0)


@gluon.jit
def _ws_consume(wg: gl.constexpr, q_smem, k_smem, v_smem, ready, empty, q_bar, q_free, O, LSE, CU_SEQLENS,
                HEAD_TO_PAT, RESIDUES, stride_ob, stride_os, stride_oh, stride_lb, stride_lh, qk_scale, q_len, kv_len,
                num_items, num_tiles, num_heads, first_block, group, local_blocks, vert_stride, q_rows_b, kv_rows_b,
                HEAD_DIM: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr, BS: gl.constexpr,
                ROWS: gl.constexpr, VARLEN: gl.constexpr):
    """Consumer warpgroup ``wg``: rows ``64 wg .. 64 wg + 63`` of each query tile of the CTA, every key tile of its
    walk. ``it`` counts the ring's key tiles and ``j`` the query tiles over the CTA's work items."""
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, BLOCK_N, 16])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, HEAD_DIM, 16])
    h_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, 64, 16])  # 64-key score tiles
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    q = q_smem.index(wg)
    it = 0
    j = 0
    for w in range(gl.program_id(0), num_items, gl.num_programs(0)):
        (valid, b, h, kvh, tile_pos0, seq_start, kv_end, past, n_ent, n_in_e, n_in, n_all, w0, w1, w2, w3, width, m1,
         mid_start, kv_row0, q_row0) = _work_item(w, RESIDUES, HEAD_TO_PAT, CU_SEQLENS, q_len, kv_len, num_tiles,
                                                  num_heads, first_block, group, local_blocks, vert_stride, q_rows_b,
                                                  kv_rows_b, BS, ROWS, BLOCK_N, VARLEN)
        if valid:
            m_i = gl.full([64], float("-inf"), gl.float32, gl.SliceLayout(1, s_layout))
            l_i = gl.zeros([64], gl.float32, gl.SliceLayout(1, s_layout))
            acc = gl.zeros([64, HEAD_DIM], gl.float32, o_layout)
            mbarrier.wait(q_bar, j & 1)
            if n_in > 0:  # interior tiles, pipelined: S of the next tile with P V of this one
                mbarrier.wait(ready.index(it % STAGES), (it // STAGES) & 1)
                s_tok = warpgroup_mma(q, k_smem.index(it % STAGES).permute((1, 0)),
                                      gl.zeros([64, BLOCK_N], gl.float32, s_layout), use_acc=False, is_async=True)
                s = warpgroup_mma_wait(0, deps=(s_tok, ))
                p, _, m_i, l_i = _online_softmax(s, m_i, l_i, qk_scale)  # O is still zero: no rescale
                for t in range(0, n_in - 1):
                    p, acc, m_i, l_i = _consumer_step(t, it, p, acc, m_i, l_i, q, k_smem, v_smem, ready, empty,
                                                      qk_scale, True, BLOCK_N, STAGES, s_layout, p_layout)
                p, acc, m_i, l_i = _consumer_step(n_in - 1, it, p, acc, m_i, l_i, q, k_smem, v_smem, ready, empty,
                                                  qk_scale, False, BLOCK_N, STAGES, s_layout, p_layout)
            live = _live_halves(wg, n_ent, n_in_e, n_in, w0, w1, w2, w3, m1, mid_start, width, vert_stride,
                                tile_pos0, BS, ROWS, BLOCK_N)
            for t in range(n_in, n_all):  # masked tiles, 64 keys at a time: only those this consumer's rows keep
                cur = it + t
                mbarrier.wait(ready.index(cur % STAGES), (cur // STAGES) & 1)
                for g in gl.static_range(BLOCK_N // 64):
                    if ((live >> ((t - n_in) * (BLOCK_N // 64) + g)) & 1) != 0:
                        acc, m_i, l_i = _half_step(t, g, wg, cur % STAGES, acc, m_i, l_i, q, k_smem, v_smem,
                                                   qk_scale, n_in_e, w0, w1, w2, w3, m1, mid_start, width,
                                                   vert_stride, tile_pos0, BS, ROWS, BLOCK_N, h_layout, p_layout)
                mbarrier.arrive(empty.index(cur % STAGES), count=1)
            mbarrier.arrive(q_free, count=1)  # every S of this tile is done: the next query tile may load

            empty_row = l_i == 0.0
            lse = gl.where(empty_row, float("-inf"), (m_i + gl.log2(gl.where(empty_row, 1.0, l_i))) * _LN2)
            # one division per row and a product per element (a division per element was 4-5 instructions each,
            # 280 of the consumer's per-item instructions)
            inv_l = gl.convert_layout(1.0 / gl.where(empty_row, 1.0, l_i), gl.SliceLayout(1, o_layout))
            st_layout: gl.constexpr = _eight_byte_rows(HEAD_DIM)
            out = gl.convert_layout((acc * inv_l[:, None]).to(O.dtype.element_ty), st_layout)
            rows = wg * 64 + gl.arange(0, 64, layout=gl.SliceLayout(1, s_layout))
            q_pos = tile_pos0 + rows
            rows_o = wg * 64 + gl.arange(0, 64, layout=gl.SliceLayout(1, st_layout))
            offs_d = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, st_layout))
            q_pos_o = tile_pos0 + rows_o
            row0 = seq_start + (tile_pos0 - past).to(gl.int64)
            o_ptrs = (O + b.to(gl.int64) * stride_ob + h * stride_oh + (row0 + rows_o)[:, None] * stride_os
                      + offs_d[None, :])
            gl.store(o_ptrs, out, mask=((q_pos_o >= past) & (q_pos_o < kv_end))[:, None])
            gl.store(LSE + b.to(gl.int64) * stride_lb + h * stride_lh + row0 + rows, lse,
                     mask=(q_pos >= past) & (q_pos < kv_end))
            it += n_all
            j += 1


@gluon.jit
def _issue_query_rows(Q_DESC, DO_DESC, q_smem, do_smem, q_bar, q_row0, h, stride_qh, stride_doh):
    """TMA copies of both 64-row halves of the query tile, and of dO's where ``DO_DESC`` is given (the dQ kernel),
    completing ``q_bar``."""
    if DO_DESC is None:
        mbarrier.expect(q_bar, 2 * Q_DESC.block_type.nbytes)
    else:
        mbarrier.expect(q_bar, 2 * (Q_DESC.block_type.nbytes + DO_DESC.block_type.nbytes))
    for g in gl.static_range(2):
        row = (q_row0 + g * 64).to(gl.int32)
        tma.async_copy_global_to_shared(Q_DESC, [row, h * stride_qh], q_bar, q_smem.index(g))
        if DO_DESC is not None:
            tma.async_copy_global_to_shared(DO_DESC, [row, h * stride_doh], q_bar, do_smem.index(g))


@gluon.jit
def _ws_load(Q_DESC, DO_DESC, K_DESC, V_DESC, q_smem, do_smem, k_smem, v_smem, ready, empty, q_bar, q_free,
             CU_SEQLENS, HEAD_TO_PAT, RESIDUES, ORDER, stride_qh, stride_doh, stride_kh, stride_vh, q_len, kv_len,
             num_items, num_tiles, num_heads, first_block, group, local_blocks, vert_stride, q_rows_b, kv_rows_b,
             BS: gl.constexpr, ROWS: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
             VARLEN: gl.constexpr, ORDERED: gl.constexpr):
    """Producer warp, per query tile of the CTA: the first key tile of the walk into the ring, both 64-row halves of
    the query tile (and of dO for the dQ kernel, ``hopper_dq``; None here) once the consumers are done with the
    previous one (``q_free``), then the other key tiles, each once both consumers have released its slot (``empty``;
    a fresh barrier passes the first wait)."""
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
            k_col = kvh * stride_kh
            v_col = kvh * stride_vh
            for t in range(0, n_all):
                cur = it + t
                mbarrier.wait(empty.index(cur % STAGES), ((cur // STAGES) & 1) ^ 1)
                _issue_kv(t, cur % STAGES, n_ent, n_all, n_in_e, w0, w1, w2, w3, m1, mid_start, vert_stride, kv_row0,
                          k_col, v_col, K_DESC, V_DESC, k_smem, v_smem, ready, BS, BLOCK_N)
                if t == 0:
                    mbarrier.wait(q_free, (j & 1) ^ 1)
                    _issue_query_rows(Q_DESC, DO_DESC, q_smem, do_smem, q_bar, q_row0, h, stride_qh, stride_doh)
            it += n_all
            j += 1


@gluon.jit
def _store_through_smem(x, smem, DESC, X, row, col, stride_row, lo, hi):
    """Store rows ``lo <= r < hi`` of the tile ``x`` (a warpgroup's registers) at row ``row + r``, column ``col`` of
    the 2-D row view of ``X`` (``DESC``'s tensor, row stride ``stride_row``), through ``smem``: a buffer of the
    descriptor's block and layout that no product reads any more. Every thread writes its part of the tile there,
    then one TMA copy takes the whole tile, asynchronously; a tile with rows outside the sequence (they belong to
    the next one, or to no query) goes out from shared memory in 16-byte stores of its own rows. A global store from
    the MMA layout would be four bytes per instruction, and fills the store queue. The caller waits
    (``tma.store_wait`` and a barrier) before the buffer is written again or the kernel ends."""
    ROWS: gl.constexpr = DESC.block_type.shape[0]
    COLS: gl.constexpr = DESC.block_type.shape[1]
    smem.store(x)
    if (lo == 0) & (hi >= ROWS):
        fence_async_shared()  # the threads' shared-memory writes before the TMA unit reads them
        _partition_barrier()
        tma.async_copy_shared_to_global(DESC, [row.to(gl.int32), col], smem)
    else:
        _partition_barrier()
        # 16 bytes per thread and instruction, whole rows per warp: 8 rows per pass of the warpgroup at 128 columns,
        # 16 at 64
        rows_layout: gl.constexpr = gl.BlockedLayout([1, 8], [32 * 8 // COLS, COLS // 8], [4, 1], [1, 0])
        CHUNK: gl.constexpr = 4 * (32 * 8 // COLS)
        c = gl.arange(0, COLS, layout=gl.SliceLayout(0, rows_layout))
        for i in gl.static_range(ROWS // CHUNK):
            r = i * CHUNK + gl.arange(0, CHUNK, layout=gl.SliceLayout(1, rows_layout))
            ptrs = X + (row + r).to(gl.int64)[:, None] * stride_row + col + c[None, :]
            gl.store(ptrs, smem.slice(i * CHUNK, CHUNK).load(rows_layout), mask=((r >= lo) & (r < hi))[:, None])


@gluon.jit
def _ring_barriers(STAGES: gl.constexpr):
    """The barriers of a ring of ``STAGES`` shared-memory slots, one pair per slot: ``ready`` (the producer's TMA
    copies into the slot have landed) and ``empty`` (both consumers have released it)."""
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(STAGES):
        mbarrier.init(ready.index(i), count=1)
        mbarrier.init(empty.index(i), count=2)
    return ready, empty


@gluon.jit
def _invalidate_ring(ready, empty, STAGES: gl.constexpr):
    for i in gl.static_range(STAGES):
        mbarrier.invalidate(ready.index(i))
        mbarrier.invalidate(empty.index(i))


@gluon.jit
def _query_barriers():
    """The query tile's barriers, shared by the producer (:func:`_ws_load`) and both consumers: ``q_bar`` (its TMA
    copies have landed) and ``q_free`` (both consumers are done with it)."""
    q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    q_free = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    mbarrier.init(q_bar, count=1)
    mbarrier.init(q_free, count=2)
    return q_bar, q_free


@gluon.jit
def _invalidate_barriers(ready, empty, q_bar, q_free, STAGES: gl.constexpr):
    """Invalidate the ring's and the query tile's barriers at the end of the kernel."""
    _invalidate_ring(ready, empty, STAGES)
    mbarrier.invalidate(q_bar)
    mbarrier.invalidate(q_free)


@gluon.jit
def s2_fwd_hopper_kernel(
    Q_DESC, K_DESC, V_DESC, O, LSE, CU_SEQLENS, HEAD_TO_PAT, RESIDUES,
    stride_qh, stride_kh, stride_vh, stride_ob, stride_os, stride_oh, stride_lb, stride_lh,
    qk_scale, q_len, kv_len, num_items, num_tiles, num_heads: gl.constexpr, first_block, group: gl.constexpr,
    local_blocks: gl.constexpr, vert_stride: gl.constexpr, q_rows_b, kv_rows_b,
    HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, BS: gl.constexpr,
    STAGES: gl.constexpr, VARLEN: gl.constexpr, CONSUMER_REGS: gl.constexpr, num_warps: gl.constexpr,
):
    """Warp-specialised form: a producer warp streams Q and the K/V ring with TMA, two consumer warpgroups (64
    query rows each) run the matrix products and the softmax; the warp scheduler interleaves the two. A CTA takes
    the work items (query tile, head, batch entry) ``program_id, program_id + grid, ...``: persistent when the grid
    is smaller than ``num_items``, the ring and the barriers carrying over from one item to the next (the next query
    tile and its first key tile load while the consumers finish the previous one)."""
    ROWS: gl.constexpr = BLOCK_M // BS
    gl.static_assert(BLOCK_M == 128, "two consumer warpgroups of 64 rows")
    gl.static_assert(num_warps == 4, "the default partition is one consumer warpgroup")
    dtype: gl.constexpr = Q_DESC.dtype
    q_smem = gl.allocate_shared_memory(dtype, [2, 64, HEAD_DIM], Q_DESC.layout)
    k_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, HEAD_DIM], K_DESC.layout)
    v_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, HEAD_DIM], V_DESC.layout)
    ready, empty = _ring_barriers(STAGES)
    q_bar, q_free = _query_barriers()
    gl.warp_specialize([
        (_ws_consume, (0, q_smem, k_smem, v_smem, ready, empty, q_bar, q_free, O, LSE, CU_SEQLENS, HEAD_TO_PAT,
                       RESIDUES, stride_ob, stride_os, stride_oh, stride_lb, stride_lh, qk_scale, q_len, kv_len,
                       num_items, num_tiles, num_heads, first_block, group, local_blocks, vert_stride, q_rows_b,
                       kv_rows_b, HEAD_DIM, BLOCK_N, STAGES, BS, ROWS, VARLEN)),
        (_ws_consume, (1, q_smem, k_smem, v_smem, ready, empty, q_bar, q_free, O, LSE, CU_SEQLENS, HEAD_TO_PAT,
                       RESIDUES, stride_ob, stride_os, stride_oh, stride_lb, stride_lh, qk_scale, q_len, kv_len,
                       num_items, num_tiles, num_heads, first_block, group, local_blocks, vert_stride, q_rows_b,
                       kv_rows_b, HEAD_DIM, BLOCK_N, STAGES, BS, ROWS, VARLEN)),
        (_ws_load, (Q_DESC, None, K_DESC, V_DESC, q_smem, None, k_smem, v_smem, ready, empty, q_bar, q_free,
                    CU_SEQLENS, HEAD_TO_PAT, RESIDUES, None, stride_qh, None, stride_kh, stride_vh, q_len, kv_len,
                    num_items, num_tiles, num_heads, first_block, group, local_blocks, vert_stride, q_rows_b,
                    kv_rows_b, BS, ROWS, BLOCK_N, STAGES, VARLEN, False)),
    ], [4, 1], [CONSUMER_REGS, 24])
    _invalidate_barriers(ready, empty, q_bar, q_free, STAGES)


@dataclass(frozen=True)
class HopperTiles:
    stages: int            # K/V ring slots in shared memory
    consumer_regs: int = 240  # registers per thread of each consumer warpgroup (the producer warp keeps 24)
    maxnreg: int = 168     # launch limit: 12 warps x 168 registers fill the register file, then redistributed
    block_m: int = 128     # two consumer warpgroups of 64 query rows
    block_n: int = 128     # key tile: two 64-key blocks gathered, or one 128-key block
    persistent: bool = True  # one CTA per SM taking work items in turn; else one CTA per work item


@lru_cache(maxsize=None)
def _is_sm90(device_index: int) -> bool:
    return torch.cuda.get_device_capability(device_index) == (9, 0)


@lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


# the Triton forward measured faster where the rows are short (H100, head dim 128, the persistent grid): with whole
# masked tiles this kernel ran 0.97-0.99x the Triton forward at 8k (L16V16: 23 kept blocks of 64 in the last row,
# 1472 keys); with the masked halves its GPU time at 8k is 0.348-0.351 ms against 0.382-0.389 (CUDA graph replays,
# which leave the host out) and 0.39 against 0.42 under ncu; at 16k (31 blocks) 1.12-1.14x, at 32k (47 blocks)
# 1.14-1.17x, dense 8k 1.17-1.25x (bench/results/attention_NOTES.md). Shorter rows were not measured and keep the
# Triton forward. S2MEGATRON_HOPPER_FWD=1 takes this kernel for every call it can run, =0 never
MIN_ROW_KEYS = 1400
# persistent CTAs where the last row keeps under this share of the keys (S2 rows: local blocks and stripes, the same
# stripes for every query tile of a head; 32k 1.04-1.05x, 128k 1.01-1.02x, 8k 1.03-1.04x over one CTA per query tile);
# dense rows, which read the head's whole K/V prefix, measured slower on it (dense 32k: 15.7-16.1 ms against 14.2-15.0)
PERSISTENT_ROW_SHARE = 0.5
_broken: list = []  # the compile error, once the kernel failed to build in this process


def hopper_tiles() -> HopperTiles:
    """Three K/V slots of 128 keys (192 KB at head dim 128, with the 32 KB query tile: one CTA per SM).

    Measured on an H200 (L16V16, block 64, head dim 128; ms at 8k / 32k / 128k, Triton forward 0.355 / 2.368 /
    22.66 in the same process): 128-key tiles, 3 slots 0.384 / 2.254 / 19.93; the same with the softmax of S(t+1)
    overlapping P(t) V(t) 0.383 / 2.239 / 19.82 (equal within noise, and 52 bytes of spills); 128-key tiles with 2
    slots 0.420 / 2.587 / 22.62; 64-key tiles, 4 slots, overlapped 0.373 / 2.315 / 20.68."""
    return HopperTiles(stages=3)


@lru_cache(maxsize=256)
def row_keys(patterns, layout, kv_len: int) -> float:
    """Kept keys of the last query row, averaged over the heads (``patterns``: the layout's StridePatterns for the
    call's heads): the ``L`` local blocks and the stripes below them, or every block for a dense head. The longest
    row walk of the call: the kernel pays its per-tile overhead once per walk. Cached per call shape."""
    blocks = -(-kv_len // layout.block_size)
    local = min(layout.local_blocks, blocks)
    start = blocks - local  # first local block of the last row
    kept = []
    for pat in patterns.head_to_pattern:
        r = patterns.residues[pat]
        kept.append(blocks if r < 0 else local + (0 if start <= r else (start - 1 - r) // layout.vert_stride + 1))
    return layout.block_size * sum(kept) / len(kept)


def hopper_runnable(plan, q) -> bool:
    """Whether the call is in the Hopper kernels' scope (forward and dK/dV): an S2Layout of block 64 or 128, head dim
    64 or 128, 16-bit tensors, on an sm_90 GPU."""
    if plan.device.type != "cuda" or not _is_sm90(plan.device.index):
        return False
    if not plan.analytic or plan.block_size not in (64, 128) or plan.head_dim not in (64, 128):
        return False
    return q.dtype in (torch.float16, torch.bfloat16)


def hopper_forward_tiles(plan, q) -> Optional[HopperTiles]:
    """The tiles of this kernel for the call, or None where the Triton forward runs instead: not an S2Layout with
    block 64 or 128, head dim not 64 or 128, not 16-bit, not an sm_90 GPU, rows shorter than ``MIN_ROW_KEYS`` kept
    keys (:func:`row_keys`), the kernel failed to compile earlier, or ``S2MEGATRON_HOPPER_FWD=0``. The grid is
    persistent where the rows keep under ``PERSISTENT_ROW_SHARE`` of the keys."""
    mode = os.environ.get("S2MEGATRON_HOPPER_FWD", "auto")
    if mode == "0" or _broken or not hopper_runnable(plan, q):
        return None
    patterns = plan.metadata(HopperTiles.block_m)[0].patterns  # cached per shape
    keys = row_keys(patterns, plan.layout, plan.kv_len)
    if mode != "1" and keys < MIN_ROW_KEYS:
        return None
    return dataclasses.replace(hopper_tiles(), persistent=keys < PERSISTENT_ROW_SHARE * plan.kv_len)


def launch_or_fall_back(kernel, grid, broken: list, what: str, *args, **kwargs) -> bool:
    """Launch the Gluon ``kernel`` (the Hopper ``what``) on ``grid``; True once launched. Gluon is experimental:
    where the installed Triton cannot compile the kernel, or compiles it to more shared memory than a CTA may use
    (the dQ's buffers leave 2.4 KB of the 227 KB with Triton 3.6, another version may lay them out larger), the error
    goes to ``broken`` (the module's ``_broken``, which its policy checks, so the kernel is not tried again), one
    warning says the Triton kernel runs instead, and False is returned (nothing launched)."""
    try:
        kernel[grid](*args, **kwargs)
    except (CompilationError, OutOfResources) as err:
        broken.append(err)
        warnings.warn(f"S2 Hopper {what} failed to compile, using the Triton {what} instead: {err}")
        return False
    return True


@lru_cache(maxsize=None)
def _smem_layout(block_rows: int, head_dim: int, bf16: bool):
    """The shared-memory layout of a TMA block (built once per shape: building it costs host time per call)."""
    return gl.NVMMASharedLayout.get_default_for([block_rows, head_dim], gl.bfloat16 if bf16 else gl.float16)


def _descriptor(x, view, block_rows, head_dim):
    shape, strides, _ = view
    layout = _smem_layout(block_rows, head_dim, x.dtype == torch.bfloat16)
    return TensorDescriptor(x, shape, strides, [block_rows, head_dim], layout)


def row_descriptors(xs, plan, block_rows: int):
    """``(a descriptor of block_rows rows per tensor of xs, rows per batch entry)`` for TMA copies of tensors that
    share a batch layout (Q and dO, K and V, dK and dV; or one tensor), or None where a tensor has no TMA row view
    (:func:`rows.row_view`: strides, alignment) or they lay out their batch entries differently: the launcher then
    declines."""
    views = [row_view(x, plan.varlen, plan.head_dim) for x in xs]
    if any(view is None for view in views) or len({view[2] for view in views}) > 1:
        return None
    return (*(_descriptor(x, view, block_rows, plan.head_dim) for x, view in zip(xs, views)), views[0][2])


# a work item's start and end (the first product and softmax before its pipeline fills, the masked key tiles, the
# epilogue) cost about as much as this many keys of its pipelined walk: three 128-key tiles
ITEM_START_END_KEYS = 384


def walk_keys(patterns, layout, first_block: int, num_tiles: int, rows: int, kv_len: int) -> torch.Tensor:
    """Keys of the row walk of each query tile of ``rows`` layout rows, per head (``[heads, num_tiles]``, int64, on
    the CPU; ``patterns``: the layout's StridePatterns for the call's heads): the walk ``kernels._row_walk``
    computes, the stripes below the tile's local range and the local range ``[max(0, i0 - L + 1), i1]``, every
    block up to ``i1`` for a dense head."""
    bs, vs = layout.block_size, layout.vert_stride
    r = torch.tensor([patterns.residues[p] for p in patterns.head_to_pattern], dtype=torch.int64)[:, None]
    i0 = first_block + rows * torch.arange(num_tiles, dtype=torch.int64)[None, :]
    i1 = torch.clamp(i0 + rows - 1, max=(kv_len - 1) // bs)
    dense = r < 0
    start = torch.where(dense, 0, torch.clamp(i0 - layout.local_blocks + 1, min=0))
    stripes = torch.where(dense | (start <= r), 0, torch.div(start - 1 - r, vs, rounding_mode="floor") + 1)
    return bs * torch.clamp(stripes + i1 - start + 1, min=0)


def balanced_order(costs: torch.Tensor, ctas: int) -> torch.Tensor:
    """The turn order of ``ctas`` persistent CTAs over work items of the given ``costs`` (CTA ``p`` takes the items
    at positions ``p, p + ctas, ...``). Round robin gives round ``k`` (positions ``k ctas .. k ctas + ctas - 1``) the
    items with those numbers, one each, whatever their lengths; here a round's items go out longest first to the
    CTAs with the least work so far (ties by number), and the CTAs are then numbered so that those with an item in
    the last, partial round come first. The items in flight at one time are still one round of the default order
    (and its K/V in L2), and the CTAs' totals even out. Returns int32 item numbers by position, followed by
    ``ctas`` zeros (each CTA loads its next item one turn ahead)."""
    n = costs.numel()
    rounds = -(-n // ctas)
    load = torch.zeros(ctas, dtype=torch.int64)
    turns = torch.full((rounds, ctas), -1, dtype=torch.int64)
    for k in range(rounds):
        items = torch.arange(k * ctas, min(n, (k + 1) * ctas))
        items = items[torch.sort(costs[items], descending=True, stable=True).indices]
        least = torch.sort(load, stable=True).indices[:items.numel()]
        turns[k, least] = items
        load[least] += costs[items]
    last = turns[-1] >= 0
    numbering = torch.cat([torch.nonzero(last).flatten(), torch.nonzero(~last).flatten()])
    order = turns[:, numbering].flatten()[:n]
    return torch.cat([order, torch.zeros(ctas, dtype=torch.int64)]).to(torch.int32)


def item_costs(patterns, layout, first_block: int, num_tiles: int, rows: int, kv_len: int, batch: int) -> torch.Tensor:
    """The cost of each of a call's work items, in the order of ``_work_item`` (a head's query tiles from the last,
    then the next head, then the next batch entry): its walk's keys (:func:`walk_keys`) and its start and end
    (``ITEM_START_END_KEYS``)."""
    keys = walk_keys(patterns, layout, first_block, num_tiles, rows, kv_len)
    w = torch.arange(num_tiles * keys.shape[0] * batch)
    return keys[(w // num_tiles) % keys.shape[0], num_tiles - 1 - w % num_tiles] + ITEM_START_END_KEYS


@lru_cache(maxsize=64)
def _turn_order(patterns, layout, first_block: int, num_tiles: int, rows: int, kv_len: int, batch: int, ctas: int,
                device) -> torch.Tensor:
    """:func:`balanced_order` of a call's work items (:func:`item_costs`), on ``device``; cached per call shape."""
    costs = item_costs(patterns, layout, first_block, num_tiles, rows, kv_len, batch)
    return balanced_order(costs, ctas).to(device)


def item_grid(plan, meta, persistent: bool, balanced: bool) -> tuple[int, int, Optional[torch.Tensor]]:
    """(work items, CTAs, turn order) of the forward's and the dQ's grids: an item per query tile, head and batch
    entry; one CTA per SM taking items in turn where ``persistent`` (the shared memory holds one CTA per SM), else
    one per item. The turn order is :func:`balanced_order`'s where ``balanced``, else None (round robin), and None
    too without persistent CTAs, where there are no more items than CTAs, and for packed sequences (their lengths
    are on the device)."""
    items = meta.num_tiles * plan.num_heads * plan.batch
    if not persistent:
        return items, items, None
    grid = min(items, _sm_count(plan.device.index))
    if not balanced or plan.varlen or grid == items:
        return items, grid, None
    return items, grid, _turn_order(meta.patterns, plan.layout, meta.first_block, meta.num_tiles,
                                    HopperTiles.block_m // plan.block_size, plan.kv_len, plan.batch, grid, plan.device)


def hopper_forward(plan, tiles: HopperTiles, q, k, v, out, lse, cu, qk_scale) -> bool:
    """Launch the kernel into ``out`` and ``lse``; False (nothing launched) where a tensor has no TMA row view
    (:func:`rows.row_view`: strides, alignment) or K and V lay out their batch entries differently."""
    part = min(plan.block_size, tiles.block_n)  # one TMA copy: a whole block, or a key tile of one block
    rows = row_descriptors((q, ), plan, 64), row_descriptors((k, v), plan, part)
    if None in rows:
        return False
    (q_desc, q_rows_b), (k_desc, v_desc, kv_rows_b) = rows
    meta, residues = plan.metadata(tiles.block_m)
    (_, _, sqh), (_, _, skh), (_, _, svh) = (qkv_strides(x, plan.varlen) for x in (q, k, v))
    sob, sos, soh = qkv_strides(out, plan.varlen)
    # round robin: the balanced turns measured no faster for this kernel (0-1.6 % less time without GQA, 2.5-3.6 % more
    # with GQA 32/8 on an H100; the dQ takes them: hopper_dq's docstring)
    items, grid, _ = item_grid(plan, meta, tiles.persistent, balanced=False)
    return launch_or_fall_back(
        s2_fwd_hopper_kernel, (grid, ), _broken, "forward",
        q_desc, k_desc, v_desc, out, lse, cu, meta.head_to_pattern, residues, sqh, skh, svh, sob, sos, soh,
        *lse_strides(lse, plan.varlen), qk_scale, plan.q_len, plan.kv_len, items, meta.num_tiles,
        plan.num_heads, meta.first_block, plan.group, plan.local_blocks, plan.vert_stride, q_rows_b, kv_rows_b,
        HEAD_DIM=plan.head_dim, BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n, BS=plan.block_size,
        STAGES=tiles.stages, VARLEN=plan.varlen, CONSUMER_REGS=tiles.consumer_regs, num_warps=4,
        maxnreg=tiles.maxnreg)
