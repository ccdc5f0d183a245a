"""Layer and block specs: megatron-core's GPT layer with S2 core attention plugged into its spec seam.

Design: every layer of a stage shares ONE layer spec whose core attention is built with the whole
:class:`LayerSchedule` and picks its layout from megatron's global 1-based ``layer_number``. Megatron already
computes that number for every pipeline / virtual-pipeline / uneven split (``get_transformer_layer_offset``), so
the layout follows the layer wherever it lands and no offset arithmetic is repeated here; and since dense and
sparse layers are the same class, layers stay homogeneous for distributed checkpoints.

Module choice: Transformer Engine linears and norms when ``config.transformer_impl == "transformer_engine"``;
otherwise megatron's local linears with our sequence-parallel-capable torch norms (:mod:`.norms`), or apex's
fused LayerNorm when ``norm_impl="apex"``. The core attention is always :class:`S2CoreAttention`.
"""
from __future__ import annotations

import importlib.util
from typing import Optional

import torch
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build

from ..sparsity import LayerSchedule
from .core_attention import S2CoreAttention
from .norms import S2Norm

def _parse_choice(name: str, value) -> object:
    """``auto``, True or False (Hydra may hand over the strings 'true'/'false')."""
    if isinstance(value, str):
        value = {"true": True, "false": False, "auto": "auto"}.get(value.lower(), value)
    if value is True or value is False or value == "auto":
        return value
    raise ValueError(f"parallel.{name}={value!r} is invalid; valid: auto, true, false")


def te_importable() -> bool:
    return importlib.util.find_spec("transformer_engine") is not None


def apex_importable() -> bool:
    # PyPI's "apex" is an unrelated package: require apex's fused layer norm extension too.
    return importlib.util.find_spec("apex") is not None and importlib.util.find_spec("fused_layer_norm_cuda") is not None


def resolve_use_te(value="auto") -> bool:
    """``auto``: Transformer Engine when importable and CUDA is available. ``true`` without TE raises ValueError."""
    value = _parse_choice("use_te", value)
    if value == "auto":
        return te_importable() and torch.cuda.is_available()
    if value and not (te_importable() and torch.cuda.is_available()):
        raise ValueError("parallel.use_te=true needs transformer_engine and CUDA; set parallel.use_te=auto or false")
    return bool(value)


def resolve_use_apex(value="auto") -> bool:
    """``auto``: apex when its fused layer norm is importable and CUDA is available. ``true`` without it raises."""
    value = _parse_choice("use_apex", value)
    if value == "auto":
        return apex_importable() and torch.cuda.is_available()
    if value and not (apex_importable() and torch.cuda.is_available()):
        raise ValueError("parallel.use_apex=true needs NVIDIA apex (fused_layer_norm_cuda) and CUDA; set "
                         "parallel.use_apex=auto or false")
    return bool(value)


def norm_impl_of(config) -> str:
    """``te``, ``apex`` or ``torch``: how this config's norms are built (set by transformer_config_from_cfg)."""
    if config.transformer_impl == "transformer_engine":
        return "te"
    return getattr(config, "s2_norm_impl", "torch")


def core_attention_spec(config, schedule: LayerSchedule, *, attention_backend: str = "auto") -> ModuleSpec:
    """The ``core_attention`` entry: :class:`S2CoreAttention` with the schedule, backend and the model's real
    ``num_query_groups`` (megatron hands core attention a config raised to the TP size when it is smaller)."""
    if schedule.num_layers != config.num_layers:
        raise ValueError(f"the layer schedule covers {schedule.num_layers} layers but config.num_layers="
                         f"{config.num_layers}")
    return ModuleSpec(module=S2CoreAttention, params=dict(layer_schedule=schedule, attention_backend=attention_backend,
                                                          num_query_groups=config.num_query_groups))


def _norm_class(config):
    impl = norm_impl_of(config)
    if impl == "apex" and config.normalization == "LayerNorm":
        from megatron.core.fusions.fused_layer_norm import FusedLayerNorm
        return FusedLayerNorm
    return S2Norm  # apex's megatron wrapper has no RMSNorm: ours serves it


def get_s2_layer_spec(config, schedule: LayerSchedule, *, attention_backend: str = "auto") -> ModuleSpec:
    """A ``TransformerLayer`` spec (GPT: pre-norm, self attention, MLP) with S2 core attention. Dense MLP only.
    Raises ValueError for a schedule of the wrong length or qk layernorm (not wired here)."""
    if getattr(config, "qk_layernorm", False):
        raise ValueError("qk_layernorm is not supported by the S2 layer spec")
    from megatron.core.models.gpt import gpt_layer_specs as gls
    if norm_impl_of(config) == "te":
        spec = gls.get_gpt_layer_with_transformer_engine_spec(qk_layernorm=False)
    else:
        spec = gls.get_gpt_layer_local_spec(qk_layernorm=False, normalization=config.normalization)
        norm = _norm_class(config)
        spec.submodules.input_layernorm = norm
        spec.submodules.pre_mlp_layernorm = norm
    spec.submodules.self_attention.submodules.core_attention = core_attention_spec(
        config, schedule, attention_backend=attention_backend)
    return spec


def get_s2_block_spec(config, schedule: LayerSchedule, *, attention_backend: str = "auto",
                      vp_stage: Optional[int] = None, pp_rank: Optional[int] = None) -> TransformerBlockSubmodules:
    """``TransformerBlockSubmodules`` for this pipeline stage (and virtual stage ``vp_stage``): one layer spec per
    local layer plus the final norm. ``pp_rank`` defaults to megatron's parallel_state."""
    layer = get_s2_layer_spec(config, schedule, attention_backend=attention_backend)
    num_local = get_num_layers_to_build(config, vp_stage=vp_stage, pp_rank=pp_rank)
    if norm_impl_of(config) == "te":
        from megatron.core.extensions.transformer_engine import TENorm
        final_norm = TENorm
    else:
        final_norm = _norm_class(config)
    return TransformerBlockSubmodules(layer_specs=[layer] * num_local, layer_norm=final_norm)
