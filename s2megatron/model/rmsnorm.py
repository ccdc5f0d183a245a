"""Fused RMSNorm (forward and backward) as Triton kernels.

Over the last dimension (``hidden`` = n channels) of every row x, with weight w and eps added inside the square
root (``torch.nn.RMSNorm``'s semantics), all in float32 and rounded once to the output dtype::

    rstd = 1 / sqrt(mean(x^2) + eps)
    xhat = x * rstd
    y    = xhat * w

The gradient, with g = dy * w::

    dx = rstd * (g - xhat * mean(g * xhat))
    dw = sum over rows of dy * xhat

The forward kernel handles a tile of a few rows per program (more rows when hidden is small) and stores one float32
rstd per row for the backward pass. The backward kernel runs a fixed number of programs (a few per SM on CUDA), each
over a contiguous range of rows: it writes dx and accumulates dy * xhat for its rows in float32, then stores that
partial dw row into a [programs, hidden] buffer, which ``sum(0)`` reduces. No atomics: the result is bitwise
reproducible for a given device and shape.

Devices: CUDA tensors run the Triton kernels; CPU tensors run them under Triton's interpreter when it was on
(``TRITON_INTERPRET=1``) as this module was imported, and otherwise an equivalent PyTorch implementation of the same
float32 math (so CPU training works).
"""
import functools

import torch
import triton
import triton.language as tl

from ..triton_runtime import launch, runs_triton

__all__ = ["fused_rms_norm"]

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# (elements, elements per thread) of one [BLOCK_M, BLOCK_N] tile of rows (at least one row); num_warps follows,
# within [4, 16]. Forward: 2 rows of 2048 channels or 32 of 80, 8 warps. Backward: 1 row of 2048, 8 warps (it also
# holds a float32 dw accumulator of the tile's size)
_FWD_TILE = (4096, 16)
_BWD_TILE = (2048, 8)
_MAX_ROWS_PER_TILE = 32
_WARPS_PER_SM = 32  # backward programs per SM (CUDA): as many as make 32 warps (4 programs of 8 warps)
_CPU_PROGS = 3  # backward programs on the CPU (interpreter): few, but more than one


@triton.jit
def _rms_norm_fwd_kernel(
    X, W, Y, RSTD,
    num_rows, hidden, eps,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Rows [pid * BLOCK_M, pid * BLOCK_M + BLOCK_M): y = x * rstd * w, rstd stored per row (float32)."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    col_ok = cols < hidden
    mask = (rows < num_rows)[:, None] & col_ok[None, :]
    offs = rows[:, None] * hidden + cols[None, :]
    # float32 right after the load: one rounding at the store, and the interpreter computes 16-bit floats on raw
    # bit patterns, so no arithmetic may happen in 16 bits
    x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)
    rstd = tl.rsqrt(tl.sum(x * x, axis=1) / hidden + eps)
    y = (x * rstd[:, None]) * w[None, :]
    tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=mask)
    tl.store(RSTD + rows, rstd, mask=rows < num_rows)


@triton.jit
def _rms_norm_bwd_kernel(
    X, W, DY, RSTD, DX, DW_PART,
    num_rows, hidden, tiles_per_prog,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_DX: tl.constexpr, HAS_DW: tl.constexpr,
):
    """Tiles [pid * tiles_per_prog, pid * tiles_per_prog + tiles_per_prog) of BLOCK_M rows each:
    dx of every row (HAS_DX), and this program's float32 partial dw into row pid of DW_PART (HAS_DW)."""
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    col_ok = cols < hidden
    w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)
    dw = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for i in range(0, tiles_per_prog):
        rows = (pid.to(tl.int64) * tiles_per_prog + i) * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < num_rows
        mask = row_ok[:, None] & col_ok[None, :]
        offs = rows[:, None] * hidden + cols[None, :]
        x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + rows, mask=row_ok, other=0.0)
        xhat = x * rstd[:, None]
        if HAS_DX:
            g = dy * w[None, :]
            c = tl.sum(g * xhat, axis=1) / hidden
            dx = rstd[:, None] * (g - xhat * c[:, None])
            tl.store(DX + offs, dx.to(DX.dtype.element_ty), mask=mask)
        if HAS_DW:
            dw += dy * xhat
    if HAS_DW:
        tl.store(DW_PART + pid * hidden + cols, tl.sum(dw, axis=0), mask=col_ok)


def _use_triton(x: torch.Tensor) -> bool:
    return runs_triton(_rms_norm_fwd_kernel, x)


def _tile(hidden: int, tile):
    """(BLOCK_M, BLOCK_N, num_warps) for rows of ``hidden`` channels; ``tile`` = (elements, per thread)."""
    tile_elems, per_thread = tile
    block_n = triton.next_power_of_2(hidden)
    block_m = max(1, min(_MAX_ROWS_PER_TILE, tile_elems // block_n))
    num_warps = max(4, min(16, block_m * block_n // (32 * per_thread)))
    return block_m, block_n, num_warps


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _bwd_grid(num_rows: int, block_m: int, num_warps: int, device: torch.device):
    """(programs, tiles per program): a contiguous, tile-aligned range of rows per program, none empty."""
    tiles = triton.cdiv(num_rows, block_m)
    if device.type == "cuda":
        max_progs = _sm_count(device.index) * max(1, _WARPS_PER_SM // num_warps)
    else:
        max_progs = _CPU_PROGS
    per_prog = triton.cdiv(tiles, min(max_progs, tiles))
    return triton.cdiv(tiles, per_prog), per_prog


def _forward(x: torch.Tensor, w: torch.Tensor, eps: float):
    """x [rows, hidden] contiguous -> (y of x's dtype, float32 rstd [rows])."""
    rows, hidden = x.shape
    if not _use_triton(x):
        xf = x.float()
        rstd = torch.rsqrt(xf.square().sum(1) / hidden + eps)
        return ((xf * rstd[:, None]) * w.float()).to(x.dtype), rstd
    y = torch.empty_like(x)
    rstd = torch.empty(rows, dtype=torch.float32, device=x.device)
    block_m, block_n, num_warps = _tile(hidden, _FWD_TILE)
    launch(_rms_norm_fwd_kernel, (triton.cdiv(rows, block_m),), x.device, (x, w, y, rstd, rows, hidden, eps),
            dict(BLOCK_M=block_m, BLOCK_N=block_n), num_warps)
    return y, rstd


def _backward(dy: torch.Tensor, x: torch.Tensor, w: torch.Tensor, rstd: torch.Tensor, need_dx: bool,
              need_dw: bool):
    """dy, x [rows, hidden] contiguous -> (dx of x's dtype or None, float32 dw [hidden] or None)."""
    rows, hidden = x.shape
    if not _use_triton(x):
        xhat = x.float() * rstd[:, None]
        dyf = dy.float()
        dx = dw = None
        if need_dx:
            g = dyf * w.float()
            dx = (rstd[:, None] * (g - xhat * ((g * xhat).sum(1, keepdim=True) / hidden))).to(x.dtype)
        if need_dw:
            dw = (dyf * xhat).sum(0)
        return dx, dw
    block_m, block_n, num_warps = _tile(hidden, _BWD_TILE)
    progs, per_prog = _bwd_grid(rows, block_m, num_warps, x.device)
    dx = torch.empty_like(x) if need_dx else x  # x: placeholder pointer, never written without HAS_DX
    dw_part = torch.empty((progs, hidden), dtype=torch.float32, device=x.device) if need_dw else rstd
    launch(_rms_norm_bwd_kernel, (progs,), x.device, (x, w, dy, rstd, dx, dw_part, rows, hidden, per_prog),
            dict(BLOCK_M=block_m, BLOCK_N=block_n, HAS_DX=need_dx, HAS_DW=need_dw), num_warps)
    return (dx if need_dx else None), (dw_part.sum(0) if need_dw else None)


class _FusedRMSNorm(torch.autograd.Function):
    """Differentiable in x and weight."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if x2.numel() == 0:
            rstd = torch.empty(x2.shape[0], dtype=torch.float32, device=x.device)
            y = torch.empty_like(x2)
        else:
            y, rstd = _forward(x2, weight, eps)
        ctx.save_for_backward(x2, weight, rstd)
        return y.view(shape)

    @staticmethod
    def backward(ctx, dy):
        x2, weight, rstd = ctx.saved_tensors
        need_dx, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        dy2 = dy.reshape(x2.shape).contiguous()
        if x2.numel() == 0:
            dx = torch.empty_like(x2) if need_dx else None
            dw = torch.zeros(x2.shape[1], dtype=torch.float32, device=x2.device) if need_dw else None
        else:
            dx, dw = _backward(dy2, x2, weight, rstd, need_dx, need_dw)
        return (dx.view(dy.shape) if dx is not None else None), (dw.to(weight.dtype) if dw is not None else None), None


def fused_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dimension: ``torch.nn.RMSNorm``'s result, in float32 and rounded once.

    Args:
        x: [..., hidden], float32 / bfloat16 / float16 (made contiguous if it is not).
        weight: [hidden], float32 / bfloat16 / float16, on x's device.
        eps: added to mean(x^2) inside the square root.

    Returns:
        Tensor of x's shape and dtype (contiguous); differentiable in x and weight (weight's gradient has its
        dtype).

    Raises:
        ValueError: unsupported dtypes, a weight that is not [hidden], mixed devices.
    """
    if x.dtype not in DTYPES or weight.dtype not in DTYPES:
        raise ValueError(f"fused_rms_norm: x.dtype {x.dtype} / weight.dtype {weight.dtype} is not supported; use "
                         f"one of {DTYPES}")
    if x.dim() < 1 or weight.dim() != 1 or weight.shape[0] != x.shape[-1]:
        raise ValueError(f"fused_rms_norm: weight must have shape [hidden] matching x's last dim, got x "
                         f"{tuple(x.shape)} and weight {tuple(weight.shape)}")
    if weight.device != x.device:
        raise ValueError(f"fused_rms_norm: weight is on {weight.device} but x is on {x.device}")
    return _FusedRMSNorm.apply(x.contiguous(), weight.contiguous(), float(eps))
