"""The S2 GPT model: megatron-core's GPTModel over the S2 block spec."""
from __future__ import annotations

from typing import Mapping, Optional

import torch
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel

from ..sparsity import LayerSchedule
from .config import check_model_cfg
from .specs import get_s2_block_spec

_CONFIG_MATCH = (("num_layers", "num_layers"), ("hidden_size", "hidden_size"),
                 ("num_attention_heads", "num_attention_heads"), ("ffn_hidden_size", "ffn_hidden_size"),
                 ("kv_channels", "kv_channels"), ("normalization", "normalization"))


def padded_vocab_size(vocab_size: int, make_vocab_size_divisible_by: int, tp: int) -> int:
    """Vocabulary rounded up to a multiple of ``make_vocab_size_divisible_by * tp`` (the embedding is split over
    TP ranks; the extra rows are never targets)."""
    if vocab_size < 1:
        raise ValueError(f"vocab_size={vocab_size} is invalid; valid: >= 1")
    multiple = make_vocab_size_divisible_by * tp
    return -(-vocab_size // multiple) * multiple


def build_gpt_model(config, schedule: LayerSchedule, *, vocab_size: int, max_seq_len: int, model_cfg: Mapping,
                    attention_backend: str = "auto", pre_process: Optional[bool] = None,
                    post_process: Optional[bool] = None, vp_stage: Optional[int] = None) -> GPTModel:
    """Build this rank's ``GPTModel`` chunk with S2 core attention in every layer.

    ``config`` from :func:`transformer_config_from_cfg`; ``schedule`` gives each global layer's layout;
    ``vocab_size`` is the tokenizer's (padded here per ``model_cfg.make_vocab_size_divisible_by`` and TP; the
    logits cover the padded size); ``max_seq_len`` sizes learned position embeddings (RoPE ignores it).
    ``pre_process``/``post_process`` default to whether this (virtual) stage is the first/last pipeline stage;
    ``vp_stage`` is the virtual-pipeline chunk index (None without VPP). Requires :func:`initialize_parallel`.
    The model is moved to the current CUDA device when CUDA is available (megatron-core creates some weights on
    the CPU under ``use_cpu_initialization``); bf16/fp16 training wraps it in ``Float16Module`` afterwards.
    Raises ValueError when ``model_cfg`` and ``config`` disagree or the schedule has the wrong length.
    """
    m = check_model_cfg(model_cfg)
    for cfg_key, attr in _CONFIG_MATCH:
        if m[cfg_key] != getattr(config, attr):
            raise ValueError(f"model.{cfg_key}={m[cfg_key]!r} disagrees with the TransformerConfig's {attr}="
                             f"{getattr(config, attr)!r}; build both from the same model config")
    if schedule.num_layers != config.num_layers:
        raise ValueError(f"the layer schedule covers {schedule.num_layers} layers but the model has {config.num_layers}")
    if max_seq_len < 1:
        raise ValueError(f"max_seq_len={max_seq_len} is invalid; valid: >= 1")
    if pre_process is None:
        pre_process = parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage)
    if post_process is None:
        post_process = parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage)
    block_spec = get_s2_block_spec(config, schedule, attention_backend=attention_backend, vp_stage=vp_stage)
    model = GPTModel(
        config=config, transformer_layer_spec=block_spec,
        vocab_size=padded_vocab_size(vocab_size, m["make_vocab_size_divisible_by"], config.tensor_model_parallel_size),
        max_sequence_length=max_seq_len, pre_process=pre_process, post_process=post_process,
        parallel_output=True, share_embeddings_and_output_weights=bool(m["tie_embeddings"]),
        position_embedding_type=m["position_embedding"], rotary_base=int(m["rotary_base"]), vp_stage=vp_stage)
    if torch.cuda.is_available():
        model.cuda(torch.cuda.current_device())
    return model
