"""Reference S2 attention in plain PyTorch: exact, differentiable, CPU-friendly.

It gathers, for every query block, only the key blocks its row list keeps (padded to the longest row of the
pattern), so memory grows with the kept blocks, not with S^2. It is the oracle for the Triton kernels and the
attention of the model's CPU path. Math runs in float32 (float64 for float64 inputs).
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from ..sparsity.layout import Layout
from ..sparsity.metadata import BlockMetadata, get_metadata


def _padded_rows(meta: BlockMetadata, pattern: int):
    """Row lists of one pattern as a padded index [NQ, W] (pad -> 0) and its validity mask."""
    ptr = meta.row_ptr[pattern].long()
    counts = ptr[1:] - ptr[:-1]
    width = int(counts.max())
    k = torch.arange(width, device=ptr.device)
    valid = k[None, :] < counts[:, None]
    idx = torch.where(valid, ptr[:-1, None] + k[None, :], torch.zeros_like(valid, dtype=torch.long))
    return meta.row_cols.long()[idx].masked_fill(~valid, 0), valid


def _to_blocks(x: torch.Tensor, start: int, num_blocks: int, block: int) -> torch.Tensor:
    """[B, S, H, D] whose first token sits at absolute position ``start`` -> [B, H, num_blocks, block, D]."""
    b, s, h, d = x.shape
    x = torch.nn.functional.pad(x, (0, 0, 0, 0, start, num_blocks * block - start - s))
    return x.view(b, num_blocks, block, h, d).permute(0, 3, 1, 2, 4)


def reference_attention_dense_batch(q, k, v, layout: Layout, sm_scale: float, head_offset: int, total_heads,
                                    total_kv_heads):
    """Batched path: q [B, S, Hq, D], k/v [B, Skv, Hkv, D] -> (out [B, S, Hq, D], lse [B, Hq, S] float32)."""
    bsz, s_q, hq, d = q.shape
    s_kv, hkv = k.shape[1], k.shape[2]
    bs = layout.block_size
    meta = get_metadata(layout, hq, s_q, s_kv, num_kv_heads=hkv, head_offset=head_offset, total_heads=total_heads,
                        total_kv_heads=total_kv_heads, device=q.device)
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    past = s_kv - s_q
    first, nq, nk = meta.first_block, meta.num_tiles, meta.num_key_blocks
    qb = _to_blocks(q.to(compute), past - first * bs, nq, bs)        # [B, Hq, NQ, bs, D]
    kb = _to_blocks(k.to(compute), 0, nk, bs)                         # [B, Hkv, NK, bs, D]
    vb = _to_blocks(v.to(compute), 0, nk, bs)
    q_pos = (first + torch.arange(nq, device=q.device))[:, None] * bs + torch.arange(bs, device=q.device)  # [NQ, bs]
    group = hq // hkv
    outs, lses = [], []
    rows_cache = {}
    for h in range(hq):
        p = int(meta.head_to_pattern[h])
        if p not in rows_cache:
            rows_cache[p] = _padded_rows(meta, p)
        cols, valid = rows_cache[p]                                    # [NQ, W]
        kh = kb[:, h // group][:, cols]                                # [B, NQ, W, bs, D]
        vh = vb[:, h // group][:, cols]
        scores = torch.einsum("bqid,bqwjd->bqiwj", qb[:, h], kh) * sm_scale   # [B, NQ, bs, W, bs]
        k_pos = cols[:, :, None] * bs + torch.arange(bs, device=q.device)       # [NQ, W, bs]
        allowed = valid[:, None, :, None] & (k_pos[:, None] <= q_pos[:, :, None, None]) & (k_pos[:, None] < s_kv)
        scores = scores.masked_fill(~allowed, float("-inf"))
        flat = scores.flatten(-2)                                      # [B, NQ, bs, W*bs]
        lse = torch.logsumexp(flat, dim=-1)                            # [B, NQ, bs]
        prob = torch.exp(flat - lse[..., None]).view_as(scores)
        out = torch.einsum("bqiwj,bqwjd->bqid", prob, vh)             # [B, NQ, bs, D]
        start = past - first * bs
        outs.append(out.reshape(bsz, nq * bs, d)[:, start:start + s_q])
        lses.append(lse.reshape(bsz, nq * bs)[:, start:start + s_q])
    out = torch.stack(outs, dim=2).to(q.dtype)                         # [B, S, Hq, D]
    return out, torch.stack(lses, dim=1).float()                       # [B, Hq, S]


def reference_attention(q, k, v, layout: Layout, *, sm_scale: Optional[float] = None, cu_seqlens=None,
                        head_offset: int = 0, total_heads=None, total_kv_heads=None):
    """S2 attention by gathering kept blocks; returns (out, lse) as :func:`s2megatron.ops.s2_attention` does."""
    sm_scale = 1.0 / math.sqrt(q.shape[-1]) if sm_scale is None else sm_scale
    if cu_seqlens is None:
        return reference_attention_dense_batch(q, k, v, layout, sm_scale, head_offset, total_heads, total_kv_heads)
    bounds = cu_seqlens.tolist()
    outs, lses = [], []
    for a, b in zip(bounds[:-1], bounds[1:]):
        o, l = reference_attention_dense_batch(q[None, a:b], k[None, a:b], v[None, a:b], layout, sm_scale,
                                               head_offset, total_heads, total_kv_heads)
        outs.append(o[0])
        lses.append(l[0])
    return torch.cat(outs, 0), torch.cat(lses, 1)                      # [T, Hq, D], [Hq, T]
