"""Global views of a tensor/pipeline-parallel GPT model's parameters: global names, gather and shard.

A parameter's global name replaces the stage-local layer index with the global one
(``decoder.layers.<layer_number - 1>``), so the same name means the same tensor for every tp/pp/vpp split.
Tensor-parallel shards follow megatron's layout: ``partition_dim`` split into ``tp * partition_stride``
contiguous pieces, rank r holding pieces ``r, r + tp, ...`` (stride 2 is SwiGLU's ``[gate, up]``).
Used by the parallel-equivalence tests (CPU and GPU) and by tools that compare or export weights.
"""
from __future__ import annotations

import re
from typing import Dict, Iterator, Tuple

import torch

_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.")


def unwrap(model):
    """The GPTModel inside megatron's DDP / Float16Module wrappers."""
    while hasattr(model, "module"):
        model = model.module
    return model


def named_global_parameters(model) -> Iterator[Tuple[str, torch.nn.Parameter]]:
    """``(global_name, param)`` for the parameters of one model chunk (wrappers are looked through)."""
    gpt = unwrap(model)
    layers = gpt.decoder.layers
    for name, param in gpt.named_parameters():
        match = _LAYER.match(name)
        if match:
            layer_number = layers[int(match.group(1))].layer_number
            name = f"decoder.layers.{layer_number - 1}." + name[match.end():]
        yield name, param


def _tp_layout(param) -> Tuple[bool, int, int]:
    parallel = bool(getattr(param, "tensor_model_parallel", False)) and getattr(param, "partition_dim", -1) >= 0
    return parallel, getattr(param, "partition_dim", -1), getattr(param, "partition_stride", 1)


def gather_tp(param, tensor: torch.Tensor, tp_group) -> torch.Tensor:
    """The full (TP-gathered) tensor of ``tensor``, a local shard laid out like ``param``. Collective over
    ``tp_group``; tensors of replicated parameters are returned as they are."""
    parallel, dim, stride = _tp_layout(param)
    size = torch.distributed.get_world_size(tp_group) if tp_group is not None else 1
    if not parallel or size == 1:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(size)]
    torch.distributed.all_gather(parts, tensor.contiguous(), group=tp_group)
    pieces = [p.chunk(stride, dim=dim) for p in parts]                 # pieces[rank][s]
    return torch.cat([pieces[r][s] for s in range(stride) for r in range(size)], dim=dim)


def shard_tp(param, full: torch.Tensor, tp_rank: int, tp_size: int) -> torch.Tensor:
    """This rank's shard of the full tensor ``full`` for ``param`` (the inverse of :func:`gather_tp`)."""
    parallel, dim, stride = _tp_layout(param)
    if not parallel or tp_size == 1:
        return full
    pieces = full.chunk(tp_size * stride, dim=dim)
    return torch.cat([pieces[s * tp_size + tp_rank] for s in range(stride)], dim=dim)


def full_state(model_chunks, tp_group, *, grads: bool = False) -> Dict[str, torch.Tensor]:
    """``{global_name: full tensor}`` of this pipeline stage's chunks (values, or with ``grads`` the DDP
    ``main_grad`` / ``grad``). Collective over ``tp_group``. Copies on the CPU in float32 (float64 stays)."""
    out = {}
    for chunk in model_chunks:
        for name, param in named_global_parameters(chunk):
            if grads:
                tensor = getattr(param, "main_grad", None)
                tensor = param.grad if tensor is None else tensor
                if tensor is None:
                    tensor = torch.zeros_like(param)
            else:
                tensor = param.detach()
            full = gather_tp(param, tensor, tp_group).detach()
            dtype = torch.float64 if full.dtype == torch.float64 else torch.float32
            # clone: DDP's grads/params are views of one flat buffer, which pickling would copy whole
            out[name] = full.to("cpu", dtype).clone()
    return out


@torch.no_grad()
def load_full_state(model_chunks, state: Dict[str, torch.Tensor], tp_rank: int, tp_size: int) -> int:
    """Copy full tensors (by global name) into this rank's shards; returns how many parameters were set.
    Raises KeyError for a parameter missing from ``state`` (a tied output weight on the last pipeline stage
    falls back to the embedding's)."""
    count = 0
    for chunk in model_chunks:
        for name, param in named_global_parameters(chunk):
            if name not in state and name == "output_layer.weight":
                name = "embedding.word_embeddings.weight"  # tied embeddings: the last stage's copy
            full = state[name]
            param.copy_(shard_tp(param, full, tp_rank, tp_size).to(param.dtype))
            count += 1
    return count
