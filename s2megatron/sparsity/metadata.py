"""Kernel metadata: the kept key blocks of every query tile (row lists) and the query blocks of every key
block (column lists), per distinct pattern, in CSR form.

For an :class:`S2Layout` the lists are generated on the target device straight from the pattern formula, in
time and memory proportional to the number of kept blocks (no ``H x NB x NB`` intermediate). A
:class:`BlockMaskLayout` is given as a dense mask already, so its lists come from that mask.

Row lists can cover *tiles* of ``rows_per_tile`` consecutive query blocks (Merge-Q): the tile's list is the union
of its rows' lists, and each entry carries the last row of the tile that keeps it (``row_last``). Together with
the token-level causal mask this is exact for KV-cache-efficient layouts, where the rows of a tile that keep a
key block are a contiguous run starting at the causal bound; for other layouts merging is refused.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Optional

import torch

from .layout import BlockMaskLayout, Layout, S2Layout, query_block_range


@dataclass(frozen=True)
class BlockMetadata:
    """CSR lists for one (layout, heads, lengths, device, rows_per_tile).

    ``head_to_pattern`` int32 ``[H]``: pattern of each local query head.
    Rows (query tiles ``t`` covering absolute query blocks ``first_block + t*rows_per_tile ...``):
      ``row_ptr`` int32 ``[P, num_tiles + 1]`` offsets into ``row_cols`` / ``row_last`` (global over patterns);
      ``row_cols`` int32 ``[E]`` kept key blocks in ascending order; ``row_last`` int32 ``[E]`` last row of the tile
      (0-based within the tile) that keeps that key block.
    Columns (key blocks ``j`` in ``0 .. num_key_blocks-1``):
      ``col_ptr`` int32 ``[P, num_key_blocks + 1]``, ``col_rows`` int32 ``[E']`` query blocks (relative to
      ``first_block``) that keep ``j``, ascending.
    """

    block_size: int
    rows_per_tile: int
    first_block: int
    last_block: int
    num_key_blocks: int
    head_to_pattern: torch.Tensor
    row_ptr: torch.Tensor
    row_cols: torch.Tensor
    row_last: torch.Tensor
    col_ptr: torch.Tensor
    col_rows: torch.Tensor

    @property
    def num_tiles(self) -> int:
        return self.row_ptr.shape[1] - 1

    @property
    def num_patterns(self) -> int:
        return self.row_ptr.shape[0]

    @property
    def max_row_len(self) -> int:
        return int((self.row_ptr[:, 1:] - self.row_ptr[:, :-1]).max())

    def kept_blocks(self) -> int:
        """Kept (query block, key block) pairs summed over the local heads."""
        per_pattern = (self.col_ptr[:, -1] - self.col_ptr[:, 0]).long()
        return int(per_pattern[self.head_to_pattern.long()].sum())

    def row_dense(self) -> torch.Tensor:
        """Bool ``[P, num_tiles, num_key_blocks]`` of the row lists (for tests and debugging only)."""
        out = torch.zeros(self.num_patterns * self.num_tiles, self.num_key_blocks, dtype=torch.bool,
                          device=self.row_cols.device)
        counts = (self.row_ptr[:, 1:] - self.row_ptr[:, :-1]).reshape(-1).long()
        seg = torch.repeat_interleave(torch.arange(counts.numel(), device=counts.device), counts)
        out[seg, self.row_cols.long()] = True
        return out.view(self.num_patterns, self.num_tiles, self.num_key_blocks)


def _progressions(lens: torch.Tensor, base: torch.Tensor, stride: torch.Tensor):
    """Concatenate arithmetic progressions ``base[s] + stride[s] * k, k < lens[s]`` (int64 inputs, one per
    segment) into one int32 tensor with a few streaming passes (scatter at segment starts + two prefix sums)
    instead of per-entry gathers. Returns (ptr [n+1] int64 offsets, values int32)."""
    ptr = torch.zeros(lens.numel() + 1, dtype=torch.int64, device=lens.device)
    torch.cumsum(lens, 0, out=ptr[1:])
    total = int(ptr[-1])  # one host read at build time; metadata is cached, so forward/backward never sync
    nonempty = lens > 0
    starts, first_vals = ptr[:-1][nonempty], base[nonempty]
    seg_stride, seg_lens = stride[nonempty], lens[nonempty]
    # the per-entry stride is piecewise constant: a prefix sum of its jumps at segment starts
    # (one buffer, prefix sums in place: these lists reach 10^8 entries at 1M tokens)
    buf = torch.zeros(total, dtype=torch.int32, device=lens.device)
    if bool((stride == 1).all()):
        buf.fill_(1)
    else:
        buf[starts] = torch.diff(seg_stride, prepend=seg_stride.new_zeros(1)).to(torch.int32)
        torch.cumsum(buf, 0, out=buf)
    # at each segment start, jump from the previous segment's last value to this segment's base
    prev_last = torch.cat([first_vals.new_zeros(1), (first_vals + seg_stride * (seg_lens - 1))[:-1]])
    buf[starts] = (first_vals - prev_last).to(torch.int32)
    torch.cumsum(buf, 0, out=buf)
    return ptr, buf


def _stride_rows(lay: S2Layout, residues, first, last, m, device):
    """Row lists of the tiles for each stripe residue (-1 = dense), from the formula.

    Each tile's list is two progressions: the stripes below its local range (r, r+V, ...) and the local range
    ``[max(0, i0-L+1), i1]`` (a dense pattern: just ``[0, i1]``)."""
    P, V, L = len(residues), lay.vert_stride, lay.local_blocks
    r = torch.tensor(residues, dtype=torch.int64, device=device)[:, None]           # [P, 1]
    dense = r < 0
    num_tiles = (last - first) // m + 1
    i0 = first + m * torch.arange(num_tiles, dtype=torch.int64, device=device)[None, :]  # [1, T]
    i1 = torch.clamp(i0 + m - 1, max=last)
    local_start = torch.where(dense, torch.zeros_like(i0), torch.clamp(i0 - L + 1, min=0))     # [P, T]
    nvert = torch.where(dense | (local_start <= r), torch.zeros_like(local_start),
                        torch.div(local_start - 1 - r, V, rounding_mode="floor") + 1)
    nlocal = (i1 - local_start + 1).expand(P, -1)
    lens = torch.stack([nvert, nlocal], -1).reshape(-1)
    base = torch.stack([r.clamp(min=0).expand(P, num_tiles), local_start], -1).reshape(-1)
    stride = torch.stack([torch.full_like(nvert, V), torch.ones_like(nvert)], -1).reshape(-1)
    ptr, cols = _progressions(lens, base, stride)
    tile_ptr = ptr[:-1:2].view(P, num_tiles)
    if m == 1:  # one row per tile: every kept block is kept by row 0
        return tile_ptr, ptr[-1], cols, torch.zeros(cols.shape, dtype=torch.int32, device=device)
    counts = (nvert + nlocal).reshape(-1)
    seg_i0 = torch.repeat_interleave(i0.expand(P, -1).reshape(-1), counts)
    seg_i1 = torch.repeat_interleave(i1.expand(P, -1).reshape(-1), counts)
    seg_r = torch.repeat_interleave(r.reshape(-1), counts.view(P, -1).sum(1))
    j = cols.long()
    stripe = (seg_r < 0) | (torch.remainder(j, V) == seg_r)
    last_row = torch.where(stripe, seg_i1, torch.clamp(j + L - 1, max=seg_i1)) - seg_i0
    return tile_ptr, ptr[-1], cols, last_row


def _stride_cols(lay: S2Layout, residues, first, last, nk, device):
    """Column lists: the rows keeping key block j are one run ``[max(j, first), hi_j]`` (KV-cache efficiency)."""
    r = torch.tensor(residues, dtype=torch.int64, device=device)[:, None]
    j = torch.arange(nk, dtype=torch.int64, device=device)[None, :]
    lo = torch.clamp(j, min=first)
    stripe = (r < 0) | (torch.remainder(j, lay.vert_stride) == r)
    hi = torch.where(stripe, torch.full_like(lo, last), torch.clamp(j + lay.local_blocks - 1, max=last))
    lens = torch.clamp(hi - lo + 1, min=0).reshape(-1)
    ptr, rows = _progressions(lens, (lo - first).expand(len(residues), -1).reshape(-1), torch.ones_like(lens))
    return ptr[:-1].view(len(residues), nk), ptr[-1], rows


def _mask_rows(masks: torch.Tensor, first, last, m, nk):
    """Row lists from dense pattern masks [P, NB, NB] (BlockMaskLayout)."""
    P = masks.shape[0]
    rows = masks[:, first:last + 1, :nk]
    num_tiles = (last - first) // m + 1
    pad = num_tiles * m - rows.shape[1]
    rows = torch.nn.functional.pad(rows, (0, 0, 0, pad))
    tiles = rows.view(P, num_tiles, m, nk)
    union = tiles.any(dim=2)
    sub = torch.arange(m, device=masks.device)[None, None, :, None]
    last_row = torch.where(tiles, sub, torch.full_like(sub, -1)).amax(dim=2)
    counts = union.sum(-1).reshape(-1)
    ptr = torch.zeros(counts.numel() + 1, dtype=torch.int64, device=masks.device)
    torch.cumsum(counts, 0, out=ptr[1:])
    nz = union.reshape(-1, nk).nonzero()
    return ptr[:-1].view(P, num_tiles), ptr[-1], nz[:, 1], last_row.reshape(-1, nk)[nz[:, 0], nz[:, 1]]


def _mask_cols(masks: torch.Tensor, first, last, nk):
    P = masks.shape[0]
    cols = masks[:, first:last + 1, :nk].transpose(1, 2)  # [P, nk, NQ]
    counts = cols.sum(-1).reshape(-1)
    ptr = torch.zeros(counts.numel() + 1, dtype=torch.int64, device=masks.device)
    torch.cumsum(counts, 0, out=ptr[1:])
    nz = cols.reshape(-1, cols.shape[-1]).nonzero()
    return ptr[:-1].view(P, nk), ptr[-1], nz[:, 1]


def _with_end(ptr_start: torch.Tensor, total: torch.Tensor) -> torch.Tensor:
    """[P, n] segment starts + grand total -> [P, n+1] with each pattern's end appended."""
    nxt = torch.cat([ptr_start.reshape(-1)[1:], total.reshape(1)])
    return torch.cat([ptr_start, nxt.view(ptr_start.shape)[:, -1:]], dim=1).to(torch.int32)


def tiling(layout: Layout, q_len: int, kv_len: int, rows_per_tile: int = 1) -> tuple:
    """(first query block, last query block, query tiles of ``rows_per_tile`` blocks, key blocks) of a call."""
    first, last = query_block_range(q_len, kv_len, layout.block_size)
    return first, last, (last - first) // rows_per_tile + 1, math.ceil(kv_len / layout.block_size)


def build_metadata(layout: Layout, num_heads: int, q_len: int, kv_len: Optional[int] = None, *,
                   num_kv_heads=None, head_offset: int = 0, total_heads=None, total_kv_heads=None,
                   device=None, rows_per_tile: int = 1) -> BlockMetadata:
    """Build (uncached) kernel metadata; see :class:`BlockMetadata`. Raises ValueError for bad heads/lengths,
    and for ``rows_per_tile > 1`` on a layout that is not KV-cache efficient (merging would change the mask)."""
    kv_len = q_len if kv_len is None else kv_len
    if rows_per_tile < 1:
        raise ValueError(f"rows_per_tile must be >= 1, got {rows_per_tile}")
    if rows_per_tile > 1 and not layout.is_kv_cache_efficient():
        raise ValueError("this layout is not KV-cache efficient, so merging query blocks (rows_per_tile="
                         f"{rows_per_tile}) would change its mask; use rows_per_tile=1")
    device = torch.device("cpu") if device is None else torch.device(device)
    heads = layout.resolve(num_heads, num_kv_heads, head_offset, total_heads, total_kv_heads)
    patterns = layout.head_patterns(heads, device)
    first, last, _, nk = tiling(layout, q_len, kv_len, rows_per_tile)
    if isinstance(layout, S2Layout):
        rstart, rtotal, cols, row_last = _stride_rows(layout, patterns.residues, first, last, rows_per_tile, device)
        cstart, ctotal, rows = _stride_cols(layout, patterns.residues, first, last, nk, device)
    elif isinstance(layout, BlockMaskLayout):
        masks = patterns.pattern_mask(0, last, nk)
        rstart, rtotal, cols, row_last = _mask_rows(masks, first, last, rows_per_tile, nk)
        cstart, ctotal, rows = _mask_cols(masks, first, last, nk)
    else:
        raise ValueError(f"unsupported layout type {type(layout).__name__}")
    if max(int(rtotal), int(ctotal)) >= 2**31:
        raise ValueError(f"{int(rtotal)} kept blocks exceed the int32 metadata range; use a larger block_size")
    return BlockMetadata(
        block_size=layout.block_size, rows_per_tile=rows_per_tile, first_block=first, last_block=last,
        num_key_blocks=nk, head_to_pattern=torch.tensor(patterns.head_to_pattern, dtype=torch.int32, device=device),
        row_ptr=_with_end(rstart, rtotal), row_cols=cols.to(torch.int32), row_last=row_last.to(torch.int32),
        col_ptr=_with_end(cstart, ctotal), col_rows=rows.to(torch.int32))


@lru_cache(maxsize=64)
def _cached(layout, num_heads, q_len, kv_len, num_kv_heads, head_offset, total_heads, total_kv_heads, device,
            rows_per_tile):
    return build_metadata(layout, num_heads, q_len, kv_len, num_kv_heads=num_kv_heads, head_offset=head_offset,
                          total_heads=total_heads, total_kv_heads=total_kv_heads, device=device,
                          rows_per_tile=rows_per_tile)


def get_metadata(layout: Layout, num_heads: int, q_len: int, kv_len: Optional[int] = None, *, num_kv_heads=None,
                 head_offset: int = 0, total_heads=None, total_kv_heads=None, device=None,
                 rows_per_tile: int = 1) -> BlockMetadata:
    """:func:`build_metadata`, cached per (layout, lengths, heads, device, rows_per_tile)."""
    kv_len = q_len if kv_len is None else kv_len
    device = torch.device("cpu") if device is None else torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return _cached(layout, num_heads, q_len, kv_len, num_kv_heads, head_offset, total_heads, total_kv_heads,
                   device, rows_per_tile)
