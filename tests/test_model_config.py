"""Config presets -> TransformerConfig, the layer spec, the sequence-parallel norms and the FLOPs formula."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from megatron.core.transformer.enums import AttnMaskType

from s2megatron.model import (S2CoreAttention, S2LayerNorm, S2Norm, S2RMSNorm, get_s2_block_spec, get_s2_layer_spec,
                              matmul_params, num_model_flops_per_token, padded_vocab_size,
                              transformer_config_from_cfg)
from s2megatron.sparsity import LayerSchedule

CONF = Path(__file__).resolve().parents[1] / "conf"
MODELS = {p.stem: yaml.safe_load(p.read_text()) for p in sorted((CONF / "model").glob("*.yaml"))}
PARALLELS = {p.stem: yaml.safe_load(p.read_text()) for p in sorted((CONF / "parallel").glob("*.yaml"))
             if "defaults" not in p.read_text()}
SINGLE = PARALLELS["single"]


def test_presets_exist_with_the_contract_shapes():
    assert {"tiny", "125m", "1.3b", "7b"} <= set(MODELS) and "single" in PARALLELS
    shapes = {name: (m["num_layers"], m["hidden_size"], m["num_attention_heads"]) for name, m in MODELS.items()}
    assert shapes["1.3b"] == (24, 2048, 16) and shapes["7b"] == (32, 4096, 32)
    llama = MODELS["7b"]
    assert (llama["ffn_hidden_size"], llama["normalization"], llama["activation"], llama["position_embedding"],
            llama["tie_embeddings"]) == (11008, "RMSNorm", "swiglu", "rope", False)
    assert SINGLE["tp"] == 1 and SINGLE["pp"] == 1
    tiny = MODELS["tiny"]
    assert tiny["num_layers"] % 2 == 0 and tiny["num_attention_heads"] % 2 == 0 and tiny["num_query_groups"] % 2 == 0


@pytest.mark.parametrize("model", sorted(MODELS))
@pytest.mark.parametrize("parallel", sorted(PARALLELS))
def test_every_preset_pair_builds_or_names_the_conflict(model, parallel):
    m, p = MODELS[model], PARALLELS[parallel]
    fits = m["num_attention_heads"] % p["tp"] == 0 and m["num_layers"] % (p["pp"] * (p["vpp"] or 1)) == 0
    if not fits:
        with pytest.raises(ValueError, match="parallel"):
            transformer_config_from_cfg(m, p, precision="bf16")
        return
    config = transformer_config_from_cfg(m, p, precision="bf16")
    assert (config.num_layers, config.hidden_size, config.num_attention_heads) == (
        m["num_layers"], m["hidden_size"], m["num_attention_heads"])
    assert config.num_query_groups == (m["num_query_groups"] or m["num_attention_heads"])
    assert config.kv_channels == (m["kv_channels"] or m["hidden_size"] // m["num_attention_heads"])
    assert (config.tensor_model_parallel_size, config.pipeline_model_parallel_size, config.sequence_parallel) == (
        p["tp"], p["pp"], p["sp"])
    assert config.params_dtype == torch.bfloat16 and config.bf16 and config.pipeline_dtype == torch.bfloat16


def test_tiny_config_fields():
    config = transformer_config_from_cfg(MODELS["tiny"], SINGLE, precision="fp32", recompute="selective")
    assert config.gated_linear_unit and config.activation_func is F.silu and config.normalization == "RMSNorm"
    assert config.attention_dropout == 0.0 and config.context_parallel_size == 1
    assert config.params_dtype == torch.float32 and not config.bf16 and not config.fp16
    assert config.use_cpu_initialization == (not torch.cuda.is_available())
    assert not (config.bias_activation_fusion or config.bias_dropout_fusion or config.gradient_accumulation_fusion
                or config.apply_rope_fusion or config.persist_layer_norm)
    assert config.transformer_impl == "local" and config.s2_norm_impl == "torch"
    assert config.recompute_granularity == "selective" and config.recompute_modules == ["core_attn"]
    gelu = transformer_config_from_cfg(dict(MODELS["tiny"], activation="gelu", normalization="LayerNorm"), SINGLE,
                                       precision="fp16", recompute="full", recompute_num_layers=2)
    assert not gelu.gated_linear_unit and gelu.activation_func is F.gelu and gelu.fp16
    assert (gelu.recompute_granularity, gelu.recompute_method, gelu.recompute_num_layers) == ("full", "uniform", 2)
    # the interleaved schedule gets Megatron-LM's p2p settings (batched p2p mismatches messages on 2 stages)
    vpp = transformer_config_from_cfg(MODELS["tiny"], dict(SINGLE, pp=2, vpp=2), precision="fp32")
    assert vpp.overlap_p2p_comm and not vpp.batch_p2p_comm and vpp.virtual_pipeline_model_parallel_size == 2


def test_fusions_turn_on_megatron_fusions_and_our_rope():
    from megatron.core.models.common.embeddings import rope_utils

    from s2megatron.model import rope
    config = transformer_config_from_cfg(MODELS["tiny"], SINGLE, precision="fp32", fusions=True)
    assert config.bias_activation_fusion and config.bias_dropout_fusion and config.apply_rope_fusion
    assert config.cross_entropy_loss_fusion and config.cross_entropy_fusion_impl == "native"
    assert not (config.gradient_accumulation_fusion or config.masked_softmax_fusion or config.persist_layer_norm)
    # without Transformer Engine megatron's fused-RoPE hook is ours
    assert rope_utils.fused_apply_rotary_pos_emb is rope.fused_apply_rotary_pos_emb
    # GeLU is fused by megatron only together with its bias; learned positions have no RoPE to fuse
    gelu = transformer_config_from_cfg(dict(MODELS["tiny"], activation="gelu", position_embedding="learned_absolute"),
                                       SINGLE, precision="fp32", fusions=True)
    assert not gelu.bias_activation_fusion and not gelu.apply_rope_fusion and gelu.bias_dropout_fusion
    biased = transformer_config_from_cfg(dict(MODELS["tiny"], activation="gelu", add_bias_linear=True), SINGLE,
                                         precision="fp32", fusions=True)
    assert biased.bias_activation_fusion


BAD = [
    (dict(), dict(cp=2), "parallel.cp=2"),
    (dict(), dict(tp=1, sp=True), "parallel.sp=true needs parallel.tp > 1"),
    (dict(), dict(tp=8), "parallel.tp=8 must divide model.num_attention_heads=4"),
    (dict(), dict(vpp=2), "parallel.vpp needs parallel.pp > 1"),
    (dict(), dict(pp=2, vpp=4), "divisible by parallel.pp"),
    (dict(num_query_groups=3), dict(), "multiple of model.num_query_groups=3"),
    (dict(attention_dropout=0.1), dict(), "attention_dropout=0.1"),
    (dict(normalization="BatchNorm"), dict(), "model.normalization='BatchNorm'"),
    (dict(activation="relu"), dict(), "model.activation='relu'"),
    (dict(num_layers=0), dict(), "model.num_layers=0"),
    (dict(), dict(use_te=True), "use_te=true"),
    (dict(), dict(use_apex="true"), "use_apex=true"),
    (dict(), dict(use_te="maybe"), "parallel.use_te='maybe'"),
]


@pytest.mark.parametrize("model_change,parallel_change,match", BAD)
def test_bad_configs_are_named(model_change, parallel_change, match):
    with pytest.raises(ValueError, match=match.replace("(", r"\(").replace(".", r"\.")):
        transformer_config_from_cfg(dict(MODELS["tiny"], **model_change), dict(SINGLE, **parallel_change))


def test_missing_keys_and_bad_arguments_are_named():
    missing = {k: v for k, v in MODELS["tiny"].items() if k != "rotary_base"}
    with pytest.raises(ValueError, match="rotary_base"):
        transformer_config_from_cfg(missing, SINGLE)
    with pytest.raises(ValueError, match="precision"):
        transformer_config_from_cfg(MODELS["tiny"], SINGLE, precision="fp8")
    with pytest.raises(ValueError, match="recompute"):
        transformer_config_from_cfg(MODELS["tiny"], SINGLE, recompute="some")


def test_layer_spec_plugs_s2_attention_and_sp_norms():
    config = transformer_config_from_cfg(MODELS["tiny"], dict(SINGLE, tp=2, sp=True), precision="fp32")
    schedule = LayerSchedule.from_config({"default": "dense"}, config.num_layers)
    spec = get_s2_layer_spec(config, schedule, attention_backend="reference")
    core = spec.submodules.self_attention.submodules.core_attention
    assert core.module is S2CoreAttention
    assert core.params == dict(layer_schedule=schedule, attention_backend="reference", num_query_groups=2)
    assert spec.submodules.input_layernorm is S2Norm and spec.submodules.pre_mlp_layernorm is S2Norm
    assert spec.submodules.self_attention.params["attn_mask_type"] == AttnMaskType.causal
    # local-spec checkpoints keep TE key names for the norms
    assert spec.submodules.sharded_state_dict_keys_map["input_layernorm."] == "self_attention.linear_qkv.layer_norm_"
    block = get_s2_block_spec(config, schedule, pp_rank=0)
    assert len(block.layer_specs) == config.num_layers and block.layer_norm is S2Norm
    with pytest.raises(ValueError, match="covers 2 layers"):
        get_s2_layer_spec(config, LayerSchedule.from_config({"default": "dense"}, 2))


def test_apex_norm_only_where_apex_has_one():
    """With parallel.use_apex resolved true, LayerNorm uses apex's fused norm; RMSNorm (no apex norm in megatron's
    wrapper) keeps the torch one. (Transformer Engine specs need TE installed and are not built here.)"""
    from megatron.core.fusions.fused_layer_norm import FusedLayerNorm
    schedule = LayerSchedule.from_config({"default": "dense"}, 4)
    for normalization, want in (("LayerNorm", FusedLayerNorm), ("RMSNorm", S2Norm)):
        config = transformer_config_from_cfg(dict(MODELS["tiny"], normalization=normalization), SINGLE)
        config.s2_norm_impl = "apex"
        spec = get_s2_layer_spec(config, schedule)
        assert spec.submodules.input_layernorm is want and spec.submodules.pre_mlp_layernorm is want
        assert get_s2_block_spec(config, schedule, pp_rank=0).layer_norm is want


@pytest.mark.parametrize("normalization,cls,ref", [("RMSNorm", S2RMSNorm, F.rms_norm), ("LayerNorm", S2LayerNorm, F.layer_norm)])
@pytest.mark.parametrize("sp", [False, True])
def test_norms_compute_the_norm_and_tag_sequence_parallel(normalization, cls, ref, sp):
    par = dict(SINGLE, tp=2, sp=True) if sp else SINGLE
    config = transformer_config_from_cfg(dict(MODELS["tiny"], normalization=normalization), par, precision="fp32")
    norm = S2Norm(config, hidden_size=128, eps=1e-5)
    assert isinstance(norm, cls)
    assert all(getattr(p, "sequence_parallel", None) is sp for p in norm.parameters())
    with torch.no_grad():
        for p in norm.parameters():
            p.normal_()
    x = torch.randn(5, 2, 128)
    torch.testing.assert_close(norm(x), ref(x, (128,), *norm.parameters(), eps=1e-5) if normalization == "LayerNorm"
                               else ref(x, (128,), norm.weight, eps=1e-5))


def test_matmul_params_and_flops_per_token():
    # Llama-2-7B: 6,738,415,616 parameters = 2 x 32000 x 4096 embeddings + 65 x 4096 norm weights + the matmuls
    llama = MODELS["7b"]
    assert matmul_params(llama) == 6_738_415_616 - 2 * 32000 * 4096 - 65 * 4096
    assert matmul_params(llama, vocab_size=32000) == matmul_params(llama) + 32000 * 4096
    seq = 4096
    flops = num_model_flops_per_token(llama, seq, vocab_size=32000)
    attention = 3 * 32 * (2 * 2 * seq * 4096 / 2)  # fwd+bwd, QK^T and PV over seq/2 keys on average
    assert flops == 6 * matmul_params(llama, vocab_size=32000) + attention
    assert math.isclose(flops, 42.86e9, rel_tol=1e-3)  # 6N = 39.64e9 plus 3.22e9 attention at 4k tokens
    gqa = dict(MODELS["tiny"])
    h, d = 128, 32
    assert matmul_params(gqa) == 4 * (h * 4 * d + 2 * h * 2 * d + 4 * d * h + 3 * h * 384)
    with pytest.raises(ValueError, match="seq_len"):
        num_model_flops_per_token(llama, 0)


def test_padded_vocab_size():
    assert padded_vocab_size(32000, 128, 1) == 32000
    assert padded_vocab_size(32000, 128, 8) == 32768
    assert padded_vocab_size(250, 32, 2) == 256
    with pytest.raises(ValueError):
        padded_vocab_size(0, 128, 1)
