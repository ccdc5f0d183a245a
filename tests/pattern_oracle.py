"""An independent, token-level statement of the S2 pattern (S2_PATTERN.md), written for the tests only.

It deliberately shares no code with s2megatron: loops over heads, explicit formula, float64 math."""
import math

import torch


def pattern_head(global_q_head, total_heads, total_kv_heads, per_kv_head):
    if per_kv_head:
        return global_q_head // (total_heads // total_kv_heads), total_kv_heads
    return global_q_head, total_heads


def token_keep(p, t, g, ht, *, block_size, local_blocks, vert_stride, head_sliding=True, sliding_offset=1,
               num_dense_heads=0):
    """Bool [len(p), len(t)] for pattern head g of ht: may the query at absolute position p see key t?"""
    step = max(1, vert_stride // ht) if head_sliding else 0
    i = (p // block_size)[:, None]
    j = (t // block_size)[None, :]
    causal = t[None, :] <= p[:, None]
    if g >= ht - num_dense_heads:
        return causal
    local = (i - j) < local_blocks
    stripe = ((j + g * step + sliding_offset) % vert_stride) == 0
    return causal & (local | stripe)


def dense_attention(q, k, v, layout_kwargs, *, head_offset=0, total_heads=None, total_kv_heads=None,
                    per_kv_head=False, sm_scale=None):
    """float64 masked softmax attention; q [S, Hq, D], k/v [Skv, Hkv, D] for ONE sequence (queries last S).

    Returns out [S, Hq, D] and lse [Hq, S] (float64)."""
    s, hq, d = q.shape
    skv, hkv = k.shape[0], k.shape[1]
    total_heads = total_heads or hq
    total_kv_heads = total_kv_heads or total_heads // (hq // hkv)
    sm_scale = sm_scale or 1 / math.sqrt(d)
    p = torch.arange(skv - s, skv)
    t = torch.arange(skv)
    outs, lses = [], []
    for h in range(hq):
        g, ht = pattern_head(head_offset + h, total_heads, total_kv_heads, per_kv_head)
        keep = token_keep(p, t, g, ht, **layout_kwargs)
        scores = (q[:, h].double() @ k[:, h // (hq // hkv)].double().T) * sm_scale
        scores = scores.masked_fill(~keep, -math.inf)
        lse = torch.logsumexp(scores, -1)
        outs.append(torch.exp(scores - lse[:, None]) @ v[:, h // (hq // hkv)].double())
        lses.append(lse)
    return torch.stack(outs, 1), torch.stack(lses, 0)
