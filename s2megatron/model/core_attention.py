"""S2 core attention: a drop-in for megatron-core's ``DotProductAttention`` that runs :func:`s2_attention`.

One class serves dense and sparse layers (the layout differs, not the class), so every layer has the same
parameter and state sets and distributed checkpoints stay homogeneous. The module owns no parameters.

Head ids are global: under tensor parallelism rank r holds query heads ``[r*np, (r+1)*np)`` of the model's
``num_attention_heads`` (also when ``num_query_groups < tp``, where megatron all-gathers the fused qkv and slices
the rank's heads), and patterns are computed from those global ids and the model's global head counts
(docs/S2_PATTERN.md). The layer number megatron passes is global and 1-based (``TransformerLayer`` adds the
pipeline/virtual-pipeline offset before building its attention), so ``schedule.for_layer_number`` gives the layout.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from megatron.core.dist_checkpointing.mapping import ShardedStateDict
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule

from ..ops import BACKENDS, s2_attention
from ..sparsity import LayerSchedule
from ..sparsity.layout import Layout

_CAUSAL_TYPES = (AttnMaskType.causal, AttnMaskType.causal_bottom_right, AttnMaskType.padding_causal)

# Masks / cu_seqlens already verified (every layer of a micro-batch receives the same tensors): a check that reads
# a GPU tensor synchronises with the host, so it runs once per tensor instead of once per layer. The entries hold
# the tensors themselves, so a key (address, shape, version) cannot be reused by another tensor while cached.
_VERIFIED: dict = {}


def _tensor_key(t: torch.Tensor) -> tuple:
    return (t.data_ptr(), tuple(t.shape), t.dtype, str(t.device), t._version)


def _remember(key, *tensors) -> None:
    if len(_VERIFIED) >= 4:  # the current micro-batch's tensors are what matters; masks can be large
        _VERIFIED.pop(next(iter(_VERIFIED)))
    _VERIFIED[key] = tensors


def tp_rank_and_size(pg_collection=None) -> tuple[int, int]:
    """(rank, size) in the tensor-parallel group: ``pg_collection.tp`` when given, else megatron's
    parallel_state (1 process when model parallelism is not initialised)."""
    group = getattr(pg_collection, "tp", None) if pg_collection is not None else None
    if group is not None:
        return group.rank(), group.size()
    from megatron.core import parallel_state
    if not parallel_state.model_parallel_is_initialized():
        return 0, 1
    return parallel_state.get_tensor_model_parallel_rank(), parallel_state.get_tensor_model_parallel_world_size()


class S2CoreAttention(MegatronModule):
    """Causal S2 attention with megatron-core's core-attention contract.

    Constructed by megatron's ``Attention`` with keywords ``config, layer_number, attn_mask_type,
    attention_type, cp_comm_type, softmax_scale, pg_collection`` (unknown keywords are accepted and ignored),
    plus these from the spec's params:

    ``layer_schedule``: :class:`LayerSchedule` over ``config.num_layers`` layers (the layer's layout is
    ``layer_schedule.for_layer_number(layer_number)``), or ``layout``: one fixed layout (tests, tools).
    ``attention_backend``: ``auto|triton|reference|sdpa`` (see :func:`s2megatron.ops.s2_attention`).
    ``num_query_groups``: the model's real number of kv heads. Needed because megatron hands core attention a
    config whose ``num_query_groups`` was raised to the TP size when it is smaller; defaults to
    ``config.num_query_groups``.

    Raises ValueError for context parallelism > 1, attention dropout, non-causal mask types, cross attention,
    sliding windows/softmax variants it does not implement, and head counts that do not split over TP.
    """

    def __init__(self, config, layer_number: int, attn_mask_type: AttnMaskType = AttnMaskType.causal,
                 attention_type: str = "self", attention_dropout: Optional[float] = None,
                 softmax_scale: Optional[float] = None, cp_comm_type: Optional[str] = None, pg_collection=None,
                 *, layer_schedule: Optional[LayerSchedule] = None, layout: Optional[Layout] = None,
                 attention_backend: str = "auto", num_query_groups: Optional[int] = None, **kwargs):
        super().__init__(config=config)
        _check_supported(config, attn_mask_type, attention_type, attention_dropout, pg_collection)
        if attention_backend not in BACKENDS:
            raise ValueError(f"attention_backend={attention_backend!r} is invalid; valid: {BACKENDS}")
        if (layer_schedule is None) == (layout is None):
            raise ValueError("S2CoreAttention needs exactly one of layer_schedule= or layout=")
        if layer_schedule is not None:
            if layer_schedule.num_layers != config.num_layers:
                raise ValueError(f"the layer schedule covers {layer_schedule.num_layers} layers but the model has "
                                 f"config.num_layers={config.num_layers}")
            if not 1 <= layer_number <= config.num_layers:
                raise ValueError(f"layer_number={layer_number} is outside 1..{config.num_layers}; S2CoreAttention "
                                 "expects megatron's global 1-based layer number (MTP layers are not supported)")
            layout = layer_schedule.for_layer_number(layer_number)
        self.layer_number = layer_number
        self.layout = layout
        self.attn_mask_type = attn_mask_type
        self.attention_backend = attention_backend

        tp_rank, tp_size = tp_rank_and_size(pg_collection)
        total_heads = config.num_attention_heads
        total_kv_heads = config.num_query_groups if num_query_groups is None else int(num_query_groups)
        if total_heads % tp_size:
            raise ValueError(f"num_attention_heads={total_heads} must be divisible by the tensor-parallel size {tp_size}")
        if total_kv_heads < 1 or total_heads % total_kv_heads:
            raise ValueError(f"num_attention_heads={total_heads} must be a multiple of num_query_groups={total_kv_heads}")
        if total_kv_heads != config.num_query_groups and not (total_kv_heads < tp_size == config.num_query_groups):
            raise ValueError(f"num_query_groups={total_kv_heads} disagrees with config.num_query_groups="
                             f"{config.num_query_groups}; they may differ only when num_query_groups < tp size "
                             f"({tp_size}), where megatron raises the config's value to the tp size")
        if total_kv_heads >= tp_size and total_kv_heads % tp_size:
            raise ValueError(f"num_query_groups={total_kv_heads} must be divisible by the tensor-parallel size {tp_size} "
                             "(or smaller than it)")
        self.tp_rank, self.tp_size = tp_rank, tp_size
        self.num_heads = total_heads // tp_size                             # local query heads (np)
        self.num_kv_heads = max(1, total_kv_heads // tp_size)               # local kv heads (ng), 1 when ng < tp
        self.head_offset = tp_rank * self.num_heads                         # global id of local head 0
        self.total_heads = total_heads
        self.total_kv_heads = total_kv_heads
        self.head_dim = config.kv_channels
        # apply_query_key_layer_scaling divides the scale by layer_number and the softmax multiplies it back:
        # the product is the plain scale, which is what we compute.
        self.softmax_scale = 1.0 / math.sqrt(self.head_dim) if softmax_scale is None else float(softmax_scale)
        # Validate heads/layout once at build time (num_dense_heads, mask head counts, ...), not on first forward.
        layout.head_patterns(layout.resolve(self.num_heads, self.num_kv_heads, self.head_offset, self.total_heads,
                                            self.total_kv_heads))

    def block_mask(self, seq_len: int, device=None) -> torch.Tensor:
        """Bool ``[np, NB, NB]``: the block pattern of this rank's local heads at ``seq_len`` tokens, exactly as
        forward passes it to the kernels (for tests: it must equal ``layout.block_mask(total heads)[rank's heads]``)."""
        return self.layout.block_mask(self.num_heads, seq_len, num_kv_heads=self.num_kv_heads,
                                      head_offset=self.head_offset, total_heads=self.total_heads,
                                      total_kv_heads=self.total_kv_heads, device=device)

    def extra_repr(self) -> str:
        name = "dense" if self.layout.is_dense else getattr(self.layout, "name", type(self.layout).__name__)
        return (f"layer_number={self.layer_number}, layout={name}, heads={self.num_heads}/{self.total_heads} from "
                f"{self.head_offset}, kv_heads={self.num_kv_heads}/{self.total_kv_heads}, "
                f"backend={self.attention_backend}")

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                attention_mask: Optional[torch.Tensor], attn_mask_type: Optional[AttnMaskType] = None,
                attention_bias: Optional[torch.Tensor] = None, packed_seq_params=None, **kwargs) -> torch.Tensor:
        """sbhd: query ``[sq, b, np, hn]``, key/value ``[sk, b, ng, hn]`` -> ``[sq, b, np*hn]``.
        thd (``packed_seq_params.qkv_format == 'thd'``): ``[t, np, hn]`` / ``[t, ng, hn]`` -> ``[t, np*hn]``, with
        positions restarting at each ``cu_seqlens_q`` (``_padded`` when given) boundary.

        ``attention_mask`` must be None (causal) or a causal bool mask (True = masked). Raises ValueError for a
        non-causal mask or mask type, an attention bias, or packed params it cannot honour."""
        if attention_bias is not None:
            raise ValueError("S2CoreAttention does not support attention_bias")
        if attn_mask_type is not None and attn_mask_type not in _CAUSAL_TYPES:
            raise ValueError(f"S2CoreAttention computes causal attention only, got attn_mask_type={attn_mask_type}")
        heads = dict(head_offset=self.head_offset, total_heads=self.total_heads, total_kv_heads=self.total_kv_heads)
        if packed_seq_params is not None:
            cu_seqlens, max_seqlen = _packed_boundaries(packed_seq_params)
            if attention_mask is not None:
                raise ValueError("S2CoreAttention: pass attention_mask=None with packed (thd) sequences; the "
                                 "sequence boundaries come from packed_seq_params")
            if query.dim() != 3:
                raise ValueError(f"packed (thd) query must be [t, np, hn], got {tuple(query.shape)}")
            out = s2_attention(query, key, value, self.layout, sm_scale=self.softmax_scale, cu_seqlens=cu_seqlens,
                               max_seqlen=max_seqlen, backend=self.attention_backend, **heads)
            return out.reshape(out.shape[0], -1)
        if query.dim() != 4:
            raise ValueError(f"query must be [sq, b, np, hn], got {tuple(query.shape)}")
        if attention_mask is not None:
            self._check_causal_mask(attention_mask, query.shape[0], key.shape[0])
        # [s, b, h, d] -> [b, s, h, d]: a view; the kernels take strided inputs.
        out = s2_attention(query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1), self.layout,
                           sm_scale=self.softmax_scale, backend=self.attention_backend, **heads)
        return out.transpose(0, 1).reshape(query.shape[0], query.shape[1], -1)

    def _check_causal_mask(self, mask: torch.Tensor, sq: int, sk: int) -> None:
        """A mask must be the causal one (True above the diagonal)."""
        key = ("mask", _tensor_key(mask))
        if key in _VERIFIED:
            return
        if mask.dtype != torch.bool or mask.dim() != 4 or tuple(mask.shape[-2:]) != (sq, sk):
            raise ValueError(f"attention_mask must be a bool [b, 1, {sq}, {sk}] causal mask (True = masked) or None, "
                             f"got {mask.dtype} {tuple(mask.shape)}")
        causal = torch.ones(sq, sk, dtype=torch.bool, device=mask.device).triu(diagonal=sk - sq + 1)
        if not bool(torch.equal(mask, causal.expand_as(mask))):
            raise ValueError("S2CoreAttention supports causal attention only, but attention_mask is not the causal "
                             "mask (document masks: use packed sequences with packed_seq_params; otherwise pass "
                             "attention_mask=None)")
        _remember(key, mask)

    def sharded_state_dict(self, prefix: str = "", sharded_offsets=(), metadata=None) -> ShardedStateDict:
        """No parameters and no state: the layout is configuration, not checkpointed."""
        return {}


def _check_supported(config, attn_mask_type, attention_type, attention_dropout, pg_collection) -> None:
    cp = config.context_parallel_size
    cp_group = getattr(pg_collection, "cp", None) if pg_collection is not None else None
    if cp != 1 or (cp_group is not None and cp_group.size() != 1):
        raise ValueError(f"S2CoreAttention does not support context parallelism (context_parallel_size={cp}); "
                         "set parallel.cp=1")
    if attention_type != "self":
        raise ValueError(f"S2CoreAttention implements self attention only, got attention_type={attention_type!r}")
    if attn_mask_type not in _CAUSAL_TYPES:
        raise ValueError(f"S2CoreAttention computes causal attention only, got attn_mask_type={attn_mask_type}")
    dropout = config.attention_dropout if attention_dropout is None else attention_dropout
    if dropout:
        raise ValueError(f"S2CoreAttention has no attention dropout, got attention_dropout={dropout}; set "
                         "model.attention_dropout=0.0")
    if getattr(config, "softmax_type", "vanilla") != "vanilla":
        raise ValueError(f"S2CoreAttention supports softmax_type='vanilla' only, got {config.softmax_type!r}")
    if getattr(config, "window_size", None) is not None:
        raise ValueError(f"S2CoreAttention does not support window_size={config.window_size}; express local "
                         "windows with the sparsity layout (local_blocks)")


def _packed_boundaries(params):
    """(cu_seqlens, max_seqlen) for self attention over packed sequences; raises ValueError otherwise."""
    if getattr(params, "qkv_format", None) != "thd":
        raise ValueError(f"packed_seq_params.qkv_format={getattr(params, 'qkv_format', None)!r} is not supported; "
                         "valid: 'thd'")
    cp_group = getattr(params, "cp_group", None)
    if (cp_group is not None and cp_group.size() > 1) or (getattr(params, "local_cp_size", None) or 1) > 1:
        raise ValueError("S2CoreAttention does not support context parallelism in packed_seq_params")
    padded = getattr(params, "cu_seqlens_q_padded", None)
    cu_q = padded if padded is not None else params.cu_seqlens_q
    padded_kv = getattr(params, "cu_seqlens_kv_padded", None)
    cu_kv = padded_kv if padded_kv is not None else params.cu_seqlens_kv
    if cu_q is None:
        raise ValueError("packed_seq_params.cu_seqlens_q is required for thd input")
    if cu_kv is not None and cu_kv is not cu_q:
        key = ("cu_seqlens", _tensor_key(cu_q), _tensor_key(cu_kv))
        if key not in _VERIFIED:
            if cu_kv.shape != cu_q.shape or not torch.equal(cu_kv, cu_q):
                raise ValueError("S2CoreAttention is self attention: cu_seqlens_kv must equal cu_seqlens_q")
            _remember(key, cu_q, cu_kv)
    max_seqlen = params.max_seqlen_q
    # With padded boundaries the longest padded segment can exceed max_seqlen_q: let the op measure it.
    return cu_q.to(torch.int32), (None if padded is not None else max_seqlen)
