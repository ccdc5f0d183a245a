"""S2 attention operators: one entry point, a reference beside the fast kernels."""
from __future__ import annotations

import math
from typing import Optional

import torch

from ..sparsity.layout import Layout
from .checks import check_inputs
from .reference import reference_attention
from .sdpa import sdpa_attention

BACKENDS = ("auto", "triton", "reference", "sdpa")


def triton_available() -> bool:
    """True when the Triton kernels can run here (a CUDA device, or the CPU interpreter TRITON_INTERPRET=1)."""
    import os
    try:
        from . import triton_s2  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"


def resolve_backend(backend: str, device: torch.device, *, dense: bool = False, sdpa_ok: bool = False) -> str:
    """The backend that runs: ``auto`` takes SDPA (cuDNN/flash) for dense layers on CUDA where it can (no lse, no
    varlen), the Triton kernels for the rest on CUDA, and the reference elsewhere."""
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is not one of {BACKENDS}")
    if backend != "auto":
        return backend
    if device.type != "cuda":
        return "reference"
    if dense and sdpa_ok:
        return "sdpa"
    return "triton" if triton_available() else "reference"


def s2_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: Layout, *, sm_scale: Optional[float] = None,
                 cu_seqlens: Optional[torch.Tensor] = None, max_seqlen: Optional[int] = None, head_offset: int = 0,
                 total_heads: Optional[int] = None, total_kv_heads: Optional[int] = None, return_lse: bool = False,
                 backend: str = "auto"):
    """Causal attention under a sparsity layout.

    Shapes: q ``[B, S, Hq, D]`` and k/v ``[B, Skv, Hkv, D]`` with ``Skv >= S`` (queries are the last S positions of
    each sequence: a KV prefix), or packed varlen ``[T, H, D]`` with ``cu_seqlens`` (int32 ``[N+1]``; positions
    restart at each sequence; ``max_seqlen`` optional, saves a device->host read). GQA: Hq a multiple of Hkv.
    ``head_offset``/``total_heads``/``total_kv_heads``: global id of local query head 0 and the model's global head
    counts (tensor parallelism); they pick each head's pattern (S2_PATTERN.md).

    Returns out in q's dtype and shape, and with ``return_lse`` also lse float32 ``[B, Hq, S]`` (``[Hq, T]`` varlen);
    lse is differentiable. ``backend``: ``auto`` (on CUDA: SDPA for dense layouts where it applies, Triton
    otherwise; the reference elsewhere), ``triton``, ``reference``, ``sdpa`` (dense layouts only). Raises ValueError
    on bad shapes, dtypes, head counts or cu_seqlens.
    """
    if not isinstance(layout, Layout):
        raise ValueError(f"layout must be an S2Layout or BlockMaskLayout, got {type(layout).__name__}")
    shape = check_inputs(q, k, v, cu_seqlens)
    sm_scale = 1.0 / math.sqrt(shape.head_dim) if sm_scale is None else float(sm_scale)
    name = resolve_backend(backend, q.device, dense=layout.is_dense, sdpa_ok=cu_seqlens is None and not return_lse)
    heads = dict(head_offset=head_offset, total_heads=total_heads, total_kv_heads=total_kv_heads)
    layout.resolve(shape.num_heads, shape.num_kv_heads, **heads)  # validate head counts early, whatever the backend
    if name == "reference":
        out, lse = reference_attention(q, k, v, layout, sm_scale=sm_scale, cu_seqlens=cu_seqlens, **heads)
        return (out, lse) if return_lse else out
    if name == "sdpa":
        if not layout.is_dense:
            raise ValueError(f"backend='sdpa' computes dense causal attention only, but the layout {layout.name} is "
                             "sparse; use backend='triton' or 'reference'")
        return sdpa_attention(q, k, v, sm_scale=sm_scale, cu_seqlens=cu_seqlens, return_lse=return_lse)
    from .triton_s2 import triton_s2_attention
    return triton_s2_attention(q, k, v, layout, sm_scale=sm_scale, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen,
                               return_lse=return_lse, **heads)


__all__ = ["BACKENDS", "s2_attention", "reference_attention", "sdpa_attention", "triton_available"]
