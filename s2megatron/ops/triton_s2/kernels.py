"""Triton kernels of S2 attention: forward, dQ (which also computes Delta for the backward) and dK/dV.

Terms (see ``s2megatron/sparsity/metadata.py``): a *query tile* is ``BLOCK_M = rows_per_tile * BS`` consecutive query
positions starting at absolute block ``first_block + tile * rows_per_tile``; its *row list* holds the kept key blocks
(union over the tile's rows, Merge-Q) and, per entry, the last row of the tile that keeps it (``row_last``); for an
S2Layout the kernels compute that list from the pattern formula instead of loading it (``ANALYTIC``). A *key tile* of
the dK/dV pass is ``BLOCK_N`` consecutive key positions; its query rows come from the column lists (for an S2Layout,
from the formula too).

*Interior* tiles (FAST path: an S2Layout, or a KV-cache-efficient layout in dK/dV, with whole layout blocks per key
tile) are kept by every row of the query tile and lie entirely on one side of the diagonal: they are loaded and
computed without masks and with scalar addressing; only the few boundary tiles (the diagonal, the first local blocks,
the tail past the sequence end) take the masked path.

Positions are absolute within a sequence (a KV prefix of ``past = kv_len - q_len`` tokens precedes the queries; a
packed varlen sequence starts at position 0 and token ``cu_seqlens[b]``). Scores are kept in base 2: ``qk_scale`` is
``sm_scale * log2(e)``, so softmax uses ``exp2`` and lse is converted to natural log on store.

Interior K/V tiles of the forward and dQ (and, when enabled, Q/dO chunks of dK/dV) may be read through TMA tensor
descriptors over the token rows (``DESC``; built by ``op.row_descriptor`` where the tensors allow one), else through
pointers. The query-tile grids are (tiles, heads, batch entries), so neighbouring tiles of one head run together and
share its stripes in L2; dK/dV's grid puts the kv head fastest, so every head's stripe key tiles (the longest runs)
start early, except for long sequences, where one head's key tiles run together to share its Q and dO in L2.

No atomics: dQ is owned by the program of its query tile, dK/dV by the program of its (kv head, key tile), which walks
every query head of its GQA group in a fixed order. Two backward passes are therefore bitwise identical.

Under the CPU interpreter (``UPCAST``) 16-bit tiles are converted to float32 right after loading, because the
interpreter computes bfloat16 on raw bit patterns.
"""
import inspect

import triton
import triton.language as tl

LOG2E = 1.4426950408889634  # host-side value (qk_scale = sm_scale * LOG2E)
_LOG2E = tl.constexpr(LOG2E)
_LN2 = tl.constexpr(0.6931471805599453)

# Lengths and counts change from call to call: do not compile one kernel per divisibility class of each.
_DYNAMIC = ("q_len", "kv_len", "num_tiles", "first_block", "num_key_blocks", "num_rows", "num_kv_heads", "group",
            "local_blocks", "vert_stride", "kv_rows_b", "q_rows_b")


def _jit_dynamic(fn):
    """triton.jit without value specialisation of the length/count arguments that ``fn`` takes."""
    params = inspect.signature(fn).parameters
    return triton.jit(fn, do_not_specialize=[name for name in _DYNAMIC if name in params])


@triton.jit
def _load(ptrs, mask, UPCAST: tl.constexpr):
    x = tl.load(ptrs, mask=mask, other=0.0)
    if UPCAST:
        x = x.to(tl.float32)
    return x


@triton.jit
def _seq_bounds(CU_SEQLENS, b, q_len, kv_len, VARLEN: tl.constexpr):
    """(first token row of the sequence, kv length, KV prefix length) of batch entry / packed sequence b."""
    if VARLEN:
        seq_start = tl.load(CU_SEQLENS + b)
        kv_end = tl.load(CU_SEQLENS + b + 1) - seq_start
        past = kv_end * 0
    else:
        seq_start = b * 0
        kv_end = kv_len + b * 0
        past = kv_len - q_len + b * 0
    return seq_start.to(tl.int64), kv_end, past


@triton.jit
def _row_walk(ROW_PTR, RESIDUES, pat, tile, num_tiles, first_block, kv_end, local_blocks, vert_stride,
              BS: tl.constexpr, ROWS: tl.constexpr, ANALYTIC: tl.constexpr):
    """The kept key blocks of query tile ``tile`` under pattern ``pat``: (count, walk state w0..w3, local width).

    ANALYTIC (S2Layout): the list is the stripes ``r, r+V, ...`` below the local range, then the local range
    ``[max(0, i0-L+1), i1]`` (same as the metadata's row lists), computed instead of loaded, so the key addresses
    of later iterations are known early and the pipeline never waits on an index load. Otherwise the metadata's
    row list ``[row_ptr[tile], row_ptr[tile+1])``."""
    if ANALYTIC:
        r = tl.load(RESIDUES + pat)  # stripe residue, -1 for a dense pattern head
        i0 = first_block + tile * ROWS
        i1 = tl.minimum(i0 + ROWS - 1, (kv_end - 1) // BS)
        dense = r < 0
        local_start = tl.where(dense, 0, tl.maximum(i0 - local_blocks + 1, 0))
        nvert = tl.where(dense | (local_start <= r), 0, (local_start - 1 - r) // vert_stride + 1)
        width = tl.where(dense, 1 << 30, local_blocks)
        return nvert + i1 - local_start + 1, r, nvert, local_start, i0, width
    else:
        start = tl.load(ROW_PTR + pat * (num_tiles + 1) + tile)
        end = tl.load(ROW_PTR + pat * (num_tiles + 1) + tile + 1)
        return end - start, start, 0, 0, 0, 0


@triton.jit
def _last_keeping_row(stripe, j, w3, width, ROWS: tl.constexpr):
    """Last layout row of an S2 query tile (0 .. ROWS - 1, counted from its first block ``w3``) that keeps key block
    ``j``: every row keeps a stripe, a local block is kept by the ``width`` rows from it."""
    return tl.where(stripe, ROWS - 1, tl.minimum(j + width - 1 - w3, ROWS - 1))


@triton.jit
def _row_entry(e, ok, w0, w1, w2, w3, width, vert_stride, ROW_COLS, ROW_LAST,
               ROWS: tl.constexpr, ANALYTIC: tl.constexpr):
    """Entry ``e`` (scalar or vector; ``ok`` false past the end) of a row walk: (key block, last keeping row of the
    tile, -1 where not ok)."""
    if ANALYTIC:
        below = e < w1
        j = tl.where(below, w0 + e * vert_stride, w2 + e - w1)
        # a stripe (also one inside the local range) is kept by every later row; a local block by L rows
        stripe = below | (j % vert_stride == w0)
        return j, tl.where(ok, _last_keeping_row(stripe, j, w3, width, ROWS), -1)
    else:
        j = tl.load(ROW_COLS + w0 + e, mask=ok, other=0)
        return j, tl.load(ROW_LAST + w0 + e, mask=ok, other=-1)


@triton.jit
def _row_key_tile(it, n_ent, w0, w1, w2, w3, width, vert_stride, tile_pos0, ROW_COLS, ROW_LAST, offs_n,
                  BS: tl.constexpr, BLOCK_N: tl.constexpr, ROWS: tl.constexpr, ANALYTIC: tl.constexpr):
    """Key tile ``it`` of a row walk: key positions ``k_pos`` [BLOCK_N] = ``k_pos0 + k_rel`` (scalar base +
    per-key offset, for cheap pointer math), last keeping row per key [BLOCK_N], and whether any score of the tile
    needs masking.

    BS >= BLOCK_N: each kept block is cut into BS // BLOCK_N contiguous tiles. BS < BLOCK_N: BLOCK_N // BS kept blocks
    (not necessarily adjacent) are gathered into one tile; entries past the end get row_last -1 (masked)."""
    if BS >= BLOCK_N:
        SUBS: tl.constexpr = BS // BLOCK_N
        e = it // SUBS
        j, rl = _row_entry(e, e < n_ent, w0, w1, w2, w3, width, vert_stride, ROW_COLS, ROW_LAST, ROWS, ANALYTIC)
        k_pos0 = j * BS + (it % SUBS) * BLOCK_N
        k_rel = offs_n
        k_pos = k_pos0 + offs_n
        row_last = tl.zeros([BLOCK_N], tl.int32) + rl
        # interior tiles (entirely below the tile's first query, kept by every row) skip the mask
        need_mask = (k_pos0 + BLOCK_N - 1 > tile_pos0) | (rl < ROWS - 1)
    else:
        u = it * BLOCK_N + offs_n
        e = u // BS
        j, row_last = _row_entry(e, e < n_ent, w0, w1, w2, w3, width, vert_stride, ROW_COLS, ROW_LAST, ROWS,
                                 ANALYTIC)
        k_pos = j * BS + u % BS
        k_pos0 = it * 0
        k_rel = k_pos.to(tl.int64)
        need_mask = (tl.max(k_pos, 0) > tile_pos0) | (tl.min(row_last, 0) < ROWS - 1)
    return k_pos, k_pos0.to(tl.int64), k_rel, row_last, need_mask


@triton.jit
def _load_rows(ptrs, row_ok, d_ok, EVEN_D: tl.constexpr, UPCAST: tl.constexpr):
    """A [rows, BLOCK_D] tile; ``row_ok`` None means every row is inside the tensor (no row mask), and EVEN_D
    (head dim == BLOCK_D) drops the column mask, so interior tiles load without predicates."""
    if row_ok is None:
        if EVEN_D:
            x = tl.load(ptrs)
        else:
            x = tl.load(ptrs, mask=d_ok[None, :], other=0.0)
    else:
        x = tl.load(ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    if UPCAST:
        x = x.to(tl.float32)
    return x


@triton.jit
def _fwd_step(q, k, v, m_i, l_i, acc, qk_scale, need_mask, k_pos, q_pos, sub_row, row_last, PREC: tl.constexpr):
    """One key tile of the online softmax. ``need_mask`` (runtime, or constexpr False for interior tiles): apply the
    causal and per-row (Merge-Q ``row_last``) mask. m_i is kept in scaled (base-2) units."""
    qk = tl.dot(q, tl.trans(k), input_precision=PREC)  # unscaled
    if need_mask:
        allowed = (k_pos[None, :] <= q_pos[:, None]) & (sub_row[:, None] <= row_last[None, :])
        qk = tl.where(allowed, qk, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with nothing kept yet: avoid inf - inf
    alpha = tl.math.exp2(m_i - m_safe)
    p = tl.math.exp2(qk * qk_scale - m_safe[:, None])  # one FMA per score
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
    return m_new, l_i, acc


@triton.jit
def _dq_step(q, do, k, v, dq, lse2, delta, qk_scale, need_mask, k_pos, q_pos, sub_row, row_last,
             PREC: tl.constexpr):
    """One key tile of dQ: dq += (P * (dP - Delta)) K."""
    qk = tl.dot(q, tl.trans(k), input_precision=PREC)
    p = tl.math.exp2(qk * qk_scale - lse2[:, None])
    if need_mask:
        allowed = (k_pos[None, :] <= q_pos[:, None]) & (sub_row[:, None] <= row_last[None, :])
        p = tl.where(allowed, p, 0.0)
    dp = tl.dot(do, tl.trans(v), input_precision=PREC)
    ds = p * (dp - delta[:, None])
    return tl.dot(ds.to(k.dtype), k, dq, input_precision=PREC)


@triton.jit
def _dkdv_step(k, v, q, do, dk, dv, lse2, delta, qk_scale, need_mask, k_pos, q_pos, hi, first_block,
               BS: tl.constexpr, PREC: tl.constexpr):
    """One query chunk of dK/dV (transposed: keys are rows). ``need_mask``: the causal mask and, when ``hi`` (the
    last keeping query block of each key, relative to ``first_block``) is given, the run mask."""
    qk_t = tl.dot(k, tl.trans(q), input_precision=PREC)  # [BLOCK_N, BLOCK_M]
    p_t = tl.math.exp2(qk_t * qk_scale - lse2[None, :])
    if need_mask:
        allowed = k_pos[:, None] <= q_pos[None, :]
        if hi is not None:
            allowed = allowed & ((q_pos[None, :] // BS - first_block) <= hi[:, None])
        p_t = tl.where(allowed, p_t, 0.0)
    dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=PREC)
    dp_t = tl.dot(v, tl.trans(do), input_precision=PREC)
    ds_t = p_t * (dp_t - delta[None, :])
    dk = tl.dot(ds_t.to(q.dtype), q, dk, input_precision=PREC)
    return dk, dv


@triton.jit
def _col_run(COL_ROWS, RESIDUES, cp, pat, j, ok, first_block, kv_end, local_blocks, vert_stride,
             BS: tl.constexpr, ANALYTIC: tl.constexpr):
    """The run of query blocks keeping key block ``j`` (scalar or vector; ``ok`` false past the keys) under
    pattern ``pat`` of a KV-cache-efficient layout: (any kept, first, last), relative to ``first_block``.
    ANALYTIC (S2Layout): from the formula (a stripe or a dense head keeps j to the last query block, a local block
    for ``local_blocks`` rows), so no column lists exist; otherwise the first and last entries of ``col_rows``."""
    if ANALYTIC:
        r = tl.load(RESIDUES + pat)
        last = (kv_end - 1) // BS
        stripe = (r < 0) | (j % vert_stride == r)
        hi = tl.where(stripe, last, tl.minimum(j + local_blocks - 1, last)) - first_block
        lo = tl.maximum(j, first_block) - first_block
        has = ok & (hi >= lo)
    else:
        cs = tl.load(cp + j, mask=ok, other=0)
        ce = tl.load(cp + j + 1, mask=ok, other=0)
        has = ce > cs
        hi = tl.load(COL_ROWS + ce - 1, mask=has, other=-1)
        lo = tl.load(COL_ROWS + cs, mask=has, other=0)
    return has, lo, hi


@triton.jit
def _col_chunks(COL_ROWS, RESIDUES, cp, pat, k_pos0, first_block, kv_end, past, local_blocks, vert_stride,
                BS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, ANALYTIC: tl.constexpr):
    """The query chunks (``BLOCK_M`` rows) of the key tile at ``k_pos0``, which lies in one layout block
    (``BS >= BLOCK_N``), under pattern ``pat``: (first query position of the run ``q_lo``, chunk count ``n_tot``,
    interior chunks ``[c0, c1)``, last keeping query block ``hi_b`` relative to ``first_block``, -1 if none).
    Interior chunks have every row at or after every key of the tile, inside the queries and inside the run; the
    others (the diagonal chunks before ``c0``, the tail from ``c1``) need the causal, run and query masks."""
    has, lo_b, hi_b = _col_run(COL_ROWS, RESIDUES, cp, pat, k_pos0 // BS, k_pos0 < kv_end, first_block, kv_end,
                               local_blocks, vert_stride, BS, ANALYTIC)
    hi_b = tl.where(has, hi_b, -1)
    lo_b = tl.where(has, lo_b, 0)
    q_lo = (first_block + lo_b) * BS
    q_end = (first_block + hi_b + 1) * BS
    n_tot = tl.where(has, (q_end - q_lo + BLOCK_M - 1) // BLOCK_M, 0)
    k_last = k_pos0 + BLOCK_N - 1
    c0 = tl.minimum((tl.maximum(tl.maximum(k_last, past) - q_lo, 0) + BLOCK_M - 1) // BLOCK_M, n_tot)
    c1 = tl.minimum(tl.maximum((tl.minimum(q_end, kv_end) - q_lo) // BLOCK_M, c0), n_tot)
    return q_lo, n_tot, c0, c1, hi_b


@triton.jit
def _pair_tiles(p, r, kv_end, vert_stride, BS: tl.constexpr, BLOCK_N: tl.constexpr):
    """For the Hopper dK/dV (``hopper_bwd``), whose CTAs hold two key tiles: the first key positions of the two
    ``BLOCK_N``-key tiles of pair ``p`` and whether each exists. Block ``2 * BLOCK_N``: the two halves of layout
    block ``p``. Block ``BLOCK_N``: pairs of the kv head's stripes (residue ``r``; every block of a dense head,
    ``r < 0``) first, then pairs of its other blocks, so that both tiles of a pair have walks of about the same length
    (a stripe runs to the last query block, any other block for ``L`` query blocks)."""
    blocks = (kv_end + BS - 1) // BS
    if BS == 2 * BLOCK_N:
        pos_a = p * BS
        pos_b = pos_a + BLOCK_N
    else:
        dense = (r < 0) | (vert_stride == 1)
        rr = tl.where(r < 0, 0, r)
        n_s = tl.where(dense, blocks, tl.where(rr < blocks, (blocks - rr + vert_stride - 1) // vert_stride, 0))
        p_s = (n_s + 1) // 2
        k = tl.where(p < p_s, 2 * p, 2 * (p - p_s))
        vm1 = tl.maximum(vert_stride - 1, 1)
        # k-th stripe, k-th other block (each group of V blocks holds V - 1 others: all but the stripe r)
        stripe_a = tl.where(dense, k, rr + k * vert_stride)
        stripe_b = tl.where(dense, k + 1, rr + (k + 1) * vert_stride)
        m_a = k % vm1
        m_b = (k + 1) % vm1
        other_a = (k // vm1) * vert_stride + m_a + (m_a >= rr).to(tl.int32)
        other_b = ((k + 1) // vm1) * vert_stride + m_b + (m_b >= rr).to(tl.int32)
        pos_a = tl.where(p < p_s, stripe_a, other_a) * BS
        pos_b = tl.where(p < p_s, stripe_b, other_b) * BS
        # pairs of other blocks end at blocks - n_s others; a pair index past both lists has no tile
        n_o = blocks - n_s
        ok_a = (p < p_s) | (k < n_o)
        ok_b = tl.where(p < p_s, k + 1 < n_s, k + 1 < n_o)
        pos_a = tl.where(ok_a, pos_a, kv_end)
        pos_b = tl.where(ok_b, pos_b, kv_end)
    return pos_a, pos_b, pos_a < kv_end, pos_b < kv_end


@triton.jit
def _fast_split(n_ent, w0, w1, w2, w3, width, ROWS: tl.constexpr):
    """Split an S2 row walk (``_row_walk`` ANALYTIC output) into interior entries, which every row of the tile keeps
    and which lie entirely below it (the stripes, then the local blocks from ``mid_start`` up to the tile), and the
    masked rest: the first ``m1`` local blocks (kept by only some rows) and the diagonal blocks ``i0..i1``.
    Returns (interior count, mid_start, m1, diagonal count)."""
    nvert, local_start, i0 = w1, w2, w3
    i1 = n_ent - nvert + local_start - 1
    m1 = tl.minimum(tl.maximum(i0 + ROWS - width - local_start, 0), i0 - local_start)
    return nvert + i0 - local_start - m1, local_start + m1, m1, i1 - i0 + 1


@triton.jit
def _query_tile(CU_SEQLENS, q_len, kv_len, num_tiles, first_block,
                BS: tl.constexpr, ROWS: tl.constexpr, VARLEN: tl.constexpr):
    """The query tile of this program (axis 0: tiles, latest first, since their rows are the longest; axis 1: query
    head; axis 2: batch entry): (batch entry, query head, tile, first query position of the tile, and
    ``_seq_bounds``). Programs launch in axis-0 order, so the CTAs resident at one time are neighbouring tiles of
    one head: they read the same stripes and overlapping local windows, which then stay in L2 (heads on axis 0
    spread them over every head, whose K/V outgrow L2 from about 32k tokens). The caller returns when the tile
    starts at or past ``kv_end`` (a short packed sequence), and only then derives the int64 batch offset and the kv
    head: derived before that branch, they raise the kernels' register count."""
    tile = num_tiles - 1 - tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2)
    seq_start, kv_end, past = _seq_bounds(CU_SEQLENS, b, q_len, kv_len, VARLEN)
    tile_pos0 = (first_block + tile * ROWS) * BS
    return b, h, tile, tile_pos0, seq_start, kv_end, past


@triton.jit
def _tile_rows(tile_pos0, seq_start, kv_end, past, BLOCK_M: tl.constexpr):
    """Rows of a query tile: (row offsets, query positions, which rows are queries, token row of tile row 0). Row 0
    may precede the queries (a tile starts on a layout block); rows outside the queries are masked on every access."""
    offs_m = tl.arange(0, BLOCK_M)
    q_pos = tile_pos0 + offs_m
    q_ok = (q_pos >= past) & (q_pos < kv_end)
    return offs_m, q_pos, q_ok, seq_start + (tile_pos0 - past).to(tl.int64)


@triton.jit
def _key_tile_split(n_ent, w0, w1, w2, w3, width,
                    BS: tl.constexpr, BLOCK_N: tl.constexpr, ROWS: tl.constexpr, FAST: tl.constexpr):
    """Key tiles of a row walk: (interior count, masked count, mid_start, m1). FAST: the ``_fast_split`` of the walk,
    counted in key tiles (BS // BLOCK_N per entry). Otherwise every key tile of the walk is a masked one (mid_start
    and m1 unused)."""
    if FAST:
        n_in, mid_start, m1, n_diag = _fast_split(n_ent, w0, w1, w2, w3, width, ROWS)
        return n_in * (BS // BLOCK_N), (m1 + n_diag) * (BS // BLOCK_N), mid_start, m1
    elif BS >= BLOCK_N:
        return 0, n_ent * (BS // BLOCK_N), 0, 0
    else:
        return 0, (n_ent + BLOCK_N // BS - 1) // (BLOCK_N // BS), 0, 0


@triton.jit
def _interior_block(e, w0, w1, mid_start, vert_stride):
    """Key block of interior entry ``e`` of a FAST row walk (``_fast_split``): the ``w1`` stripes
    ``w0 + e * vert_stride``, then the local blocks from ``mid_start``."""
    return tl.where(e < w1, w0 + e * vert_stride, mid_start + e - w1)


@triton.jit
def _interior_kv(it, w0, w1, mid_start, vert_stride, k_base, v_base, k_off, v_off, stride_ks, stride_vs, d_ok,
                 K_DESC, V_DESC, row0, k_col, v_col,
                 BS: tl.constexpr, BLOCK_N: tl.constexpr, EVEN_D: tl.constexpr, UPCAST: tl.constexpr,
                 DESC: tl.constexpr):
    """K and V of interior key tile ``it`` (FAST, ``_key_tile_split``): the w1 stripes ``w0 + e * vert_stride``,
    then the local blocks from ``mid_start``. DESC: through the tensor descriptors (``row0`` the token row of key
    position 0 of the sequence, ``k_col``/``v_col`` the kv head's first column); otherwise loaded without masks at
    the scalar offset of the tile (``k_off``/``v_off`` the loop-invariant [BLOCK_N, BLOCK_D] offsets in a tile)."""
    SUBS: tl.constexpr = BS // BLOCK_N
    e = it // SUBS
    j = _interior_block(e, w0, w1, mid_start, vert_stride)
    if DESC:
        row = row0 + j * BS + (it % SUBS) * BLOCK_N
        k = _desc_rows(K_DESC, row, k_col, UPCAST)
        v = _desc_rows(V_DESC, row, v_col, UPCAST)
    else:
        k_pos0 = (j * BS + (it % SUBS) * BLOCK_N).to(tl.int64)
        k = _load_rows(k_base + k_pos0 * stride_ks + k_off, None, d_ok, EVEN_D, UPCAST)
        v = _load_rows(v_base + k_pos0 * stride_vs + v_off, None, d_ok, EVEN_D, UPCAST)
    return k, v


@triton.jit
def _desc_rows(DESC, row, col, UPCAST: tl.constexpr):
    """A [block rows, BLOCK_D] tile of token rows ``row..`` at column ``col`` (a head's first element) through the
    tensor descriptor ``DESC`` (a TMA copy on Hopper and later: no address registers, no predicates)."""
    x = DESC.load([row.to(tl.int32), col])
    if UPCAST:
        x = x.to(tl.float32)
    return x


@triton.jit
def _masked_kv(itm, n_ent, w0, w1, w2, w3, width, m1, vert_stride, tile_pos0, kv_end, ROW_COLS, ROW_LAST,
               k_base, v_base, stride_ks, stride_vs, offs_n, offs_d, d_ok,
               BS: tl.constexpr, BLOCK_N: tl.constexpr, ROWS: tl.constexpr, FAST: tl.constexpr,
               ANALYTIC: tl.constexpr, EVEN_D: tl.constexpr, UPCAST: tl.constexpr):
    """K and V of masked key tile ``itm``, with what its mask needs: (k, v, key positions, last keeping row per key,
    whether any score needs masking). FAST: ``itm`` counts the masked tiles only (the first m1 local blocks, then
    the diagonal blocks) and is mapped to its index in the full walk; otherwise it is that index."""
    if FAST:
        SUBS: tl.constexpr = BS // BLOCK_N
        e = itm // SUBS
        it = (tl.where(e < m1, w1 + e, w1 + w3 - w2 + e - m1)) * SUBS + itm % SUBS
    else:
        it = itm
    k_pos, k_pos0, k_rel, row_last, need_mask = _row_key_tile(
        it, n_ent, w0, w1, w2, w3, width, vert_stride, tile_pos0, ROW_COLS, ROW_LAST, offs_n, BS, BLOCK_N, ROWS,
        ANALYTIC)
    k_ok = k_pos < kv_end
    k = _load_rows(k_base + k_pos0 * stride_ks + k_rel[:, None] * stride_ks + offs_d[None, :], k_ok, d_ok,
                   EVEN_D, UPCAST)
    v = _load_rows(v_base + k_pos0 * stride_vs + k_rel[:, None] * stride_vs + offs_d[None, :], k_ok, d_ok,
                   EVEN_D, UPCAST)
    return k, v, k_pos, row_last, need_mask


@_jit_dynamic
def s2_fwd_kernel(
    Q, K, V, O, LSE, CU_SEQLENS, HEAD_TO_PAT, ROW_PTR, ROW_COLS, ROW_LAST, RESIDUES, K_DESC, V_DESC,
    stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
    stride_ob, stride_os, stride_oh, stride_lb, stride_lh,
    qk_scale, q_len, kv_len, num_tiles, first_block, group, local_blocks, vert_stride, kv_rows_b,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BS: tl.constexpr,
    VARLEN: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr, ANALYTIC: tl.constexpr, DESC: tl.constexpr,
):
    ROWS: tl.constexpr = BLOCK_M // BS
    FAST: tl.constexpr = ANALYTIC and BS >= BLOCK_N  # S2 layout, whole key tiles: interior tiles unmasked
    EVEN_D: tl.constexpr = HEAD_DIM == BLOCK_D
    b, h, tile, tile_pos0, seq_start, kv_end, past = _query_tile(CU_SEQLENS, q_len, kv_len, num_tiles, first_block,
                                                                BS, ROWS, VARLEN)
    if tile_pos0 >= kv_end:
        return
    off_b = b.to(tl.int64)
    kvh = h // group
    offs_m, q_pos, q_ok, row0 = _tile_rows(tile_pos0, seq_start, kv_end, past, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    q = _load(Q + off_b * stride_qb + h * stride_qh + row0 * stride_qs + offs_m[:, None] * stride_qs
              + offs_d[None, :], q_ok[:, None] & d_ok[None, :], UPCAST)
    k_base = K + off_b * stride_kb + kvh * stride_kh + seq_start * stride_ks
    v_base = V + off_b * stride_vb + kvh * stride_vh + seq_start * stride_vs
    n_ent, w0, w1, w2, w3, width = _row_walk(ROW_PTR, RESIDUES, tl.load(HEAD_TO_PAT + h), tile, num_tiles,
                                             first_block, kv_end, local_blocks, vert_stride, BS, ROWS, ANALYTIC)
    n_in, n_masked, mid_start, m1 = _key_tile_split(n_ent, w0, w1, w2, w3, width, BS, BLOCK_N, ROWS, FAST)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    if FAST:  # interior key tiles first: no masks, scalar addressing
        k_off = offs_n[:, None] * stride_ks + offs_d[None, :]
        v_off = offs_n[:, None] * stride_vs + offs_d[None, :]
        kv_row0 = off_b * kv_rows_b + seq_start
        for it in range(0, n_in):
            k, v = _interior_kv(it, w0, w1, mid_start, vert_stride, k_base, v_base, k_off, v_off, stride_ks,
                                stride_vs, d_ok, K_DESC, V_DESC, kv_row0, kvh * stride_kh, kvh * stride_vh, BS,
                                BLOCK_N, EVEN_D, UPCAST, DESC)
            m_i, l_i, acc = _fwd_step(q, k, v, m_i, l_i, acc, qk_scale, False, None, None, None, None, PREC)
    sub_row = offs_m // BS
    for itm in range(0, n_masked):  # then the boundary tiles, masked
        k, v, k_pos, row_last, need_mask = _masked_kv(
            itm, n_ent, w0, w1, w2, w3, width, m1, vert_stride, tile_pos0, kv_end, ROW_COLS, ROW_LAST, k_base, v_base,
            stride_ks, stride_vs, offs_n, offs_d, d_ok, BS, BLOCK_N, ROWS, FAST, ANALYTIC, EVEN_D, UPCAST)
        m_i, l_i, acc = _fwd_step(q, k, v, m_i, l_i, acc, qk_scale, need_mask, k_pos, q_pos, sub_row, row_last,
                                  PREC)

    empty = l_i == 0.0  # only for layouts that keep nothing for a row
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(tl.where(empty, 1.0, l_i))) * _LN2)
    o_ptrs = O + off_b * stride_ob + h * stride_oh + row0 * stride_os + offs_m[:, None] * stride_os + offs_d[None, :]
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=q_ok[:, None] & d_ok[None, :])
    tl.store(LSE + off_b * stride_lb + h * stride_lh + row0 + offs_m, lse, mask=q_ok)


@triton.jit
def _delta(o, do, dlse_ptrs, ok, HAS_DLSE: tl.constexpr):
    """Delta = rowsum(O * dO) - dLSE of a query tile's rows (the lse gradient enters dS = P * (dP - Delta) with a
    minus sign)."""
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    if HAS_DLSE:
        delta -= tl.load(dlse_ptrs, mask=ok, other=0.0)
    return delta


@_jit_dynamic
def s2_bwd_dq_kernel(
    Q, K, V, O, DO, DQ, LSE, DLSE, DELTA, CU_SEQLENS, HEAD_TO_PAT, ROW_PTR, ROW_COLS, ROW_LAST, RESIDUES, K_DESC,
    V_DESC,
    stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
    stride_ob, stride_os, stride_oh, stride_dob, stride_dos, stride_doh, stride_dqb, stride_dqs, stride_dqh,
    stride_lb, stride_lh,
    sm_scale, qk_scale, q_len, kv_len, num_tiles, first_block, group, local_blocks, vert_stride, kv_rows_b,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BS: tl.constexpr,
    VARLEN: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr, ANALYTIC: tl.constexpr, DESC: tl.constexpr,
    HAS_DLSE: tl.constexpr,
):
    """dQ of one query tile, walking its row list (same tiles and metadata as the forward). It first computes the
    tile's Delta (:func:`_delta`) and stores it for the dK/dV kernel, which runs after it: the query tiles cover
    every query row once."""
    ROWS: tl.constexpr = BLOCK_M // BS
    FAST: tl.constexpr = ANALYTIC and BS >= BLOCK_N  # S2 layout, whole key tiles: interior tiles unmasked
    EVEN_D: tl.constexpr = HEAD_DIM == BLOCK_D
    b, h, tile, tile_pos0, seq_start, kv_end, past = _query_tile(CU_SEQLENS, q_len, kv_len, num_tiles, first_block,
                                                                BS, ROWS, VARLEN)
    if tile_pos0 >= kv_end:
        return
    off_b = b.to(tl.int64)
    kvh = h // group
    offs_m, q_pos, q_ok, row0 = _tile_rows(tile_pos0, seq_start, kv_end, past, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    qd_mask = q_ok[:, None] & d_ok[None, :]
    q = _load(Q + off_b * stride_qb + h * stride_qh + row0 * stride_qs + offs_m[:, None] * stride_qs + offs_d[None, :],
              qd_mask, UPCAST)
    do = _load(DO + off_b * stride_dob + h * stride_doh + row0 * stride_dos + offs_m[:, None] * stride_dos
               + offs_d[None, :], qd_mask, UPCAST)
    l_off = off_b * stride_lb + h * stride_lh + row0 + offs_m
    lse2 = tl.load(LSE + l_off, mask=q_ok, other=0.0) * _LOG2E
    o = _load(O + off_b * stride_ob + h * stride_oh + row0 * stride_os + offs_m[:, None] * stride_os + offs_d[None, :],
              qd_mask, UPCAST)
    delta = _delta(o, do, DLSE + l_off, q_ok, HAS_DLSE)
    tl.store(DELTA + l_off, delta, mask=q_ok)
    k_base = K + off_b * stride_kb + kvh * stride_kh + seq_start * stride_ks
    v_base = V + off_b * stride_vb + kvh * stride_vh + seq_start * stride_vs
    n_ent, w0, w1, w2, w3, width = _row_walk(ROW_PTR, RESIDUES, tl.load(HEAD_TO_PAT + h), tile, num_tiles,
                                             first_block, kv_end, local_blocks, vert_stride, BS, ROWS, ANALYTIC)
    n_in, n_masked, mid_start, m1 = _key_tile_split(n_ent, w0, w1, w2, w3, width, BS, BLOCK_N, ROWS, FAST)

    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    if FAST:  # interior key tiles first (see the forward)
        k_off = offs_n[:, None] * stride_ks + offs_d[None, :]
        v_off = offs_n[:, None] * stride_vs + offs_d[None, :]
        kv_row0 = off_b * kv_rows_b + seq_start
        for it in range(0, n_in):
            k, v = _interior_kv(it, w0, w1, mid_start, vert_stride, k_base, v_base, k_off, v_off, stride_ks,
                                stride_vs, d_ok, K_DESC, V_DESC, kv_row0, kvh * stride_kh, kvh * stride_vh, BS,
                                BLOCK_N, EVEN_D, UPCAST, DESC)
            dq = _dq_step(q, do, k, v, dq, lse2, delta, qk_scale, False, None, None, None, None, PREC)
    sub_row = offs_m // BS
    for itm in range(0, n_masked):  # then the boundary tiles, masked
        k, v, k_pos, row_last, need_mask = _masked_kv(
            itm, n_ent, w0, w1, w2, w3, width, m1, vert_stride, tile_pos0, kv_end, ROW_COLS, ROW_LAST, k_base, v_base,
            stride_ks, stride_vs, offs_n, offs_d, d_ok, BS, BLOCK_N, ROWS, FAST, ANALYTIC, EVEN_D, UPCAST)
        dq = _dq_step(q, do, k, v, dq, lse2, delta, qk_scale, need_mask, k_pos, q_pos, sub_row, row_last, PREC)
    dq *= sm_scale
    tl.store(DQ + off_b * stride_dqb + h * stride_dqh + row0 * stride_dqs + offs_m[:, None] * stride_dqs
             + offs_d[None, :], dq.to(DQ.dtype.element_ty), mask=qd_mask)


@_jit_dynamic
def s2_bwd_dkdv_kernel(
    Q, K, V, DO, DK, DV, LSE, DELTA, CU_SEQLENS, HEAD_TO_PAT, COL_PTR, COL_ROWS, RESIDUES, Q_DESC, DO_DESC,
    stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
    stride_dob, stride_dos, stride_doh, stride_dkb, stride_dks, stride_dkh, stride_dvb, stride_dvs, stride_dvh,
    stride_lb, stride_lh,
    sm_scale, qk_scale, q_len, kv_len, num_key_blocks, first_block, num_kv_heads, group, local_blocks, vert_stride,
    q_rows_b,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BS: tl.constexpr, RUN: tl.constexpr,
    VARLEN: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr, ANALYTIC: tl.constexpr, DESC: tl.constexpr,
    HEADS_FASTEST: tl.constexpr,
):
    """dK/dV of one key tile of one kv head, summed over the query heads of its GQA group in order.

    RUN (KV-cache-efficient layouts): the query blocks keeping key block j form one run, so the tile's rows are the
    contiguous range from the earliest run start to the latest run end (``col_rows`` first/last entries); a row of
    query block i reaches key block j only while i <= last(j). Otherwise (any custom layout) BLOCK_N <= BS and the
    key tile walks its block's column list, BLOCK_M <= BS rows at a time."""
    # axis 0: (key tile, kv head); axis 1: batch entry. HEADS_FASTEST: the kv head fastest, so the heavy tiles (a
    # head's stripes, whose runs reach the end of the sequence) of every head start early and the grid ends on short
    # runs. Otherwise the key tiles of one kv head run together and share its Q and dO in L2, which pays once the
    # heads' Q and dO outgrow L2 (long sequences; see config.tile_config)
    if HEADS_FASTEST:
        kvh = tl.program_id(0) % num_kv_heads
        k_pos0 = (tl.program_id(0) // num_kv_heads) * BLOCK_N
    else:
        key_tiles = (kv_len + BLOCK_N - 1) // BLOCK_N
        kvh = tl.program_id(0) // key_tiles
        k_pos0 = (tl.program_id(0) % key_tiles) * BLOCK_N
    b = tl.program_id(1)
    seq_start, kv_end, past = _seq_bounds(CU_SEQLENS, b, q_len, kv_len, VARLEN)
    if k_pos0 >= kv_end:
        return
    off_b = b.to(tl.int64)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    k_pos = k_pos0 + offs_n
    k_ok = k_pos < kv_end
    kd_mask = k_ok[:, None] & d_ok[None, :]
    krow = seq_start + k_pos0.to(tl.int64)
    k = _load(K + off_b * stride_kb + kvh * stride_kh + krow * stride_ks + offs_n[:, None] * stride_ks
              + offs_d[None, :], kd_mask, UPCAST)
    v = _load(V + off_b * stride_vb + kvh * stride_vh + krow * stride_vs + offs_n[:, None] * stride_vs
              + offs_d[None, :], kd_mask, UPCAST)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    k_last = k_pos0 + BLOCK_N - 1
    j_col = k_pos // BS
    jc_ok = j_col < num_key_blocks

    FAST: tl.constexpr = RUN and BS >= BLOCK_N  # one layout block per key tile: a scalar run, interior unmasked
    EVEN_D: tl.constexpr = HEAD_DIM == BLOCK_D
    q_off = offs_m[:, None] * stride_qs + offs_d[None, :]
    do_off = offs_m[:, None] * stride_dos + offs_d[None, :]
    for g in range(0, group):
        h = kvh * group + g
        pat = tl.load(HEAD_TO_PAT + h)
        cp = COL_PTR + pat * (num_key_blocks + 1)
        qrow0 = seq_start - past.to(tl.int64)  # token row of query position 0
        q_base = Q + off_b * stride_qb + h * stride_qh + qrow0 * stride_qs
        do_base = DO + off_b * stride_dob + h * stride_doh + qrow0 * stride_dos
        l_off = off_b * stride_lb + h * stride_lh + qrow0
        if FAST:
            q_lo, n_tot, c0, c1, hi_b = _col_chunks(COL_ROWS, RESIDUES, cp, pat, k_pos0, first_block, kv_end, past,
                                                    local_blocks, vert_stride, BS, BLOCK_M, BLOCK_N, ANALYTIC)
            q_row0 = off_b * q_rows_b + qrow0
            for c in range(c0, c1):
                r = (q_lo + c * BLOCK_M).to(tl.int64)
                if DESC:
                    q = _desc_rows(Q_DESC, q_row0 + r, h * stride_qh, UPCAST)
                    do = _desc_rows(DO_DESC, q_row0 + r, h * stride_doh, UPCAST)
                else:
                    q = _load_rows(q_base + r * stride_qs + q_off, None, d_ok, EVEN_D, UPCAST)
                    do = _load_rows(do_base + r * stride_dos + do_off, None, d_ok, EVEN_D, UPCAST)
                lse2 = tl.load(LSE + l_off + r + offs_m) * _LOG2E
                delta = tl.load(DELTA + l_off + r + offs_m)
                dk, dv = _dkdv_step(k, v, q, do, dk, dv, lse2, delta, qk_scale, False, None, None, None, 0, BS, PREC)
            n_it = c0 + n_tot - c1  # the masked chunks: the diagonal ones, then the tail past kv_end / the run
            hi = tl.zeros([BLOCK_N], tl.int32) + hi_b
            hi_min = hi_b
        elif RUN:
            has, lo, hi = _col_run(COL_ROWS, RESIDUES, cp, pat, j_col, jc_ok, first_block, kv_end, local_blocks,
                                   vert_stride, BS, ANALYTIC)
            hi = tl.where(has, hi, -1)  # last keeping query block
            lo = tl.where(has, lo, 1 << 30)
            hi_max = tl.max(hi, 0)
            lo_min = tl.minimum(tl.min(lo, 0), hi_max + 1)
            hi_min = tl.min(tl.where(k_ok, hi, hi_max), 0)
            q_lo = (first_block + lo_min) * BS
            n_it = ((hi_max - lo_min + 1) * BS + BLOCK_M - 1) // BLOCK_M
        else:
            j = k_pos0 // BS
            cs = tl.load(cp + j)
            ce = tl.load(cp + j + 1)
            n_it = (ce - cs) * (BS // BLOCK_M)
            hi = tl.zeros([BLOCK_N], tl.int32)
            hi_min = 0
            q_lo = 0
        for it in range(0, n_it):
            if FAST:
                q_pos0 = q_lo + tl.where(it < c0, it, c1 + it - c0) * BLOCK_M
                need_mask = True
            elif RUN:
                q_pos0 = q_lo + it * BLOCK_M
                need_mask = (k_last > q_pos0) | ((q_pos0 + BLOCK_M - 1) // BS - first_block > hi_min)
            else:
                i_rel = tl.load(COL_ROWS + cs + it // (BS // BLOCK_M))
                q_pos0 = (first_block + i_rel) * BS + (it % (BS // BLOCK_M)) * BLOCK_M
                need_mask = k_last > q_pos0
            q_pos = q_pos0 + offs_m
            q_ok = (q_pos >= past) & (q_pos < kv_end)
            r = q_pos0.to(tl.int64)
            q = _load_rows(q_base + r * stride_qs + q_off, q_ok, d_ok, EVEN_D, UPCAST)
            do = _load_rows(do_base + r * stride_dos + do_off, q_ok, d_ok, EVEN_D, UPCAST)
            # rows outside the queries get lse = +inf, hence P = 0: they add nothing
            lse2 = tl.load(LSE + l_off + r + offs_m, mask=q_ok, other=float("inf")) * _LOG2E
            delta = tl.load(DELTA + l_off + r + offs_m, mask=q_ok, other=0.0)
            dk, dv = _dkdv_step(k, v, q, do, dk, dv, lse2, delta, qk_scale, need_mask, k_pos, q_pos,
                                hi if RUN else None, first_block, BS, PREC)
    dk *= sm_scale
    tl.store(DK + off_b * stride_dkb + kvh * stride_dkh + krow * stride_dks + offs_n[:, None] * stride_dks
             + offs_d[None, :], dk.to(DK.dtype.element_ty), mask=kd_mask)
    tl.store(DV + off_b * stride_dvb + kvh * stride_dvh + krow * stride_dvs + offs_n[:, None] * stride_dvs
             + offs_d[None, :], dv.to(DV.dtype.element_ty), mask=kd_mask)
