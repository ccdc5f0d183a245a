"""Input validation for :func:`s2megatron.ops.s2_attention`: one place that names bad values."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass(frozen=True)
class AttentionShape:
    batch: int
    q_len: int
    kv_len: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    varlen: bool


def check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: Optional[torch.Tensor]) -> AttentionShape:
    """Validate q/k/v (and cu_seqlens) and return their shape; raises ValueError naming the bad value."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in FLOAT_DTYPES:
            raise ValueError(f"{name}.dtype={t.dtype} is not supported; valid: {FLOAT_DTYPES}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    want = 3 if cu_seqlens is not None else 4
    layout_name = "[T, H, D] with cu_seqlens" if cu_seqlens is not None else "[B, S, H, D]"
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != want:
            raise ValueError(f"{name} has shape {tuple(t.shape)}; expected {layout_name}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    hq, hkv, d = q.shape[-2], k.shape[-2], q.shape[-1]
    if k.shape[-1] != d:
        raise ValueError(f"q head dim {d} != k/v head dim {k.shape[-1]}")
    if hkv < 1 or hq % hkv:
        raise ValueError(f"query heads ({hq}) must be a multiple of kv heads ({hkv}) for GQA")
    if cu_seqlens is None:
        if q.shape[0] != k.shape[0]:
            raise ValueError(f"q batch {q.shape[0]} != k/v batch {k.shape[0]}")
        if q.shape[1] < 1 or k.shape[1] < q.shape[1]:
            raise ValueError(f"need 1 <= q_len <= kv_len (queries are the last q_len positions), got q_len="
                             f"{q.shape[1]}, kv_len={k.shape[1]}")
        return AttentionShape(q.shape[0], q.shape[1], k.shape[1], hq, hkv, d, False)
    if k.shape[0] != q.shape[0]:
        raise ValueError(f"varlen q has {q.shape[0]} tokens but k/v have {k.shape[0]}; they must be equal")
    check_cu_seqlens(cu_seqlens, q.shape[0])
    return AttentionShape(cu_seqlens.numel() - 1, q.shape[0], k.shape[0], hq, hkv, d, True)


def check_cu_seqlens(cu_seqlens: torch.Tensor, total_tokens: int) -> None:
    if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dtype != torch.int32 or cu_seqlens.dim() != 1:
        raise ValueError("cu_seqlens must be an int32 tensor [N+1], got "
                         f"{getattr(cu_seqlens, 'dtype', type(cu_seqlens))} {tuple(getattr(cu_seqlens, 'shape', ()))}")
    if cu_seqlens.numel() < 2:
        raise ValueError(f"cu_seqlens must hold at least 2 offsets, got {cu_seqlens.tolist()}")
    host = cu_seqlens.tolist() if cu_seqlens.device.type == "cpu" else None
    if host is None:
        return  # on an accelerator, checking would synchronise; callers building cu_seqlens on the host are checked
    if host[0] != 0:
        raise ValueError(f"cu_seqlens must start at 0, got {host[:4]}...")
    bad = [i for i in range(1, len(host)) if host[i] <= host[i - 1]]
    if bad:
        i = bad[0]
        raise ValueError(f"cu_seqlens must be strictly increasing: cu_seqlens[{i - 1}]={host[i - 1]}, "
                         f"cu_seqlens[{i}]={host[i]}")
    if host[-1] != total_tokens:
        raise ValueError(f"cu_seqlens[-1]={host[-1]} must equal the number of packed tokens T={total_tokens}")
