"""Launchers, the ``torch.library`` custom ops and their autograd, and the eager-mode autograd function.

The ops take the layout as an integer key into a process-wide registry, so that ``torch.compile`` sees one opaque
op per call (no graph break) and the metadata is looked up at run time, outside any graph. An S2Layout needs no
lists: the kernels compute its row and column walks from the pattern formula and read only each head's stripe
residue (:class:`_AnalyticMeta`); other layouts read the CSR lists of :func:`get_metadata`. Both are cached per shape.
Neither launcher reads device memory on the host: forward and backward are CUDA-graph capturable once the metadata
of a shape has been built (the first call builds it).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Optional

import torch
from triton.tools.tensor_descriptor import TensorDescriptor

from ...sparsity.layout import Layout, S2Layout
from ...sparsity.metadata import get_metadata, tiling
from ...triton_runtime import decorated_for_interpreter, on_device
from . import config as _config
from . import kernels as _kernels
from .rows import lse_strides as _lse_strides
from .rows import qkv_strides as _qkv_strides
from .rows import row_view

try:  # the Hopper kernels need Gluon (Triton 3.5 and later)
    from . import hopper_fwd as _hopper
except ImportError:
    _hopper = None
try:  # and, for the dK/dV, a partition barrier (gl.barrier or gl.thread_barrier)
    from . import hopper_bwd as _hopper_bwd
except (ImportError, AttributeError):
    _hopper_bwd = None
try:  # the dQ reuses the forward's pieces
    from . import hopper_dq as _hopper_dq
except ImportError:
    _hopper_dq = None

_LAYOUTS: dict = {}    # key -> layout
_KEYS: dict = {}       # layout -> key (equal layouts share a key)
_MASK_KEYS: dict = {}  # BlockMaskLayout fingerprint -> key, for lookups under torch.compile


def _register(layout: Layout) -> int:
    key = _KEYS.get(layout)
    if key is None:
        key = len(_LAYOUTS)
        _LAYOUTS[key] = layout
        _KEYS[layout] = key
        if not isinstance(layout, S2Layout):
            _MASK_KEYS[("mask", *layout._key)] = key
    return key


@torch._dynamo.assume_constant_result
def _s2_key(*fields) -> int:
    return _register(S2Layout(*fields))


@torch._dynamo.assume_constant_result
def _mask_key(*fingerprint) -> int:
    key = _MASK_KEYS.get(fingerprint)
    if key is None:
        raise ValueError("a BlockMaskLayout used under torch.compile must have been used once eagerly (its mask is "
                         "a tensor, which the compiled graph cannot carry as a constant)")
    return key


def layout_key(layout: Layout) -> int:
    """A stable integer for ``layout`` (equal layouts share one), registering it on first use.

    Under torch.compile only plain values reach the constant-folded helpers (Dynamo cannot rebuild a frozen
    dataclass from its trace), so an S2Layout is passed as its fields."""
    if isinstance(layout, S2Layout):
        return _s2_key(layout.block_size, layout.local_blocks, layout.vert_stride, layout.head_sliding,
                       layout.sliding_offset, layout.num_dense_heads, layout.per_kv_head)
    if torch.compiler.is_compiling():
        return _mask_key("mask", *layout._key)
    return _register(layout)


@lru_cache(maxsize=256)
def _merge_allowed(layout: Layout) -> bool:
    return bool(layout.is_kv_cache_efficient())


@dataclass(frozen=True)
class _AnalyticMeta:
    """What the kernels read for an S2Layout: the tiling and each head's pattern (its stripe residue, -1 for a
    dense head). Row and column lists are computed in the kernels from the formula, so none are built; their
    pointer arguments get ``head_to_pattern`` as a placeholder that is never read."""

    first_block: int
    last_block: int
    num_tiles: int
    num_key_blocks: int
    head_to_pattern: torch.Tensor
    residues: torch.Tensor
    patterns: object  # the layout's StridePatterns (host tuples of the same residues and head mapping)

    @property
    def row_ptr(self):
        return self.head_to_pattern

    row_cols = row_last = col_ptr = col_rows = row_ptr


@lru_cache(maxsize=256)
def _analytic_meta(layout: S2Layout, num_heads, num_kv_heads, head_offset, total_heads, total_kv_heads, q_len,
                   kv_len, rows_per_tile, device) -> _AnalyticMeta:
    heads = layout.resolve(num_heads, num_kv_heads, head_offset, total_heads, total_kv_heads)
    patterns = layout.head_patterns(heads)
    first, last, num_tiles, num_key_blocks = tiling(layout, q_len, kv_len, rows_per_tile)
    return _AnalyticMeta(
        first_block=first, last_block=last, num_tiles=num_tiles, num_key_blocks=num_key_blocks,
        head_to_pattern=torch.tensor(patterns.head_to_pattern, dtype=torch.int32, device=device),
        residues=torch.tensor(patterns.residues, dtype=torch.int32, device=device), patterns=patterns)


class _Plan:
    """Shapes, tiles and metadata of one call (everything the launchers need besides the tensors)."""

    def __init__(self, q, k, cu_seqlens, key, max_seqlen, head_offset, total_heads, total_kv_heads):
        layout = _LAYOUTS[key]
        self.varlen = cu_seqlens is not None
        if self.varlen:
            self.num_tokens, self.num_heads, self.head_dim = q.shape
            self.batch = cu_seqlens.numel() - 1
            # without max_seqlen, the packed length bounds every sequence (no device->host read)
            self.q_len = self.kv_len = max_seqlen if max_seqlen > 0 else self.num_tokens
        else:
            self.batch, self.q_len, self.num_heads, self.head_dim = q.shape
            self.kv_len = k.shape[1]
        self.num_kv_heads = k.shape[-2]
        # the query-tile kernels' grids are (tiles, heads, batch entries), dK/dV's (key tiles x kv heads, batch
        # entries): axes 1 and 2 hold at most 65535 programs
        for what, n in (("query heads", self.num_heads), ("sequences in one call", self.batch)):
            if n > 65535:
                raise ValueError(f"{n} {what} exceed the kernels' launch grid (at most 65535); split the call")
        self.group = self.num_heads // self.num_kv_heads
        self.block_size = layout.block_size
        self.merge_q = _merge_allowed(layout)
        # S2 row lists are computed in the kernels from the pattern formula; custom layouts read the metadata
        self.analytic = isinstance(layout, S2Layout)
        self.cfg = _config.tile_config(self.block_size, self.head_dim, self.merge_q, q.element_size(),
                                       gather_keys=self.analytic)
        self.block_d = _config.block_d(self.head_dim)
        self._layout, self._heads = layout, (head_offset, total_heads or None, total_kv_heads or None)
        self.device = q.device
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        # TMA copies exist from Hopper (sm_90) on; the interpreter runs the descriptor code path on the CPU
        self.tma = _has_tma(self.device.index) if self.device.type == "cuda" else self.device.type == "cpu"
        if self.analytic:
            self.local_blocks, self.vert_stride = layout.local_blocks, layout.vert_stride
        else:
            self.local_blocks, self.vert_stride = 1, 1
        self.upcast = decorated_for_interpreter(_kernels.s2_fwd_kernel) and q.dtype != torch.float32
        self.prec = "ieee" if q.dtype == torch.float32 else "tf32"

    @property
    def layout(self) -> Layout:
        return self._layout

    def metadata(self, block_m: int):
        """The metadata of query tiles of ``block_m`` tokens (the forward's and dQ's tiles may differ) and the
        per-head pattern values the kernels read (stripe residues, or pattern indices of a custom layout)."""
        rows_per_tile = block_m // self.block_size
        head_offset, total_heads, total_kv_heads = self._heads
        if self.analytic:
            meta = _analytic_meta(self._layout, self.num_heads, self.num_kv_heads, head_offset, total_heads,
                                  total_kv_heads, self.q_len, self.kv_len, rows_per_tile, self.device)
            residues = meta.residues
        else:
            meta = get_metadata(self._layout, self.num_heads, self.q_len, self.kv_len, num_kv_heads=self.num_kv_heads,
                                head_offset=head_offset, total_heads=total_heads, total_kv_heads=total_kv_heads,
                                device=self.device, rows_per_tile=rows_per_tile)
            residues = meta.head_to_pattern
        return meta, residues

    def fast(self, block_n: int) -> bool:
        """Whether the row walks of this call have interior key tiles (the kernels' FAST path)."""
        return self.analytic and self.block_size >= block_n

    def common(self):
        return dict(HEAD_DIM=self.head_dim, BLOCK_D=self.block_d, BS=self.block_size, VARLEN=self.varlen,
                    UPCAST=self.upcast, PREC=self.prec)


def row_descriptor(x, varlen, block_rows, block_d):
    """``(descriptor, rows per batch entry)`` over the token rows of ``x`` (:func:`row_view`) with
    ``[block_rows, block_d]`` blocks, or ``(None, 0)`` where a TMA copy cannot read it."""
    view = row_view(x, varlen, block_d)
    if view is None:
        return None, 0
    shape, strides, rows_b = view
    return TensorDescriptor(x, shape, strides, [block_rows, block_d]), rows_b


@lru_cache(maxsize=None)
def _has_tma(device_index: int) -> bool:
    """Whether the GPU has TMA (compute capability 9.0 or later). Before it, Triton would turn descriptor loads back
    into bounds-checked pointer loads, which were never measured against the kernels' own pointer path."""
    return torch.cuda.get_device_capability(device_index)[0] >= 9


def _row_descriptors(enabled, pair, varlen, block_rows, block_d):
    """Descriptors of both tensors of ``pair`` (K and V, or Q and dO) and the rows per batch entry of each (equal,
    or none are used); ``(None, None, 0, False)`` when disabled or either tensor cannot take one."""
    if not enabled:
        return None, None, 0, False
    (d0, r0), (d1, r1) = (row_descriptor(x, varlen, block_rows, block_d) for x in pair)
    if d0 is None or d1 is None or r0 != r1:
        return None, None, 0, False
    return d0, d1, r0, True


def _last_dim_contiguous(x):
    return x if x.stride(-1) == 1 else x.contiguous()


def _forward(q, k, v, cu_seqlens, key, sm_scale, max_seqlen, head_offset, total_heads, total_kv_heads):
    q, k, v = (_last_dim_contiguous(x) for x in (q, k, v))
    plan = _Plan(q, k, cu_seqlens, key, max_seqlen, head_offset, total_heads, total_kv_heads)
    cfg = plan.cfg
    meta, residues = plan.metadata(cfg.fwd_block_m)
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    lse_shape = (plan.num_heads, plan.num_tokens) if plan.varlen else (plan.batch, plan.num_heads, plan.q_len)
    lse = torch.empty(lse_shape, dtype=torch.float32, device=q.device)
    cu = cu_seqlens if plan.varlen else meta.head_to_pattern  # unused placeholder pointer when not packed
    grid = (meta.num_tiles, plan.num_heads, plan.batch)
    hopper = _hopper.hopper_forward_tiles(plan, q) if _hopper is not None else None
    if hopper is not None:
        with on_device(plan.device):
            if _hopper.hopper_forward(plan, hopper, q, k, v, out, lse, cu, sm_scale * _kernels.LOG2E):
                return out, lse
    k_desc, v_desc, kv_rows_b, desc = _row_descriptors(plan.tma and cfg.fwd_tma and plan.fast(cfg.block_n), (k, v),
                                                       plan.varlen, cfg.block_n, plan.block_d)
    with on_device(plan.device):
        _kernels.s2_fwd_kernel[grid](
            q, k, v, out, lse, cu, meta.head_to_pattern, meta.row_ptr, meta.row_cols, meta.row_last, residues,
            k_desc, v_desc,
            *_qkv_strides(q, plan.varlen), *_qkv_strides(k, plan.varlen), *_qkv_strides(v, plan.varlen),
            *_qkv_strides(out, plan.varlen), *_lse_strides(lse, plan.varlen),
            sm_scale * _kernels.LOG2E, plan.q_len, plan.kv_len, meta.num_tiles, meta.first_block, plan.group,
            plan.local_blocks, plan.vert_stride, kv_rows_b, BLOCK_M=cfg.fwd_block_m, BLOCK_N=cfg.block_n,
            ANALYTIC=plan.analytic, DESC=desc,
            num_warps=cfg.fwd_warps, num_stages=cfg.fwd_stages, **plan.common())
    return out, lse


def _triton_dq(plan, meta, residues, q, k, v, out, dout, dq, lse, dlse, delta, cu, sm_scale):
    """The Triton dQ kernel, one program per query tile: dQ, and Delta for every query row."""
    cfg = plan.cfg
    k_desc, v_desc, kv_rows_b, dq_desc = _row_descriptors(plan.tma and cfg.dq_tma and plan.fast(cfg.dq_block_n),
                                                          (k, v), plan.varlen, cfg.dq_block_n, plan.block_d)
    _kernels.s2_bwd_dq_kernel[(meta.num_tiles, plan.num_heads, plan.batch)](
        q, k, v, out, dout, dq, lse, dlse if dlse is not None else delta, delta, cu, meta.head_to_pattern,
        meta.row_ptr, meta.row_cols, meta.row_last, residues, k_desc, v_desc,
        *_qkv_strides(q, plan.varlen), *_qkv_strides(k, plan.varlen), *_qkv_strides(v, plan.varlen),
        *_qkv_strides(out, plan.varlen), *_qkv_strides(dout, plan.varlen), *_qkv_strides(dq, plan.varlen),
        *_lse_strides(lse, plan.varlen),
        sm_scale, sm_scale * _kernels.LOG2E, plan.q_len, plan.kv_len, meta.num_tiles, meta.first_block,
        plan.group, plan.local_blocks, plan.vert_stride, kv_rows_b, BLOCK_M=cfg.block_m, BLOCK_N=cfg.dq_block_n,
        ANALYTIC=plan.analytic, DESC=dq_desc, HAS_DLSE=dlse is not None,
        num_warps=cfg.dq_warps, num_stages=cfg.dq_stages, maxnreg=cfg.dq_maxnreg, **plan.common())


def _triton_dkdv(plan, meta, residues, q, k, v, dout, dk, dv, lse, delta, cu, sm_scale):
    """The Triton dK/dV kernel, one program per key tile and kv head: dK and dV from the Delta of the dQ kernel."""
    cfg = plan.cfg
    # interior query chunks exist where a key tile holds whole layout blocks of a KV-cache-efficient layout
    q_desc, do_desc, q_rows_b, dkdv_desc = _row_descriptors(
        plan.tma and cfg.dkdv_tma and plan.merge_q and plan.block_size >= cfg.dkdv_block_n, (q, dout), plan.varlen,
        cfg.dkdv_block_m, plan.block_d)
    _kernels.s2_bwd_dkdv_kernel[(triton_cdiv(plan.kv_len, cfg.dkdv_block_n) * plan.num_kv_heads, plan.batch)](
        q, k, v, dout, dk, dv, lse, delta, cu, meta.head_to_pattern, meta.col_ptr, meta.col_rows, residues,
        q_desc, do_desc,
        *_qkv_strides(q, plan.varlen), *_qkv_strides(k, plan.varlen), *_qkv_strides(v, plan.varlen),
        *_qkv_strides(dout, plan.varlen), *_qkv_strides(dk, plan.varlen), *_qkv_strides(dv, plan.varlen),
        *_lse_strides(lse, plan.varlen),
        sm_scale, sm_scale * _kernels.LOG2E, plan.q_len, plan.kv_len, meta.num_key_blocks, meta.first_block,
        plan.num_kv_heads, plan.group, plan.local_blocks, plan.vert_stride, q_rows_b, BLOCK_M=cfg.dkdv_block_m,
        BLOCK_N=cfg.dkdv_block_n, RUN=plan.merge_q, ANALYTIC=plan.analytic, DESC=dkdv_desc,
        HEADS_FASTEST=plan.kv_len < cfg.dkdv_heads_fastest_below, num_warps=cfg.dkdv_warps,
        num_stages=cfg.dkdv_stages, **plan.common())


def _backward(dout, q, k, v, out, lse, dlse, cu_seqlens, key, sm_scale, max_seqlen, head_offset, total_heads,
              total_kv_heads):
    q, k, v, out, dout = (_last_dim_contiguous(x) for x in (q, k, v, out, dout))
    plan = _Plan(q, k, cu_seqlens, key, max_seqlen, head_offset, total_heads, total_kv_heads)
    meta, residues = plan.metadata(plan.cfg.block_m)
    cu = cu_seqlens if plan.varlen else meta.head_to_pattern
    delta = torch.empty_like(lse)
    if dlse is not None:
        dlse = dlse.contiguous()
    dq = torch.empty_like(q, memory_format=torch.contiguous_format)
    dk = torch.empty_like(k, memory_format=torch.contiguous_format)
    dv = torch.empty_like(v, memory_format=torch.contiguous_format)
    with on_device(plan.device):
        # Delta (rowsum(O * dO) - dLSE) comes from the dQ kernel, for every query row, before the dK/dV kernel reads it
        hopper_dq = _hopper_dq.hopper_dq_tiles(plan, q) if _hopper_dq is not None else None
        if hopper_dq is None or not _hopper_dq.hopper_dq(plan, hopper_dq, q, k, v, out, dout, dq, lse, dlse, delta, cu,
                                                          sm_scale, sm_scale * _kernels.LOG2E):
            _triton_dq(plan, meta, residues, q, k, v, out, dout, dq, lse, dlse, delta, cu, sm_scale)
        hopper = _hopper_bwd.hopper_dkdv_tiles(plan, q) if _hopper_bwd is not None else None
        if hopper is None or not _hopper_bwd.hopper_dkdv(
                plan, hopper, q, k, v, dout, dk, dv, lse, delta, cu, sm_scale, sm_scale * _kernels.LOG2E,
                meta.first_block, meta.head_to_pattern, residues):
            _triton_dkdv(plan, meta, residues, q, k, v, dout, dk, dv, lse, delta, cu, sm_scale)
    return dq, dk, dv


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


# ----------------------------------------------------------------------------------------------- custom ops

@torch.library.custom_op("s2megatron::triton_s2_fwd", mutates_args=())
def s2_fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: Optional[torch.Tensor], layout_id: int,
              sm_scale: float, max_seqlen: int, head_offset: int, total_heads: int,
              total_kv_heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, lse float32 [B, H, S] or [H, T]); ``max_seqlen``/``total_*`` of 0 mean "not given"."""
    return _forward(q, k, v, cu_seqlens, layout_id, sm_scale, max_seqlen, head_offset, total_heads, total_kv_heads)


@s2_fwd_op.register_fake
def _(q, k, v, cu_seqlens, layout_id, sm_scale, max_seqlen, head_offset, total_heads, total_kv_heads):
    if cu_seqlens is not None:
        lse = q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32)
    else:
        lse = q.new_empty((q.shape[0], q.shape[2], q.shape[1]), dtype=torch.float32)
    return torch.empty_like(q, memory_format=torch.contiguous_format), lse


@torch.library.custom_op("s2megatron::triton_s2_bwd", mutates_args=())
def s2_bwd_op(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
              lse: torch.Tensor, dlse: Optional[torch.Tensor], cu_seqlens: Optional[torch.Tensor], layout_id: int,
              sm_scale: float, max_seqlen: int, head_offset: int, total_heads: int,
              total_kv_heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _backward(dout, q, k, v, out, lse, dlse, cu_seqlens, layout_id, sm_scale, max_seqlen, head_offset,
                     total_heads, total_kv_heads)


@s2_bwd_op.register_fake
def _(dout, q, k, v, out, lse, dlse, cu_seqlens, layout_id, sm_scale, max_seqlen, head_offset, total_heads,
      total_kv_heads):
    return tuple(torch.empty_like(x, memory_format=torch.contiguous_format) for x in (q, k, v))


def _setup_context(ctx, inputs, output):
    q, k, v, cu_seqlens, *args = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, cu_seqlens)
    ctx.args = args


def _gradients(ctx, dout, dlse, backward):
    """(dq, dk, dv, None...) from ``backward`` (the custom op, or :func:`_backward` itself in eager mode)."""
    q, k, v, out, lse, cu_seqlens = ctx.saved_tensors
    if dout is None:
        dout = torch.zeros_like(out)
    dq, dk, dv = backward(dout, q, k, v, out, lse, dlse, cu_seqlens, *ctx.args)
    return (dq, dk, dv) + (None,) * (1 + len(ctx.args))


def _autograd_backward(ctx, dout, dlse):
    return _gradients(ctx, dout, dlse, s2_bwd_op)


s2_fwd_op.register_autograd(_autograd_backward, setup_context=_setup_context)


class _EagerS2Attention(torch.autograd.Function):
    """The same launchers without the custom-op dispatch, for eager mode: the op's dispatch and autograd wrapping
    cost about 65 us more host time per forward and backward than this (``bench/host_overhead.py``), which adds up
    to milliseconds per step where the host has little slack (short steps, many micro-batches, many ranks)."""

    @staticmethod
    def forward(ctx, q, k, v, cu_seqlens, *args):
        ctx.set_materialize_grads(False)  # an unused out or lse gradient stays None, as with the custom op
        out, lse = _forward(q, k, v, cu_seqlens, *args)
        _setup_context(ctx, (q, k, v, cu_seqlens, *args), (out, lse))
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        return _gradients(ctx, dout, dlse, _backward)


def s2_attention_op(q, k, v, cu_seqlens, layout_id: int, sm_scale: float, max_seqlen: int, head_offset: int,
                    total_heads: int, total_kv_heads: int):
    """(out, lse): the custom op under torch.compile (one opaque node, no graph break), the autograd function
    around the same launchers otherwise. Arguments as for :func:`s2_fwd_op`."""
    args = (q, k, v, cu_seqlens, layout_id, sm_scale, max_seqlen, head_offset, total_heads, total_kv_heads)
    if torch.compiler.is_compiling():
        return s2_fwd_op(*args)
    return _EagerS2Attention.apply(*args)
