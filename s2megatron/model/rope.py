"""Fused rotary position embedding (RoPE) for Megatron-Core, as Triton kernels.

Megatron-Core applies RoPE unfused when Transformer Engine is absent: cos, sin, two multiplies, a negate, two
concatenations and an add, each a full pass over q and k. Here one kernel pass reads q (or k) once and writes it once:
a program handles a few token rows (every head and rotary channel of one ``(s, b)`` or packed ``t`` position each),
reads that position's float32 cos/sin (tables computed once per frequency tensor, which Megatron shares between
layers and steps), rotates in float32 and rounds once to the output dtype. The backward pass is the transposed
rotation, done by the same kernel.

Rotate-half layout (``rotary_interleaved=False``), with ``half = rot_dim // 2``, ``f`` one row of ``freqs`` and
``c, s = cos(f), sin(f)``::

    y[i]        = x[i] * c[i]               - x[i + half] * s[i]                    (i < half)
    y[i + half] = x[i + half] * c[i + half] + x[i] * s[i + half]
    y[j]        = x[j]                                                              (rot_dim <= j < d)

which is Megatron's ``t * cos(f) + rotate_half(t) * sin(f)``. Its transpose (the gradient) is::

    dx[i]        = dy[i] * c[i]               + dy[i + half] * s[i + half]
    dx[i + half] = dy[i + half] * c[i + half] - dy[i] * s[i]

``c`` and ``s`` are taken from the full ``rot_dim`` row, so frequency rows whose halves differ are handled exactly.

Megatron-Core calls these functions only when ``TransformerConfig.apply_rope_fusion`` is True, and only after
:func:`install_rope_fusion` has put them into ``megatron.core.models.common.embeddings.rope_utils`` (call it before
building that config: its ``__post_init__`` rejects ``apply_rope_fusion`` when no fused function is present).

Devices: CUDA tensors run the Triton kernels; CPU tensors run them under Triton's interpreter when it was on
(``TRITON_INTERPRET=1``) as this module was imported, and otherwise an equivalent PyTorch implementation of the same
float32 math (so CPU training works).
"""
import collections
import weakref
from typing import Optional

import torch
import triton
import triton.language as tl

from ..triton_runtime import launch, runs_triton

__all__ = ["fused_apply_rotary_pos_emb", "fused_apply_rotary_pos_emb_thd", "install_rope_fusion"]

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# elements of one [BLOCK_H, BLOCK_R] half-tile: large enough to cover all heads of a row in one step for common
# shapes (16 heads x 64), small enough to stay in registers
_TILE_ELEMS = 2048
_NUM_WARPS = 4
_ROWS_PER_PROG = 4  # token rows per program: fewer, longer programs


@triton.jit
def _rope_row_kernel(
    X, OUT, COS, SIN, POS,
    num_rows, num_batch, num_heads,
    stride_xs, stride_xb, stride_xh,
    stride_os, stride_ob, stride_oh,
    stride_f,
    HALF: tl.constexpr, ROT_DIM: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_P: tl.constexpr, ROWS_PER_PROG: tl.constexpr,
    HAS_POS: tl.constexpr, BACKWARD: tl.constexpr,
):
    """ROWS_PER_PROG token rows: rotate channels [0, ROT_DIM) of every head, copy channels [ROT_DIM, HEAD_DIM).
    cos/sin come from float32 tables ([positions, ROT_DIM], built once per frequency tensor)."""
    offs_r = tl.arange(0, BLOCK_R)
    r_ok = offs_r < HALF
    for i in range(0, ROWS_PER_PROG):
        row = tl.program_id(0).to(tl.int64) * ROWS_PER_PROG + i
        if row < num_rows:
            s_idx = row // num_batch
            b_idx = row % num_batch
            if HAS_POS:
                pos = tl.load(POS + row).to(tl.int64)
            else:
                pos = s_idx
            x_row = X + s_idx * stride_xs + b_idx * stride_xb
            o_row = OUT + s_idx * stride_os + b_idx * stride_ob
            f_row = pos * stride_f + offs_r
            c_lo = tl.load(COS + f_row, mask=r_ok, other=0.0)[None, :]
            c_hi = tl.load(COS + f_row + HALF, mask=r_ok, other=0.0)[None, :]
            s_lo = tl.load(SIN + f_row, mask=r_ok, other=0.0)[None, :]
            s_hi = tl.load(SIN + f_row + HALF, mask=r_ok, other=0.0)[None, :]
            for h0 in range(0, num_heads, BLOCK_H):
                offs_h = h0 + tl.arange(0, BLOCK_H)
                mask = (offs_h < num_heads)[:, None] & r_ok[None, :]
                x_ptrs = x_row + offs_h[:, None] * stride_xh + offs_r[None, :]
                o_ptrs = o_row + offs_h[:, None] * stride_oh + offs_r[None, :]
                # float32 right after the load: one rounding at the store, and the interpreter computes 16-bit
                # floats on raw bit patterns, so no arithmetic may happen in 16 bits
                x_lo = tl.load(x_ptrs, mask=mask, other=0.0).to(tl.float32)
                x_hi = tl.load(x_ptrs + HALF, mask=mask, other=0.0).to(tl.float32)
                if BACKWARD:
                    y_lo = x_lo * c_lo + x_hi * s_hi
                    y_hi = x_hi * c_hi - x_lo * s_lo
                else:
                    y_lo = x_lo * c_lo - x_hi * s_lo
                    y_hi = x_hi * c_hi + x_lo * s_hi
                tl.store(o_ptrs, y_lo.to(OUT.dtype.element_ty), mask=mask)
                tl.store(o_ptrs + HALF, y_hi.to(OUT.dtype.element_ty), mask=mask)
                if ROT_DIM < HEAD_DIM:
                    offs_p = tl.arange(0, BLOCK_P)
                    p_mask = (offs_h < num_heads)[:, None] & (offs_p < HEAD_DIM - ROT_DIM)[None, :]
                    passed = tl.load(x_row + offs_h[:, None] * stride_xh + ROT_DIM + offs_p[None, :], mask=p_mask)
                    tl.store(o_row + offs_h[:, None] * stride_oh + ROT_DIM + offs_p[None, :], passed, mask=p_mask)


_TABLES: "collections.OrderedDict" = collections.OrderedDict()  # id(freqs) -> (weakref, version, cos, sin)
_MAX_TABLES = 8


def _cos_sin_tables(freqs: torch.Tensor, freqs2d: torch.Tensor):
    """float32 cos/sin of ``freqs2d`` ([rows, rot_dim], contiguous), computed once per frequency tensor: Megatron
    hands every layer (and every step: its rotary embedding is cached) the same ``freqs`` object."""
    key = id(freqs)
    hit = _TABLES.get(key)
    if hit is not None and hit[0]() is freqs and hit[1] == freqs._version:
        _TABLES.move_to_end(key)
        return hit[2], hit[3]
    tables = (torch.cos(freqs2d).contiguous(), torch.sin(freqs2d).contiguous())
    _TABLES[key] = (weakref.ref(freqs), freqs._version, *tables)
    while len(_TABLES) > _MAX_TABLES:
        _TABLES.popitem(last=False)
    return tables


def _use_triton(x: torch.Tensor) -> bool:
    return runs_triton(_rope_row_kernel, x)


def _rotate_triton(x: torch.Tensor, out: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                   positions: Optional[torch.Tensor], backward: bool) -> None:
    s, b, h, d = x.shape
    rot_dim = cos.shape[1]
    half = rot_dim // 2
    block_r = triton.next_power_of_2(half)
    block_h = min(triton.next_power_of_2(h), max(1, _TILE_ELEMS // block_r))
    block_p = triton.next_power_of_2(max(d - rot_dim, 1))
    rows = s * b
    pos = positions if positions is not None else cos  # placeholder pointer, never read without HAS_POS
    args = (x, out, cos, sin, pos, rows, b, h, x.stride(0), x.stride(1), x.stride(2), out.stride(0), out.stride(1),
            out.stride(2), cos.stride(0))
    meta = dict(HALF=half, ROT_DIM=rot_dim, HEAD_DIM=d, BLOCK_H=block_h, BLOCK_R=block_r, BLOCK_P=block_p,
                ROWS_PER_PROG=_ROWS_PER_PROG, HAS_POS=positions is not None, BACKWARD=backward)
    grid = (triton.cdiv(rows, _ROWS_PER_PROG),)
    launch(_rope_row_kernel, grid, x.device, args, meta, _NUM_WARPS)


def _rotate_torch(x: torch.Tensor, out: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                  positions: Optional[torch.Tensor], backward: bool) -> None:
    """The kernel's math in PyTorch (float32, one rounding), for CPU tensors without the interpreter."""
    s, rot_dim = x.shape[0], cos.shape[1]
    half = rot_dim // 2
    c = (cos[:s] if positions is None else cos[positions])[:, None, None, :]  # broadcast over b and heads
    sn = (sin[:s] if positions is None else sin[positions])[:, None, None, :]
    c_lo, c_hi, s_lo, s_hi = c[..., :half], c[..., half:], sn[..., :half], sn[..., half:]
    x_lo, x_hi = x[..., :half].float(), x[..., half:rot_dim].float()
    if backward:
        y_lo, y_hi = x_lo * c_lo + x_hi * s_hi, x_hi * c_hi - x_lo * s_lo
    else:
        y_lo, y_hi = x_lo * c_lo - x_hi * s_lo, x_hi * c_hi + x_lo * s_hi
    out[..., :half] = y_lo
    out[..., half:rot_dim] = y_hi
    out[..., rot_dim:] = x[..., rot_dim:]


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: Optional[torch.Tensor],
            backward: bool, transpose_output_memory: bool = False) -> torch.Tensor:
    """Rotation (or its transpose) of x [s, b, h, d] -> new tensor of the same shape and dtype."""
    if x.stride(-1) != 1:  # the kernel addresses channels contiguously
        x = x.contiguous()
    s, b, h, d = x.shape
    if transpose_output_memory:
        out = torch.empty((b, s, h, d), dtype=x.dtype, device=x.device).transpose(0, 1)
    else:
        out = torch.empty((s, b, h, d), dtype=x.dtype, device=x.device)
    if x.numel() == 0:
        return out
    if _use_triton(x):
        _rotate_triton(x, out, cos, sin, positions, backward)
    else:
        _rotate_torch(x, out, cos, sin, positions, backward)
    return out


class _FusedRoPE(torch.autograd.Function):
    """Differentiable in t only (Megatron's frequencies are fixed buffers)."""

    @staticmethod
    def forward(ctx, t, cos, sin, positions, transpose_output_memory):
        ctx.save_for_backward(cos, sin, positions)
        return _rotate(t, cos, sin, positions, backward=False, transpose_output_memory=transpose_output_memory)

    @staticmethod
    def backward(ctx, grad_out):
        cos, sin, positions = ctx.saved_tensors
        return _rotate(grad_out, cos, sin, positions, backward=True), None, None, None, None


def _check_t_freqs(t: torch.Tensor, freqs: torch.Tensor, name: str, t_rank: int) -> torch.Tensor:
    """Validate t and freqs; return the frequencies as a float32 [rows, rot_dim] view with unit channel stride."""
    if t.dim() != t_rank:
        raise ValueError(f"{name}: t must have {t_rank} dims, got shape {tuple(t.shape)}")
    if t.dtype not in DTYPES:
        raise ValueError(f"{name}: t.dtype {t.dtype} is not supported; use one of {DTYPES}")
    if freqs.dim() != 4 or freqs.shape[1] != 1 or freqs.shape[2] != 1:
        raise ValueError(f"{name}: freqs must have shape [max_len, 1, 1, rot_dim], got {tuple(freqs.shape)}")
    if not freqs.is_floating_point():
        raise ValueError(f"{name}: freqs must be floating point (float32), got {freqs.dtype}")
    if freqs.device != t.device:
        raise ValueError(f"{name}: freqs is on {freqs.device} but t is on {t.device}")
    rot_dim, head_dim = freqs.shape[-1], t.shape[-1]
    if rot_dim <= 0 or rot_dim % 2 or rot_dim > head_dim:
        raise ValueError(f"{name}: rot_dim {rot_dim} (freqs.shape[-1]) must be even, positive and <= head dim "
                         f"{head_dim}")
    freqs2d = freqs[:, 0, 0, :].float()
    if freqs2d.stride(-1) != 1:
        freqs2d = freqs2d.contiguous()
    return freqs2d


def fused_apply_rotary_pos_emb(t: torch.Tensor, freqs: torch.Tensor, transpose_output_memory: bool = False,
                               interleaved: bool = False) -> torch.Tensor:
    """RoPE on ``sbhd`` input; Megatron-Core's ``fused_apply_rotary_pos_emb`` signature.

    Args:
        t: [s, b, h, d], float32 / bfloat16 / float16, any strides (e.g. a slice of a fused QKV output).
        freqs: [s_f, 1, 1, rot_dim] angles (float32), s_f >= s; row i is position i. rot_dim even, <= d;
            channels [rot_dim, d) pass through unchanged.
        transpose_output_memory: lay the output out as [b, s, h, d] in memory (still returned as [s, b, h, d]).
        interleaved: must be False (rotate-half layout only).

    Returns:
        [s, b, h, d] tensor of t's dtype (contiguous unless transpose_output_memory); differentiable in t.

    Raises:
        ValueError: interleaved=True, wrong ranks or dtypes, rot_dim odd / zero / > d, s_f < s, mixed devices.
    """
    if interleaved:
        raise ValueError(f"interleaved={interleaved!r} is not supported; only interleaved=False (rotate-half "
                         "layout) is")
    freqs2d = _check_t_freqs(t, freqs, "fused_apply_rotary_pos_emb", 4)
    if freqs2d.shape[0] < t.shape[0]:
        raise ValueError(f"fused_apply_rotary_pos_emb: freqs has {freqs2d.shape[0]} rows, fewer than the sequence "
                         f"length {t.shape[0]} of t")
    return _FusedRoPE.apply(t, *_cos_sin_tables(freqs, freqs2d), None, bool(transpose_output_memory))


def fused_apply_rotary_pos_emb_thd(t: torch.Tensor, cu_seqlens: torch.Tensor, freqs: torch.Tensor,
                                   cp_size: int = 1, cp_rank: int = 0, interleaved: bool = False) -> torch.Tensor:
    """RoPE on packed ``thd`` input; Megatron-Core's ``fused_apply_rotary_pos_emb_thd`` signature.

    Positions restart at 0 at every sequence start: row r of sequence i (``cu_seqlens[i] <= r < cu_seqlens[i+1]``)
    has position ``r - cu_seqlens[i]``. No device-to-host read is made, so ``cu_seqlens[-1]`` must equal
    ``t.shape[0]`` and every sequence must be no longer than ``max_len`` (not checked).

    Args:
        t: [total_tokens, h, d], float32 / bfloat16 / float16, any strides with unit channel stride preferred.
        cu_seqlens: [n + 1] int32/int64 cumulative sequence lengths, on t's device.
        freqs: [max_len, 1, 1, rot_dim] angles (float32); rot_dim even, <= d.
        cp_size, cp_rank: must be 1 and 0 (no context parallelism).
        interleaved: must be False (rotate-half layout only; newer Megatron-Core versions pass it).

    Returns:
        [total_tokens, h, d] contiguous tensor of t's dtype; differentiable in t.

    Raises:
        ValueError: interleaved=True, cp_size != 1 or cp_rank != 0, wrong ranks or dtypes, rot_dim odd / zero /
            > d, mixed devices.
    """
    if interleaved:
        raise ValueError(f"interleaved={interleaved!r} is not supported; only interleaved=False (rotate-half "
                         "layout) is")
    if cp_size != 1 or cp_rank != 0:
        raise ValueError(f"cp_size={cp_size}, cp_rank={cp_rank} is not supported; only cp_size=1, cp_rank=0 (no "
                         "context parallelism) is")
    freqs2d = _check_t_freqs(t, freqs, "fused_apply_rotary_pos_emb_thd", 3)
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2 or cu_seqlens.is_floating_point():
        raise ValueError(f"fused_apply_rotary_pos_emb_thd: cu_seqlens must be a 1-D integer tensor of n + 1 >= 2 "
                         f"offsets, got shape {tuple(cu_seqlens.shape)} dtype {cu_seqlens.dtype}")
    if cu_seqlens.device != t.device:
        raise ValueError(f"fused_apply_rotary_pos_emb_thd: cu_seqlens is on {cu_seqlens.device} but t is on "
                         f"{t.device}")
    total = t.shape[0]
    cu = cu_seqlens.long()
    # position of every token, on the device: its row minus the start of its sequence (output_size avoids a sync)
    starts = torch.repeat_interleave(cu[:-1], cu[1:] - cu[:-1], output_size=total)
    positions = torch.arange(total, device=t.device) - starts
    return _FusedRoPE.apply(t.unsqueeze(1), *_cos_sin_tables(freqs, freqs2d), positions, False).squeeze(1)


def install_rope_fusion() -> bool:
    """Put these functions into Megatron-Core's ``rope_utils`` where Transformer Engine's are absent.

    Megatron-Core uses them only when ``TransformerConfig.apply_rope_fusion`` is True; call this before building
    such a config (its validation rejects ``apply_rope_fusion`` when no fused function is installed). Idempotent;
    Transformer Engine's functions, when present, stay in place.

    Returns:
        True when both of rope_utils' fused functions are the ones of this module.
    """
    from megatron.core.models.common.embeddings import rope_utils

    if rope_utils.fused_apply_rotary_pos_emb is None:
        rope_utils.fused_apply_rotary_pos_emb = fused_apply_rotary_pos_emb
    if rope_utils.fused_apply_rotary_pos_emb_thd is None:
        rope_utils.fused_apply_rotary_pos_emb_thd = fused_apply_rotary_pos_emb_thd
    return (rope_utils.fused_apply_rotary_pos_emb is fused_apply_rotary_pos_emb
            and rope_utils.fused_apply_rotary_pos_emb_thd is fused_apply_rotary_pos_emb_thd)
