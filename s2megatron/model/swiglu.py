"""Fused SwiGLU activation (forward and backward) as Triton kernels, for Megatron-Core's MLP.

The input ``y`` is the output of the MLP's first linear layer, its last dimension the two halves ``[y1 | y2]`` of
``f`` channels each. With ``s = sigmoid(y1) = 1 / (1 + exp(-y1))``, all in float32 and rounded once to y's dtype::

    out = silu(y1) * y2 = y1 * s * y2

and, for the gradient ``g`` of ``out``::

    dy1 = g * s * (1 + y1 * (1 - s)) * y2       (d silu(y1) / d y1 = s * (1 + y1 * (1 - s)))
    dy2 = g * y1 * s

which are Megatron-Core's ``swiglu`` and ``swiglu_back``. Like Megatron's ``SwiGLUFunction`` the input (not the
output) is saved for the backward pass.

Both passes are elementwise and bound by memory bandwidth: the forward reads y and writes out (3 f values per row),
the backward reads y and g and writes dy (5 f values per row). Each kernel views y as ``[rows, 2f]`` and g / out as
``[rows, f]`` (contiguous) and runs one program per tile of ``BLOCK_M`` rows by ``BLOCK_N`` columns of the half
width ``f``, on a 1-D grid ordered row band by row band. A program loads its tile of y1 and the matching tile of y2
(and g), and stores both halves of dy itself, so no concatenation pass follows. ``BLOCK_N`` is a power of two of at
most 1024 columns chosen to leave few masked columns at the right edge of ``f``; ``BLOCK_M`` fills the tile to 4096
elements.

:func:`install_swiglu_fusion` puts :func:`swiglu_impl` into ``megatron.core.transformer.mlp`` in place of
Megatron's ``bias_swiglu_impl`` (which the MLP calls when ``TransformerConfig.bias_activation_fusion`` is on and the
activation is SwiGLU). Calls this module does not handle (a bias, ``fp8_input_store``, tensors without a Triton
path) go to Megatron's function.

Devices: CUDA tensors run the Triton kernels; CPU tensors run them under Triton's interpreter when it was on
(``TRITON_INTERPRET=1``) as this module was imported, and otherwise (:func:`swiglu` only) an equivalent PyTorch
implementation of the same float32 math.
"""
import torch
import triton
import triton.language as tl
from megatron.core.fusions import fused_bias_swiglu as _megatron_swiglu

from ..triton_runtime import launch, runs_triton

__all__ = ["swiglu", "swiglu_impl", "install_swiglu_fusion"]

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_TILE_ELEMS = 4096  # elements of one [BLOCK_M, BLOCK_N] tile: 16 per thread with 8 warps
_MAX_BLOCK_N = 1024
_MIN_BLOCK_N = 256
_NUM_WARPS = 8
# Megatron's own implementation, for the calls swiglu_impl passes on (taken from its defining module, which
# install_swiglu_fusion leaves alone)
_MEGATRON_IMPL = _megatron_swiglu.bias_swiglu_impl


@triton.jit
def _load_tile(Y, num_rows, f, col_blocks, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """This program's [BLOCK_M, BLOCK_N] tile: y1 and y2 of y [rows, 2f] in float32, sigmoid(y1), the tile's
    offsets into y (its y1 half) and into a [rows, f] tensor, and its mask."""
    pid = tl.program_id(0)
    pid_m = pid // col_blocks
    pid_n = pid % col_blocks
    rows = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rows < num_rows)[:, None] & (cols < f)[None, :]
    y_offs = rows[:, None] * (2 * f) + cols[None, :]
    half_offs = rows[:, None] * f + cols[None, :]
    # float32 right after the load: one rounding at the store, and the interpreter computes 16-bit floats on raw
    # bit patterns, so no arithmetic may happen in 16 bits
    y1 = tl.load(Y + y_offs, mask=mask, other=0.0).to(tl.float32)
    y2 = tl.load(Y + y_offs + f, mask=mask, other=0.0).to(tl.float32)
    sig = 1.0 / (1.0 + tl.exp(-y1))
    return y1, y2, sig, y_offs, half_offs, mask


@triton.jit
def _swiglu_fwd_kernel(
    Y, OUT,
    num_rows, f, col_blocks,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """One [BLOCK_M, BLOCK_N] tile of out [rows, f] = silu(y1) * y2, y [rows, 2f]."""
    y1, y2, sig, y_offs, half_offs, mask = _load_tile(Y, num_rows, f, col_blocks, BLOCK_M, BLOCK_N)
    tl.store(OUT + half_offs, (y1 * sig * y2).to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd_kernel(
    Y, G, DY,
    num_rows, f, col_blocks,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """One [BLOCK_M, BLOCK_N] tile of g [rows, f]: both halves of dy [rows, 2f] (dy1 and dy2) from y and g."""
    y1, y2, sig, y_offs, half_offs, mask = _load_tile(Y, num_rows, f, col_blocks, BLOCK_M, BLOCK_N)
    g = tl.load(G + half_offs, mask=mask, other=0.0).to(tl.float32)
    dy1 = g * sig * (1.0 + y1 * (1.0 - sig)) * y2
    dy2 = g * (y1 * sig)
    tl.store(DY + y_offs, dy1.to(DY.dtype.element_ty), mask=mask)
    tl.store(DY + y_offs + f, dy2.to(DY.dtype.element_ty), mask=mask)


def _use_triton(x: torch.Tensor) -> bool:
    return runs_triton(_swiglu_fwd_kernel, x)


def _tile(f: int):
    """(BLOCK_M, BLOCK_N) for a half width of f columns: BLOCK_N = all of f (rounded up to a power of two) when
    f <= 1024, else the largest power of two in [256, 1024] that pads f by at most f / 16 columns (5504 -> 512),
    or 256."""
    if f <= _MAX_BLOCK_N:
        block_n = triton.next_power_of_2(f)
    else:
        block_n = _MAX_BLOCK_N
        while block_n > _MIN_BLOCK_N and (-f) % block_n > f // 16:
            block_n //= 2
    return max(1, _TILE_ELEMS // block_n), block_n


def _launch(kernel, y: torch.Tensor, tensors, rows: int, f: int) -> None:
    block_m, block_n = _tile(f)
    col_blocks = triton.cdiv(f, block_n)
    grid = (triton.cdiv(rows, block_m) * col_blocks,)
    launch(kernel, grid, y.device, (*tensors, rows, f, col_blocks), dict(BLOCK_M=block_m, BLOCK_N=block_n),
           _NUM_WARPS)


def _sigmoid_f32(y1: torch.Tensor) -> torch.Tensor:
    return 1.0 / (1.0 + torch.exp(-y1))


def _forward(y: torch.Tensor) -> torch.Tensor:
    """y [rows, 2f] contiguous -> out [rows, f] of y's dtype."""
    rows, f = y.shape[0], y.shape[1] // 2
    if not _use_triton(y):
        y1, y2 = y.float().chunk(2, -1)
        return (y1 * _sigmoid_f32(y1) * y2).to(y.dtype)
    out = torch.empty((rows, f), dtype=y.dtype, device=y.device)
    if rows:
        _launch(_swiglu_fwd_kernel, y, (y, out), rows, f)
    return out


def _backward(g: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """g [rows, f], y [rows, 2f], both contiguous -> dy [rows, 2f] of y's dtype."""
    rows, f = y.shape[0], y.shape[1] // 2
    if not _use_triton(y):
        y1, y2 = y.float().chunk(2, -1)
        gf = g.float()
        sig = _sigmoid_f32(y1)
        return torch.cat((gf * sig * (1.0 + y1 * (1.0 - sig)) * y2, gf * (y1 * sig)), -1).to(y.dtype)
    dy = torch.empty_like(y)
    if rows:
        _launch(_swiglu_bwd_kernel, y, (y, g, dy), rows, f)
    return dy


class _SwiGLU(torch.autograd.Function):
    """y [rows, 2f] contiguous -> [rows, f]; saves y (as Megatron's SwiGLUFunction does)."""

    @staticmethod
    def forward(ctx, y, cpu_offload_input):
        if cpu_offload_input:
            y.activation_offloading = True  # Megatron's mark for its activation offloading
        ctx.save_for_backward(y)
        return _forward(y)

    @staticmethod
    def backward(ctx, grad_out):
        (y,) = ctx.saved_tensors
        g = grad_out.to(y.dtype).contiguous()
        return _backward(g, y), None


def _supported(y: torch.Tensor) -> bool:
    return y.dtype in DTYPES and y.dim() >= 1 and y.shape[-1] >= 2 and y.shape[-1] % 2 == 0


def swiglu(y: torch.Tensor, cpu_offload_input: bool = False) -> torch.Tensor:
    """SwiGLU over the last dimension: ``silu(y1) * y2`` with ``y1, y2 = y.chunk(2, -1)``, in float32, rounded once.

    Args:
        y: [..., 2f], float32 / bfloat16 / float16 (made contiguous if it is not).
        cpu_offload_input: mark the tensor saved for the backward pass for Megatron's activation offloading
            (``activation_offloading`` attribute), as Megatron's ``SwiGLUFunction`` does.

    Returns:
        [..., f] contiguous tensor of y's dtype; differentiable in y.

    Raises:
        ValueError: an unsupported dtype, or a last dimension that is not even and positive.
    """
    if not _supported(y):
        raise ValueError(f"swiglu: y must be float32 / bfloat16 / float16 with an even, positive last dim, got "
                         f"dtype {y.dtype} shape {tuple(y.shape)}")
    shape = y.shape
    out = _SwiGLU.apply(y.reshape(-1, shape[-1]).contiguous(), bool(cpu_offload_input))
    return out.view(*shape[:-1], shape[-1] // 2)


def swiglu_impl(input, bias, fp8_input_store=False, cpu_offload_input=False, *args, **kwargs):
    """Megatron-Core's ``bias_swiglu_impl`` (same signature): [s, b, 2f] -> [s, b, f] or [t, 2f] -> [t, f].

    Bias-free calls without ``fp8_input_store`` on tensors with a Triton path (CUDA, or the interpreter) run
    :func:`swiglu`; every other call, and any further arguments, goes to Megatron's ``bias_swiglu_impl``.
    """
    if (bias is None and not fp8_input_store and not args and not kwargs and input.dim() in (2, 3)
            and _supported(input) and _use_triton(input)):
        return swiglu(input, cpu_offload_input)
    return _MEGATRON_IMPL(input, bias, fp8_input_store, cpu_offload_input, *args, **kwargs)


def install_swiglu_fusion() -> bool:
    """Put :func:`swiglu_impl` into ``megatron.core.transformer.mlp`` in place of Megatron's ``bias_swiglu_impl``.

    The MLP imported that name, so its module namespace is patched; Megatron's function stays in
    ``megatron.core.fusions.fused_bias_swiglu`` (and in other modules that imported it, such as MoE shared
    experts) and still serves the calls :func:`swiglu_impl` passes on. Megatron uses the MLP hook only when
    ``TransformerConfig.bias_activation_fusion`` is on. Idempotent; a function other than Megatron's or this
    module's stays in place.

    Returns:
        True when the MLP's ``bias_swiglu_impl`` is this module's :func:`swiglu_impl`.
    """
    from megatron.core.transformer import mlp

    current = getattr(mlp, "bias_swiglu_impl", None)
    if current is _MEGATRON_IMPL or getattr(current, "__module__", None) == __name__:
        mlp.bias_swiglu_impl = swiglu_impl  # (a function of this module: one from before a reload)
    return mlp.bias_swiglu_impl is swiglu_impl
