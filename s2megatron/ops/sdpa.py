"""Dense causal attention through PyTorch SDPA (cuDNN / flash on CUDA): for dense layers and baselines."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def sdpa_attention(q, k, v, *, sm_scale, cu_seqlens=None, return_lse=False):
    """Dense causal attention; q [B, S, Hq, D], k/v [B, Skv, Hkv, D] (queries are the last S positions).

    Returns out [B, S, Hq, D]. Raises ValueError for what SDPA cannot do here (lse, varlen)."""
    if return_lse:
        raise ValueError("backend='sdpa' cannot return lse; use backend='triton' or 'reference'")
    if cu_seqlens is not None:
        raise ValueError("backend='sdpa' does not take packed varlen input (cu_seqlens); use backend='triton'")
    s_q, s_kv = q.shape[1], k.shape[1]
    qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
    gqa = q.shape[2] != k.shape[2]  # SDPA reads the kv heads of a group without repeating them
    if s_q == s_kv:
        out = F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, scale=sm_scale, enable_gqa=gqa)
    else:  # bottom-right aligned causal mask for a KV prefix
        mask = torch.ones(s_q, s_kv, dtype=torch.bool, device=q.device).tril(diagonal=s_kv - s_q)
        out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask, scale=sm_scale, enable_gqa=gqa)
    return out.transpose(1, 2)
