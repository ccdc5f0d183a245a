"""Token-row views of the attention tensors, shared by the launchers of both forward kernels: the (batch, seq, head)
strides of q/k/v/out ([B, S, H, D], or packed [T, H, D]) and of lse ([B, H, S] or [H, T]), and the 2-D view over the
token rows that a TMA descriptor reads."""
from __future__ import annotations


def qkv_strides(x, varlen):
    """(batch, seq, head) strides of a [B, S, H, D] or packed [T, H, D] tensor (batch stride 0 when packed)."""
    return (0, x.stride(0), x.stride(1)) if varlen else (x.stride(0), x.stride(1), x.stride(2))


def lse_strides(lse, varlen):
    return (0, lse.stride(0)) if varlen else (lse.stride(0), lse.stride(1))


def row_view(x, varlen, block_d):
    """``(shape, strides, rows per batch entry)`` of the token rows of ``x`` ([B, S, H, D] or packed [T, H, D]) as a
    2-D tensor: row ``b * rows_b + s``, column ``h * stride_h + d``; or None where a TMA copy cannot read it: not
    16-bit, head dim not equal to ``block_d`` (a tile would read the next head), strides or base not 16-byte
    aligned, or batch entries not a whole number of token rows apart."""
    if x.element_size() != 2 or x.shape[-1] != block_d:
        return None
    batch, seq, heads = (1, *x.shape[:2]) if varlen else x.shape[:3]
    sb, ss, sh = qkv_strides(x, varlen)
    # 16-bit elements: 16-byte alignment is a multiple of 8 elements
    if ss <= 0 or ss % 8 or (heads > 1 and sh % 8) or x.data_ptr() % 16:
        return None
    rows_b = 0
    if batch > 1:
        if sb % ss:
            return None
        rows_b = sb // ss
    width = (heads - 1) * sh + block_d if heads > 1 else block_d
    return [(batch - 1) * rows_b + seq, width], [ss, 1], rows_b
