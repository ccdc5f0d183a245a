"""Tile shapes of the S2 kernels, chosen per (layout block size, head dim, Merge-Q allowed).

The layout's block size and the kernel tiles are independent: the forward and dQ query tiles are each a whole number
of layout blocks (Merge-Q; the two may differ) and the key tiles cut or gather layout blocks (see kernels.py). Shapes
were picked on H100/H200 cards for head dim 128 (one warpgroup per 64 query rows; key tiles of 64 keep the score tile
in registers).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from functools import lru_cache

import triton


@dataclass(frozen=True)
class TileConfig:
    fwd_block_m: int        # forward query tile (tokens); a multiple of the layout block size
    block_m: int            # dQ query tile (tokens); a multiple of the layout block size
    block_n: int            # forward key tile
    dq_block_n: int         # dQ key tile
    dkdv_block_n: int       # dK/dV key tile
    dkdv_block_m: int       # dK/dV query chunk
    fwd_warps: int
    fwd_stages: int
    dq_warps: int
    dq_stages: int
    dkdv_warps: int
    dkdv_stages: int
    # interior tiles (K/V of the forward and dQ, Q/dO of dK/dV) loaded through TMA tensor descriptors where the
    # call's tensors allow it (16-bit, head dim == BLOCK_D, 16-byte aligned strides: see op.row_descriptor)
    fwd_tma: bool = True
    dq_tma: bool = True
    dkdv_tma: bool = False
    # Triton dK/dV programs in kv-head-fastest order below this many keys, one head's key tiles together from it on
    # (the Hopper dK/dV has its own order: hopper_bwd.program_order)
    dkdv_heads_fastest_below: int = 65536
    # register limit of the dQ kernel: left to ptxas, it caps the kernel at 128 registers on sm_80 (2.7 KB of
    # spills at head dim 128, against 684 bytes at 255); on sm_90 it compiles to 236-240 registers either way
    dq_maxnreg: int = 255


def block_d(head_dim: int) -> int:
    """Head-dim tile: the next power of two (at least 16, tl.dot's minimum); extra dims are masked."""
    return max(16, triton.next_power_of_2(head_dim))


@lru_cache(maxsize=None)
def tile_config(block_size: int, head_dim: int, merge_q: bool, elem_bytes: int = 2,
                gather_keys: bool = True) -> TileConfig:
    """Tiles for layout block ``block_size`` and ``head_dim``; ``merge_q`` False (a layout that is not
    KV-cache efficient) keeps one layout block per query tile and per dK/dV key tile. ``elem_bytes`` 4 (float32
    inputs) drops software pipelining so the tiles fit in shared memory. ``gather_keys`` False keeps key tiles
    within one layout block (no gathering of small blocks into one key tile): for row lists read from memory,
    whose gathered form computed wrong results on an H200 with software pipelining (triton 3.6).

    Measured on an H200 (L16V16, block 64, 32k, head dim 128; kernel ms, ``bench/attention.py --sweep-configs``):
    forward 64x64 tiles, 4 warps, 3 stages (2.46; 128x64 with 8 warps 2.59, 128-key tiles 3.29, 4 stages 2.69; with
    its own query tile, in a later call, 2.60 against 2.63 ms for 128x64 at 32k, do_bench medians). 64 query rows
    with 4 warps compile to 255 registers without spills and 112 KB of shared memory: two CTAs per SM instead of one.
    dQ 128x64 tiles, 8 warps, 3 stages (2.89; 64 query rows with 4 warps 3.93, 32-key 3.57); dK/dV 64 keys x 32
    queries, 4 warps, 3 stages (4.84; 2 stages 5.92, 16 queries 5.80, 64 queries 6.46, 8 warps 10.1-13.4). A 128-key
    dK/dV tile spans two layout blocks, and when one is a stripe of the head and the other is not, the whole run
    below the stripe is computed for both (10.6 ms). Interior tiles through TMA descriptors (forward and dQ), with
    the query-tile grids in tile-major order (H200, fwd+bwd ms at 8k / 32k / 128k): 1.585 / 10.28 / 101.3 against
    1.654 / 10.56 / 107.1 with pointer loads; descriptors in dK/dV 1.643 / 10.97 / 101.7, so they stay off there.
    The sweep of that version (``bench/results/logs/attention_sweep.log``) kept the other defaults. dK/dV programs
    run kv head fastest below 64k keys and one kv head's key tiles together from there (fwd+bwd ms, kv head fastest
    against key tiles together: 8k 1.643 / 1.691, 32k 10.21 / 10.59, 48k 19.26 / 19.30, 64k 32.87 / 29.97,
    96k 63.89 / 61.21, 128k 104.8 / 101.8; equal within noise from 32k to 64k; ``bench/results/logs/``
    ``attention_sweep_dkdv_order*.log``)."""
    big = block_d(head_dim) > 128
    block_m = max(64 if big else 128, block_size) if merge_q else block_size
    fwd_block_m = max(64, block_size) if merge_q else block_size
    block_n = 32 if big else 64
    if not gather_keys:
        block_n = min(block_n, block_size)
    dkdv_n, dkdv_m = (32, 64) if big else (64, 32)
    if not merge_q:  # the column list walk handles one layout block per key tile / query chunk
        dkdv_n = min(dkdv_n, block_size)
        dkdv_m = min(dkdv_m, block_size)
    warps = lambda rows: 8 if rows >= 128 or big else 4  # noqa: E731 - one warpgroup per 64 query rows
    stages = 1 if elem_bytes > 2 else None
    tma = os.environ.get("S2MEGATRON_TRITON_TMA", "1") != "0"  # "0": pointer loads everywhere (debugging, A/B)
    # dK/dV measured 1-7 % slower with descriptor loads of Q and dO (H200, 32k and 128k), so they stay pointer loads
    return TileConfig(fwd_block_m=fwd_block_m, block_m=block_m, block_n=block_n, dq_block_n=block_n,
                      dkdv_block_n=dkdv_n, dkdv_block_m=dkdv_m, fwd_warps=warps(fwd_block_m),
                      fwd_stages=stages or (2 if big else 3), dq_warps=warps(block_m),
                      dq_stages=stages or (2 if big else 3), dkdv_warps=8 if big else 4,
                      dkdv_stages=stages or (2 if big else 3), fwd_tma=tma, dq_tma=tma, dkdv_tma=False)
