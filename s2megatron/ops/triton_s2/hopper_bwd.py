"""S2 dK/dV on Hopper (sm_90), warp-specialised, written against warpgroup MMA and TMA directly (Gluon).

The Triton dK/dV kernel (``kernels.s2_bwd_dkdv_kernel``) is the largest part of the backward and latency bound on
Hopper (ncu: two warps per scheduler, under 0.5 eligible, the tensor pipe idle half the time, spills). This kernel
keeps its column walk and its ownership (no atomics: a CTA owns dK/dV of its key tiles of one kv head and walks every
query head of the GQA group in order) and splits the work inside the CTA the way the Hopper forward does. A CTA
holds two 64-key tiles, one per consumer warpgroup:

- a producer warp loads K and V of both tiles, then streams the query chunks of the joint walk (64 rows of Q and of
  dO through TMA, their lse and Delta through plain loads) into a ring of ``STAGES`` shared-memory slots (``ready``
  barriers), each slot once both consumers have released it (``empty`` barriers);
- each consumer warpgroup (240 registers per thread) computes, for the chunks its own tile's walk holds, transposed
  (keys are rows): S^T = K Q^T and dP^T = V dO^T, P^T = exp2(S^T - lse), dS^T = P^T (dP^T - Delta), then
  dV += P^T dO and dK += dS^T Q with P^T and dS^T from registers, and releases the other chunks untouched; the warp
  scheduler runs one consumer's elementwise work while the other's products use the tensor cores. Each stores its
  own tile's dK and dV through its tile's K and V buffers, which no product reads any more, and one TMA copy each
  (``hopper_fwd._store_through_smem``).

The stores from the MMA registers before them were four bytes per instruction: under ncu's source counters the
consumers spent 3.5 % of all warp samples at 8k stalled on a full store queue, in a once-per-CTA part of 18 %
(``bench/results/logs/ncu_backward_stalls_H100.md``). Through shared memory and TMA, in one process on one H100 with
the gradients bitwise equal (``logs/backward_epilogue_ab_H100.log``): the kernel 5-10 % faster at 8k, where a CTA's
walk is short, and within the rounds' spread (+-3 %) at 32k, under GQA and at 128k.

Over its interior chunks (no mask) a consumer pipelines its products (``_interior_step``): dV and dK of one chunk are
issued with S^T of the next, and dP^T of the next once dV and dK are done, so that one wait covers what took two
(issuing all four at once holds 224 registers of tiles per thread and spills inside the loop). The masked chunks
run one at a time. Against the unpipelined form, in one process on an H100 (the profiler's kernel time, two calls):
8k 4 %, 16k 7 %, GQA 32/8 at 32k 6-10 %, 128k 2 %, dense 8k 3-4 % less; 32k 2 % less in one call and 3 % more in the
other; gradients bitwise identical (``bench/results/logs/hopper_dkdv_pipelined_ab_H100*.log``).

The two tiles share each chunk's loads, so their walks should coincide (``kernels._pair_tiles``): at block 128 they
are the halves of one layout block (the same walk); at block 64 a kv head's stripes are paired with each other (walks
to the last query block, ``V`` blocks apart) and its other blocks with each other (walks of ``L`` query blocks, one
or two apart). Paired this way, each consumer has a whole walk to itself, and Q and dO are read once per pair.

Each query head's chunks are taken from the last one down (``HopperDkdvTiles.descending``): the CTAs of a head then
start on the same query rows however far apart their key tiles lie. On an H100, with one head's pairs running
together, fwd+bwd measured 3-4 % faster at 128k and 1-3 % for dense layouts at 32k; with the kv head fastest and
under GQA the same as walking up (``bench/results/logs/hopper_dkdv_walk_order_ab_H100.log``).

Program order (:func:`program_order`): below 16k keys the kv head runs fastest, so that every head's stripe pairs
(the longest walks) start at once. From 16k the stripe pairs of every kv head run first, head by head, and then
every kv head's other pairs, head by head: the CTAs resident together then belong to few heads and walk the same
query rows, and no head's stripes start late enough to form a tail (as they do with each head's pairs together in
pair order). On an H100 at 32k that order read 1.6 GB from DRAM against 4.5 GB with the kv head fastest, in the same
kernel time under ncu; fwd+bwd measured the same or up to 6 % faster from 16k to 128k
(``bench/results/logs/hopper_dkdv_program_order_H100.log``). The DRAM traffic is therefore not what limits this
kernel at 32k.

The walk and the masks are the Triton kernel's, from the same helper (``_col_chunks``): the interior chunks (every
query row at or after every key of the tile, inside the run and the queries) unmasked, the diagonal chunks and the
tail with the causal, run and query masks. Query rows outside the sequence get lse = +inf, hence P = 0; key rows past
the sequence (the next sequence's rows, or TMA zero fill) are computed and not stored.

Scope (:func:`hopper_dkdv_tiles`): an S2Layout of block 64 or 128, head dim 64 or 128, bf16/fp16, an sm_90 GPU and
tensors a TMA descriptor can read; everything else takes the Triton kernel, as does every call once this one failed
to compile (Gluon is experimental), with one warning.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from functools import lru_cache
from typing import Optional

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import mbarrier, tma, warpgroup_mma, warpgroup_mma_wait

from .hopper_fwd import (_invalidate_ring, _partition_barrier, _ring_barriers, _store_through_smem, hopper_runnable,
                         launch_or_fall_back, row_descriptors)
from .kernels import _LOG2E, _col_chunks, _pair_tiles, _seq_bounds
from .rows import lse_strides, qkv_strides


@gluon.jit
def _scores(slot, k_smem, v_smem, q_smem, do_smem, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
            s_layout: gl.constexpr):
    """S^T = K Q^T and dP^T = V dO^T of the chunk in ring slot ``slot``, issued together and waited for."""
    zeros = gl.zeros([BLOCK_N, BLOCK_M], gl.float32, s_layout)
    s_tok = warpgroup_mma(k_smem, q_smem.index(slot).permute((1, 0)), zeros, use_acc=False, is_async=True)
    dp_tok = warpgroup_mma(v_smem, do_smem.index(slot).permute((1, 0)), zeros, use_acc=False, is_async=True)
    return warpgroup_mma_wait(0, deps=(s_tok, dp_tok))


@gluon.jit
def _masked_chunk(it, pos, dk, dv, k_smem, v_smem, q_smem, do_smem, lse_smem, delta_smem, ready, empty, qk_scale,
                  k_pos, hi_b, first_block, BS: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
                  STAGES: gl.constexpr, s_layout: gl.constexpr, a_layout: gl.constexpr):
    """Query chunk ``it`` of the walk (ring slot ``it % STAGES``, first query position ``pos``) for one consumer,
    with the causal, run and query masks; its products one after the other."""
    slot = it % STAGES
    col_layout: gl.constexpr = gl.SliceLayout(0, s_layout)
    mbarrier.wait(ready.index(slot), (it // STAGES) & 1)
    q = q_smem.index(slot)
    do = do_smem.index(slot)
    s, dp = _scores(slot, k_smem, v_smem, q_smem, do_smem, BLOCK_M, BLOCK_N, s_layout)
    p = gl.exp2(s * qk_scale - lse_smem.index(slot).load(col_layout)[None, :])
    cols = pos + gl.arange(0, BLOCK_M, layout=col_layout)
    allowed = (k_pos[:, None] <= cols[None, :]) & ((cols[None, :] // BS - first_block) <= hi_b)
    p = gl.where(allowed, p, 0.0)
    ds = p * (dp - delta_smem.index(slot).load(col_layout)[None, :])
    dv_tok = warpgroup_mma(gl.convert_layout(p.to(q.dtype), a_layout), do, dv, is_async=True)
    dk_tok = warpgroup_mma(gl.convert_layout(ds.to(q.dtype), a_layout), q, dk, is_async=True)
    dv, dk = warpgroup_mma_wait(0, deps=(dv_tok, dk_tok))
    mbarrier.arrive(empty.index(slot), count=1)
    return dk, dv


@gluon.jit
def _p_ds(s, dp, slot, lse_smem, delta_smem, qk_scale, dtype: gl.constexpr, s_layout: gl.constexpr,
          a_layout: gl.constexpr):
    """P^T and dS^T of an interior chunk (no mask) from its S^T and dP^T, as the A operands of dV's and dK's
    products."""
    col_layout: gl.constexpr = gl.SliceLayout(0, s_layout)
    p = gl.exp2(s * qk_scale - lse_smem.index(slot).load(col_layout)[None, :])
    ds = p * (dp - delta_smem.index(slot).load(col_layout)[None, :])
    return gl.convert_layout(p.to(dtype), a_layout), gl.convert_layout(ds.to(dtype), a_layout)


@gluon.jit
def _interior_step(cur, p, ds, dk, dv, k_smem, v_smem, q_smem, do_smem, lse_smem, delta_smem, ready, empty, qk_scale,
                   HAS_NEXT: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
                   s_layout: gl.constexpr, a_layout: gl.constexpr):
    """Interior chunk at ring position ``cur`` for one consumer, whose P^T and dS^T are ``p`` and ``ds``: issue
    dV += P^T dO and dK += dS^T Q, and with them S^T of the next chunk (interior too: no mask); once dV and dK are
    done (wait groups complete in order, S^T may still run), release this chunk's slot and issue dP^T of the next
    chunk; then compute the next chunk's P^T and dS^T."""
    slot = cur % STAGES
    dv_tok = warpgroup_mma(p, do_smem.index(slot), dv, is_async=True)
    dk_tok = warpgroup_mma(ds, q_smem.index(slot), dk, is_async=True)
    if HAS_NEXT:
        nxt = (cur + 1) % STAGES
        mbarrier.wait(ready.index(nxt), ((cur + 1) // STAGES) & 1)
        zeros = gl.zeros([BLOCK_N, BLOCK_M], gl.float32, s_layout)
        s_tok = warpgroup_mma(k_smem, q_smem.index(nxt).permute((1, 0)), zeros, use_acc=False, is_async=True)
        dv, dk = warpgroup_mma_wait(1, deps=(dv_tok, dk_tok))
        mbarrier.arrive(empty.index(slot), count=1)
        dp_tok = warpgroup_mma(v_smem, do_smem.index(nxt).permute((1, 0)), zeros, use_acc=False, is_async=True)
        s, dp = warpgroup_mma_wait(0, deps=(s_tok, dp_tok))
        p, ds = _p_ds(s, dp, nxt, lse_smem, delta_smem, qk_scale, q_smem.dtype, s_layout, a_layout)
    else:
        dv, dk = warpgroup_mma_wait(0, deps=(dv_tok, dk_tok))
        mbarrier.arrive(empty.index(slot), count=1)
    return p, ds, dk, dv


@gluon.jit
def _edge_chunk(it, pos, own, q_lo, n_tot, dk, dv, k_smem, v_smem, q_smem, do_smem, lse_smem, delta_smem, ready,
                empty, qk_scale, k_pos, hi_b, first_block, BS: gl.constexpr, BLOCK_M: gl.constexpr,
                BLOCK_N: gl.constexpr, STAGES: gl.constexpr, s_layout: gl.constexpr, a_layout: gl.constexpr):
    """A chunk of the joint walk outside this consumer's interior run: masked if its own walk holds it, else only
    released."""
    c = (pos - q_lo) // BLOCK_M  # q_lo and pos are multiples of BLOCK_M
    if own & (c >= 0) & (c < n_tot):
        dk, dv = _masked_chunk(it, pos, dk, dv, k_smem, v_smem, q_smem, do_smem, lse_smem, delta_smem, ready, empty,
                               qk_scale, k_pos, hi_b, first_block, BS, BLOCK_M, BLOCK_N, STAGES, s_layout, a_layout)
    else:
        mbarrier.wait(ready.index(it % STAGES), (it // STAGES) & 1)
        mbarrier.arrive(empty.index(it % STAGES), count=1)
    return dk, dv


@gluon.jit
def _chunk_pos(lo, n, i, BLOCK_M: gl.constexpr, DESCENDING: gl.constexpr):
    """First query position of the ``i``-th chunk taken of the ``n`` from ``lo``: from the last one down when
    DESCENDING, so that every CTA's walk starts at its head's last query chunk."""
    if DESCENDING:
        return lo + (n - 1 - i) * BLOCK_M
    else:
        return lo + i * BLOCK_M


@gluon.jit
def _union_walk(RESIDUES, pat, pos_a, pos_b, ok_a, ok_b, first_block, kv_end, past, local_blocks, vert_stride,
                BS: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr):
    """The chunks of both tiles' walks under pattern ``pat``: (first query position, chunk count) of the range
    from the earlier start to the later end (a gap between the two runs is walked too, by neither consumer)."""
    lo_a, n_a, c0_a, c1_a, hi_a = _col_chunks(RESIDUES, RESIDUES, RESIDUES, pat, pos_a, first_block, kv_end, past,
                                              local_blocks, vert_stride, BS, BLOCK_M, BLOCK_N, True)
    lo_b, n_b, c0_b, c1_b, hi_b = _col_chunks(RESIDUES, RESIDUES, RESIDUES, pat, pos_b, first_block, kv_end, past,
                                              local_blocks, vert_stride, BS, BLOCK_M, BLOCK_N, True)
    n_a = gl.where(ok_a, n_a, 0)
    n_b = gl.where(ok_b, n_b, 0)
    end_a = lo_a + n_a * BLOCK_M
    end_b = lo_b + n_b * BLOCK_M
    lo = gl.where(n_a == 0, lo_b, gl.where(n_b == 0, lo_a, gl.minimum(lo_a, lo_b)))
    end = gl.where(n_a == 0, end_b, gl.where(n_b == 0, end_a, gl.maximum(end_a, end_b)))
    return lo, gl.where((n_a == 0) & (n_b == 0), 0, (end - lo) // BLOCK_M)


@gluon.jit
def _dkdv_consume(wg: gl.constexpr, k_smem, v_smem, q_smem, do_smem, lse_smem, delta_smem, ready, empty, kv_bar,
                  DK, DV, DK_DESC, DV_DESC, dk_rows_b, HEAD_TO_PAT, RESIDUES, b, kvh, pos_a, pos_b, ok_a, ok_b,
                  seq_start, kv_end, past, stride_dks, stride_dkh, stride_dvs, stride_dvh, sm_scale, qk_scale,
                  first_block, group, local_blocks, vert_stride,
                  HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, BS: gl.constexpr,
                  STAGES: gl.constexpr, DESCENDING: gl.constexpr):
    """Consumer warpgroup ``wg``: dK and dV of tile ``wg`` of the pair over every chunk of the joint walk that its own
    walk holds (interior ones unmasked); the others it only releases."""
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, BLOCK_M, 16])
    acc_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                         instr_shape=[16, HEAD_DIM, 16])
    a_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=acc_layout, k_width=2)
    if wg == 0:
        k_pos0 = pos_a
        mine = ok_a
    else:
        k_pos0 = pos_b
        mine = ok_b
    k_pos = k_pos0 + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, s_layout))
    dk = gl.zeros([BLOCK_N, HEAD_DIM], gl.float32, acc_layout)
    dv = gl.zeros([BLOCK_N, HEAD_DIM], gl.float32, acc_layout)
    k_t = k_smem.index(wg)
    v_t = v_smem.index(wg)
    mbarrier.wait(kv_bar, 0)
    it = 0
    for g in range(0, group):
        h = kvh * group + g
        pat = gl.load(HEAD_TO_PAT + h)
        lo, n = _union_walk(RESIDUES, pat, pos_a, pos_b, ok_a, ok_b, first_block, kv_end, past, local_blocks,
                            vert_stride, BS, BLOCK_M, BLOCK_N)
        q_lo, n_tot, c0, c1, hi_b = _col_chunks(RESIDUES, RESIDUES, RESIDUES, pat, k_pos0, first_block, kv_end,
                                                past, local_blocks, vert_stride, BS, BLOCK_M, BLOCK_N, True)
        # the chunks i_a <= i < i_b of the joint walk are this consumer's interior ones (c0 <= c < c1)
        d = (lo - q_lo) // BLOCK_M
        if DESCENDING:  # chunk i at lo + (n - 1 - i) BLOCK_M: c = d + n - 1 - i
            i_a = d + n - c1
            i_b = d + n - c0
        else:  # c = d + i
            i_a = c0 - d
            i_b = c1 - d
        i_a = gl.where(mine, gl.minimum(gl.maximum(i_a, 0), n), n)
        i_b = gl.where(mine, gl.minimum(gl.maximum(i_b, i_a), n), n)
        for i in range(0, i_a):
            dk, dv = _edge_chunk(it + i, _chunk_pos(lo, n, i, BLOCK_M, DESCENDING), mine, q_lo, n_tot, dk, dv, k_t,
                                 v_t, q_smem, do_smem, lse_smem, delta_smem, ready, empty, qk_scale, k_pos, hi_b,
                                 first_block, BS, BLOCK_M, BLOCK_N, STAGES, s_layout, a_layout)
        if i_b > i_a:  # interior chunks, pipelined: S^T and dP^T of the next chunk with dV and dK of this one
            cur = it + i_a
            mbarrier.wait(ready.index(cur % STAGES), (cur // STAGES) & 1)
            s, dp = _scores(cur % STAGES, k_t, v_t, q_smem, do_smem, BLOCK_M, BLOCK_N, s_layout)
            p, ds = _p_ds(s, dp, cur % STAGES, lse_smem, delta_smem, qk_scale, q_smem.dtype, s_layout, a_layout)
            for i in range(i_a, i_b - 1):
                p, ds, dk, dv = _interior_step(it + i, p, ds, dk, dv, k_t, v_t, q_smem, do_smem, lse_smem,
                                               delta_smem, ready, empty, qk_scale, True, BLOCK_M, BLOCK_N, STAGES,
                                               s_layout, a_layout)
            p, ds, dk, dv = _interior_step(it + i_b - 1, p, ds, dk, dv, k_t, v_t, q_smem, do_smem, lse_smem,
                                           delta_smem, ready, empty, qk_scale, False, BLOCK_M, BLOCK_N, STAGES,
                                           s_layout, a_layout)
        for i in range(i_b, n):
            dk, dv = _edge_chunk(it + i, _chunk_pos(lo, n, i, BLOCK_M, DESCENDING), mine, q_lo, n_tot, dk, dv, k_t,
                                 v_t, q_smem, do_smem, lse_smem, delta_smem, ready, empty, qk_scale, k_pos, hi_b,
                                 first_block, BS, BLOCK_M, BLOCK_N, STAGES, s_layout, a_layout)
        it += n
    if mine:  # through this consumer's K/V buffers, which no product reads any more
        row = b * dk_rows_b + seq_start + k_pos0
        _store_through_smem((dk * sm_scale).to(DK.dtype.element_ty), k_t, DK_DESC, DK, row, kvh * stride_dkh,
                            stride_dks, 0, kv_end - k_pos0)
        _store_through_smem(dv.to(DV.dtype.element_ty), v_t, DV_DESC, DV, row, kvh * stride_dvh, stride_dvs, 0,
                            kv_end - k_pos0)
        tma.store_wait(0)


@gluon.jit
def _dkdv_load(K_DESC, V_DESC, Q_DESC, DO_DESC, LSE, DELTA, k_smem, v_smem, q_smem, do_smem, lse_smem, delta_smem,
               ready, empty, kv_bar, HEAD_TO_PAT, RESIDUES, b, kvh, pos_a, pos_b, ok_a, ok_b, kv_row0, q_row0,
               seq_start, kv_end, past, stride_qh, stride_doh, stride_kh, stride_vh, stride_lb, stride_lh,
               first_block, group, local_blocks, vert_stride,
               BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, BS: gl.constexpr, STAGES: gl.constexpr,
               DESCENDING: gl.constexpr):
    """Producer warp: K and V of both tiles, then every chunk of the joint walk in the consumers' order
    (:func:`_chunk_pos`): Q, dO, lse in base 2 with +inf outside the queries, Delta."""
    mbarrier.expect(kv_bar, 2 * (K_DESC.block_type.nbytes + V_DESC.block_type.nbytes))
    row_a = (kv_row0 + pos_a).to(gl.int32)
    row_b = (kv_row0 + gl.where(ok_b, pos_b, pos_a)).to(gl.int32)
    tma.async_copy_global_to_shared(K_DESC, [row_a, kvh * stride_kh], kv_bar, k_smem.index(0))
    tma.async_copy_global_to_shared(V_DESC, [row_a, kvh * stride_vh], kv_bar, v_smem.index(0))
    tma.async_copy_global_to_shared(K_DESC, [row_b, kvh * stride_kh], kv_bar, k_smem.index(1))
    tma.async_copy_global_to_shared(V_DESC, [row_b, kvh * stride_vh], kv_bar, v_smem.index(1))
    rows: gl.constexpr = gl.BlockedLayout([BLOCK_M // 32], [32], [1], [0])
    offs = gl.arange(0, BLOCK_M, layout=rows)
    it = 0
    for g in range(0, group):
        h = kvh * group + g
        pat = gl.load(HEAD_TO_PAT + h)
        lo, n = _union_walk(RESIDUES, pat, pos_a, pos_b, ok_a, ok_b, first_block, kv_end, past, local_blocks,
                            vert_stride, BS, BLOCK_M, BLOCK_N)
        l_off = b.to(gl.int64) * stride_lb + h * stride_lh + seq_start - past
        for i in range(0, n):
            slot = it % STAGES
            pos = _chunk_pos(lo, n, i, BLOCK_M, DESCENDING)
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
    Q_DESC, K_DESC, V_DESC, DO_DESC, DK, DV, DK_DESC, DV_DESC, LSE, DELTA, CU_SEQLENS, HEAD_TO_PAT, RESIDUES,
    stride_qh, stride_kh, stride_vh, stride_doh, stride_dks, stride_dkh, stride_dvs, stride_dvh, stride_lb, stride_lh,
    sm_scale, qk_scale, q_len, kv_len, first_block, num_kv_heads, num_pairs, lead_pairs, group, local_blocks,
    vert_stride, q_rows_b, kv_rows_b, dk_rows_b,
    HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, BS: gl.constexpr,
    STAGES: gl.constexpr, VARLEN: gl.constexpr, HEADS_FASTEST: gl.constexpr, DESCENDING: gl.constexpr,
    CONSUMER_REGS: gl.constexpr, PRODUCER_REGS: gl.constexpr, num_warps: gl.constexpr,
):
    """dK/dV of a pair of 64-key tiles of one kv head (one per consumer warpgroup, walks of similar length, see
    :func:`_pair_tiles`), summed over the query heads of its GQA group in order; the producer streams the joint walk
    once for both."""
    gl.static_assert(BLOCK_N == 64, "one consumer warpgroup holds the 64 keys of its tile")
    gl.static_assert(num_warps == 4, "the default partition is one consumer warpgroup")
    gl.static_assert(BS == BLOCK_N or BS == 2 * BLOCK_N, "layout blocks of one or two tiles")
    if HEADS_FASTEST:
        kvh = gl.program_id(0) % num_kv_heads
        p = gl.program_id(0) // num_kv_heads
    else:  # one kv head's pairs together: its first lead_pairs pairs, every kv head in turn, then its other pairs
        lead = lead_pairs * num_kv_heads
        if gl.program_id(0) < lead:
            kvh = gl.program_id(0) // lead_pairs
            p = gl.program_id(0) % lead_pairs
        else:
            rest = gl.maximum(num_pairs - lead_pairs, 1)
            kvh = (gl.program_id(0) - lead) // rest
            p = lead_pairs + (gl.program_id(0) - lead) % rest
    b = gl.program_id(1)
    seq_start, kv_end, past = _seq_bounds(CU_SEQLENS, b, q_len, kv_len, VARLEN)
    r = gl.load(RESIDUES + gl.load(HEAD_TO_PAT + kvh * group))  # the pairing follows the group's first head
    pos_a, pos_b, ok_a, ok_b = _pair_tiles(p, r, kv_end, vert_stride, BS, BLOCK_N)
    if ok_a:
        kv_row0 = b * kv_rows_b + seq_start
        q_row0 = b * q_rows_b + seq_start - past  # token row of query position 0
        dtype: gl.constexpr = Q_DESC.dtype
        k_smem = gl.allocate_shared_memory(dtype, [2, BLOCK_N, HEAD_DIM], K_DESC.layout)
        v_smem = gl.allocate_shared_memory(dtype, [2, BLOCK_N, HEAD_DIM], V_DESC.layout)
        q_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_M, HEAD_DIM], Q_DESC.layout)
        do_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_M, HEAD_DIM], DO_DESC.layout)
        vec_layout: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, order=[0])
        lse_smem = gl.allocate_shared_memory(gl.float32, [STAGES, BLOCK_M], vec_layout)
        delta_smem = gl.allocate_shared_memory(gl.float32, [STAGES, BLOCK_M], vec_layout)
        ready, empty = _ring_barriers(STAGES)
        kv_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
        mbarrier.init(kv_bar, count=1)
        gl.warp_specialize([
            (_dkdv_consume, (0, k_smem, v_smem, q_smem, do_smem, lse_smem, delta_smem, ready, empty, kv_bar,
                             DK, DV, DK_DESC, DV_DESC, dk_rows_b, HEAD_TO_PAT, RESIDUES, b, kvh, pos_a, pos_b, ok_a,
                             ok_b, seq_start, kv_end, past, stride_dks, stride_dkh, stride_dvs, stride_dvh, sm_scale,
                             qk_scale, first_block, group, local_blocks, vert_stride,
                             HEAD_DIM, BLOCK_M, BLOCK_N, BS, STAGES, DESCENDING)),
            (_dkdv_consume, (1, k_smem, v_smem, q_smem, do_smem, lse_smem, delta_smem, ready, empty, kv_bar,
                             DK, DV, DK_DESC, DV_DESC, dk_rows_b, HEAD_TO_PAT, RESIDUES, b, kvh, pos_a, pos_b, ok_a,
                             ok_b, seq_start, kv_end, past, stride_dks, stride_dkh, stride_dvs, stride_dvh, sm_scale,
                             qk_scale, first_block, group, local_blocks, vert_stride,
                             HEAD_DIM, BLOCK_M, BLOCK_N, BS, STAGES, DESCENDING)),
            (_dkdv_load, (K_DESC, V_DESC, Q_DESC, DO_DESC, LSE, DELTA, k_smem, v_smem, q_smem, do_smem, lse_smem,
                          delta_smem, ready, empty, kv_bar, HEAD_TO_PAT, RESIDUES, b, kvh, pos_a, pos_b, ok_a, ok_b,
                          kv_row0, q_row0, seq_start, kv_end, past, stride_qh, stride_doh, stride_kh, stride_vh,
                          stride_lb, stride_lh, first_block, group, local_blocks, vert_stride,
                          BLOCK_M, BLOCK_N, BS, STAGES, DESCENDING)),
        ], [4, 1], [CONSUMER_REGS, PRODUCER_REGS])
        _invalidate_ring(ready, empty, STAGES)
        mbarrier.invalidate(kv_bar)


@dataclass(frozen=True)
class HopperDkdvTiles:
    stages: int = 5           # Q/dO ring slots (32 KB each at head dim 128; with K/V of two tiles 227 KB)
    consumer_regs: int = 240  # registers per thread of each consumer warpgroup
    producer_regs: int = 24   # of the producer warp (what it releases is what the consumers take: 4 x 144 = 8 x 72)
    maxnreg: int = 168        # launch limit: 12 warps x 168 registers fill the register file, then redistributed
    block_m: int = 64         # query chunk
    block_n: int = 64         # key tile: one consumer warpgroup's 64 rows (a CTA holds two)
    descending: bool = True   # each query head's chunks from the last one down (module notes); False: up
    stripes_first_from: int = 16384  # keys from which one kv head's pairs run together, stripes first (program_order)


# measured on an H100 (head dim 128, fwd+bwd against the Triton dK/dV): L16V16 at 8k (1162 query rows per key tile)
# 0.97-1.10x over seven runs (the Triton kernel's 8k time varies more: 1.52-1.68 ms, this one's 1.52-1.54), 16k
# (1446) 1.04-1.09x, 24k 1.11-1.14x, 32k 1.13-1.23x, 64k-128k 1.09-1.11x, GQA 32/8 at 32k 1.08-1.10x, L8V8 at block
# 128 1.07-1.14x, dense 8k / 32k 1.07-1.10x (bench/results/hopper_dkdv_*.md); shorter walks were not measured.
# S2MEGATRON_HOPPER_BWD=1 takes this kernel for every call it can run, =0 never
MIN_COL_ROWS = 1024
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
    if mode == "0" or _broken or not plan.merge_q or not hopper_runnable(plan, q):
        return None
    if mode != "1":
        patterns = plan.metadata(plan.cfg.block_m)[0].patterns  # cached per shape
        residues = tuple(patterns.residues[p] for p in patterns.head_to_pattern)
        rows = col_rows(residues, plan.local_blocks, plan.vert_stride, plan.block_size, plan.kv_len)
        if plan.group * rows < MIN_COL_ROWS:
            return None
    return HopperDkdvTiles()


def pair_count(kv_len: int, block_size: int, block_n: int) -> int:
    """CTAs per kv head and sequence: every pair index ``kernels._pair_tiles`` can use (a layout block of two tiles
    is one pair; at one tile per block, stripe and other pairs each round up, so at most ``blocks / 2 + 1``)."""
    blocks = -(-kv_len // block_size)
    return blocks if block_size == 2 * block_n else -(-blocks // 2) + 1


def stripe_pairs(kv_len: int, block_size: int, vert_stride: int) -> int:
    """Pair indices that hold stripes (``kernels._pair_tiles`` at one tile per layout block) for some head: the
    stripes of residue 0, the most any head has, two to a pair."""
    stripes = -(-kv_len // (block_size * vert_stride))  # residue 0: blocks 0, V, 2V, ... below the end
    return -(-stripes // 2)


def program_order(plan, tiles: HopperDkdvTiles) -> tuple[bool, int]:
    """(kv head fastest, lead pairs): the kernel's program order. Below ``tiles.stripes_first_from`` keys the kv
    head runs fastest. From there one kv head's pairs run together, the stripe pairs (the longest walks) of every
    kv head first and then the other pairs, so that no head's stripes start late and form a tail, and the pairs
    resident together belong to few heads and read the same query rows. A dense layout, whose key tiles all walk to
    the end, and block 128, whose pairs do not put the stripes first, run one head's pairs together."""
    if plan.vert_stride == 1:
        return False, 0
    if plan.kv_len < tiles.stripes_first_from:
        return True, 0
    if plan.block_size != tiles.block_n:
        return False, 0
    return False, stripe_pairs(plan.kv_len, plan.block_size, plan.vert_stride)


def hopper_dkdv(plan, tiles: HopperDkdvTiles, q, k, v, dout, dk, dv, lse, delta, cu, sm_scale, qk_scale,
                first_block: int, head_to_pattern, residues) -> bool:
    """Launch the kernel into ``dk`` and ``dv``; False (nothing launched) where a tensor has no TMA row view
    (:func:`rows.row_view`) or Q and dO, K and V lay out their batch entries differently."""
    rows = (row_descriptors((q, dout), plan, tiles.block_m), row_descriptors((k, v), plan, tiles.block_n),
            row_descriptors((dk, dv), plan, tiles.block_n))
    if None in rows:
        return False
    (q_desc, do_desc, q_rows_b), (k_desc, v_desc, kv_rows_b), (dk_desc, dv_desc, dk_rows_b) = rows
    (_, _, sqh), (_, _, sdoh), (_, _, skh), (_, _, svh) = (qkv_strides(x, plan.varlen) for x in (q, dout, k, v))
    pairs = pair_count(plan.kv_len, plan.block_size, tiles.block_n)
    heads_fastest, lead = program_order(plan, tiles)
    return launch_or_fall_back(
        s2_dkdv_hopper_kernel, (pairs * plan.num_kv_heads, plan.batch), _broken, "dK/dV",
        q_desc, k_desc, v_desc, do_desc, dk, dv, dk_desc, dv_desc, lse, delta, cu, head_to_pattern, residues,
        sqh, skh, svh, sdoh, *qkv_strides(dk, plan.varlen)[1:], *qkv_strides(dv, plan.varlen)[1:],
        *lse_strides(lse, plan.varlen), sm_scale, qk_scale, plan.q_len, plan.kv_len, first_block,
        plan.num_kv_heads, pairs, lead, plan.group, plan.local_blocks, plan.vert_stride, q_rows_b, kv_rows_b,
        dk_rows_b, HEAD_DIM=plan.head_dim, BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n, BS=plan.block_size,
        STAGES=tiles.stages, VARLEN=plan.varlen, HEADS_FASTEST=heads_fastest, DESCENDING=tiles.descending,
        CONSUMER_REGS=tiles.consumer_regs, PRODUCER_REGS=tiles.producer_regs, num_warps=4,
        maxnreg=tiles.maxnreg)
