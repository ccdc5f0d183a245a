"""Triton S2 attention: block-sparse causal flash attention for any S2Layout or BlockMaskLayout.

One forward kernel, a dQ kernel and an atomic-free dK/dV kernel (deterministic); GQA without repeating K/V; packed
varlen; a KV prefix; head dims up to 256; fp16/bf16 (fp32 too). On sm_90 warp-specialised kernels take over where
their docstrings say: the forward of long rows (``hopper_fwd.py``), dQ (``hopper_dq.py``) and dK/dV of long walks
(``hopper_bwd.py``); the same results within rounding, and as deterministic.
On a machine without CUDA the kernels run under the Triton interpreter (``TRITON_INTERPRET=1`` set before this
package is imported).
"""
from __future__ import annotations

from typing import Optional

import torch

from ...sparsity.layout import Layout
from ...triton_runtime import decorated_for_interpreter
from ..checks import check_inputs
from . import kernels as _kernels
from .op import layout_key, s2_attention_op, s2_bwd_op, s2_fwd_op

MAX_HEAD_DIM = 256
DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def triton_s2_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: Layout, *, sm_scale: float,
                        cu_seqlens: Optional[torch.Tensor] = None, max_seqlen: Optional[int] = None,
                        return_lse: bool = False, head_offset: int = 0, total_heads: Optional[int] = None,
                        total_kv_heads: Optional[int] = None):
    """Causal S2 attention with the Triton kernels (differentiable in q, k, v and lse).

    q ``[B, S, Hq, D]``, k/v ``[B, Skv, Hkv, D]`` (Skv >= S: the queries are the last S positions), or packed
    ``[T, H, D]`` with ``cu_seqlens`` int32 ``[N+1]`` on q's device (``max_seqlen``, if given, must bound every
    sequence; without it the packed length T is used as the bound, which launches more, mostly idle, programs).
    dtype float16/bfloat16/float32, head dim 1..256, Hq a multiple of Hkv. Returns out (q's dtype and shape) or
    ``(out, lse)`` with lse float32 ``[B, Hq, S]`` (``[Hq, T]`` packed).

    Raises ValueError on bad shapes, dtypes, devices or head counts (see :func:`s2megatron.ops.s2_attention`).
    """
    if not isinstance(layout, Layout):
        raise ValueError(f"layout must be an S2Layout or BlockMaskLayout, got {type(layout).__name__}")
    shape = check_inputs(q, k, v, cu_seqlens)
    if q.dtype not in DTYPES:
        raise ValueError(f"the Triton S2 kernels take {DTYPES}, got {q.dtype}; use backend='reference' for float64")
    if not 1 <= shape.head_dim <= MAX_HEAD_DIM:
        raise ValueError(f"head dim {shape.head_dim} is not supported by the Triton S2 kernels; "
                         f"valid: 1..{MAX_HEAD_DIM}")
    if q.device.type != "cuda" and not decorated_for_interpreter(_kernels.s2_fwd_kernel):
        raise ValueError(f"the Triton S2 kernels need CUDA tensors (got {q.device}), or TRITON_INTERPRET=1 set before "
                         "triton and s2megatron.ops.triton_s2 are imported, to run them on the CPU")
    if cu_seqlens is not None:
        if cu_seqlens.device != q.device:
            cu_seqlens = cu_seqlens.to(q.device)
        if max_seqlen is None and cu_seqlens.device.type == "cpu":
            max_seqlen = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
        if max_seqlen is not None and not 1 <= max_seqlen <= q.shape[0]:
            raise ValueError(f"max_seqlen={max_seqlen} must lie in 1..T={q.shape[0]}")
    if not torch.compiler.is_compiling():  # under torch.compile the op validates the heads when it runs
        layout.resolve(shape.num_heads, shape.num_kv_heads, head_offset, total_heads, total_kv_heads)
    out, lse = s2_attention_op(q, k, v, cu_seqlens, layout_key(layout), float(sm_scale), int(max_seqlen or 0),
                               int(head_offset), int(total_heads or 0), int(total_kv_heads or 0))
    return (out, lse) if return_lse else out


__all__ = ["triton_s2_attention", "s2_fwd_op", "s2_bwd_op", "MAX_HEAD_DIM"]
