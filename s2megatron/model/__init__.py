"""Megatron-Core integration: S2 core attention, layer/block specs, the GPT builder, parallel setup, the CPU
compatibility layer and model FLOPs."""
from .config import check_model_cfg, check_parallel_cfg, transformer_config_from_cfg
from .core_attention import S2CoreAttention
from .cpu_compat import cpu_compat_active, install_cpu_compat
from .flops import matmul_params, num_model_flops_per_token
from .gpt import build_gpt_model, padded_vocab_size
from .norms import S2LayerNorm, S2Norm, S2RMSNorm
from .parallel import destroy_parallel, initialize_parallel
from .specs import core_attention_spec, get_s2_block_spec, get_s2_layer_spec

__all__ = ["S2CoreAttention", "S2LayerNorm", "S2Norm", "S2RMSNorm", "build_gpt_model", "check_model_cfg",
           "check_parallel_cfg", "core_attention_spec", "cpu_compat_active", "destroy_parallel", "get_s2_block_spec",
           "get_s2_layer_spec", "initialize_parallel", "install_cpu_compat", "matmul_params",
           "num_model_flops_per_token", "padded_vocab_size", "transformer_config_from_cfg"]
