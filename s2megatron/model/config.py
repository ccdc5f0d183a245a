"""Model / parallel configuration (the Hydra ``model`` and ``parallel`` groups) -> megatron-core TransformerConfig."""
from __future__ import annotations

from typing import Mapping, Optional

import torch
import torch.nn.functional as F
from megatron.core.transformer.transformer_config import TransformerConfig

from .rope import install_rope_fusion
from .swiglu import install_swiglu_fusion
from .specs import resolve_use_apex, resolve_use_te

MODEL_KEYS = ("num_layers", "hidden_size", "num_attention_heads", "num_query_groups", "ffn_hidden_size", "kv_channels",
              "normalization", "activation", "position_embedding", "rotary_base", "tie_embeddings", "add_bias_linear",
              "hidden_dropout", "attention_dropout", "init_method_std", "make_vocab_size_divisible_by",
              "norm_epsilon")
PARALLEL_KEYS = ("tp", "pp", "vpp", "sp", "cp", "distributed_optimizer", "use_te", "use_apex")
PRECISIONS = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
RECOMPUTE = (None, "selective", "full")
NORMALIZATIONS = ("RMSNorm", "LayerNorm")
ACTIVATIONS = ("swiglu", "gelu")
POSITION_EMBEDDINGS = ("rope", "learned_absolute")


def _require(cfg: Mapping, keys, group: str) -> None:
    missing = [k for k in keys if k not in cfg]
    if missing:
        raise ValueError(f"{group} config is missing key(s) {missing}; required: {list(keys)}")


def _positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}={value!r} is invalid; valid: an integer >= 1")
    return value


def check_model_cfg(model_cfg: Mapping) -> dict:
    """Validate the ``model`` group; returns a plain dict with ``num_query_groups``/``kv_channels`` resolved.
    Raises ValueError naming the bad key."""
    _require(model_cfg, MODEL_KEYS, "model")
    m = {k: model_cfg[k] for k in MODEL_KEYS}
    for key in ("num_layers", "hidden_size", "num_attention_heads", "ffn_hidden_size", "make_vocab_size_divisible_by"):
        _positive_int(m[key], f"model.{key}")
    heads = m["num_attention_heads"]
    m["num_query_groups"] = heads if m["num_query_groups"] is None else _positive_int(m["num_query_groups"],
                                                                                        "model.num_query_groups")
    if heads % m["num_query_groups"]:
        raise ValueError(f"model.num_attention_heads={heads} must be a multiple of model.num_query_groups="
                         f"{m['num_query_groups']}")
    if m["kv_channels"] is None:
        if m["hidden_size"] % heads:
            raise ValueError(f"model.hidden_size={m['hidden_size']} is not divisible by model.num_attention_heads="
                             f"{heads}; set model.kv_channels")
        m["kv_channels"] = m["hidden_size"] // heads
    _positive_int(m["kv_channels"], "model.kv_channels")
    for key, valid in (("normalization", NORMALIZATIONS), ("activation", ACTIVATIONS),
                       ("position_embedding", POSITION_EMBEDDINGS)):
        if m[key] not in valid:
            raise ValueError(f"model.{key}={m[key]!r} is invalid; valid: {list(valid)}")
    for key in ("hidden_dropout", "attention_dropout"):
        if not 0.0 <= float(m[key]) < 1.0:
            raise ValueError(f"model.{key}={m[key]!r} is invalid; valid: 0 <= p < 1")
    if float(m["attention_dropout"]) != 0.0:
        raise ValueError(f"model.attention_dropout={m['attention_dropout']} is not supported: S2 attention kernels "
                         "have no attention dropout; set it to 0.0")
    if not float(m["init_method_std"]) > 0 or not float(m["norm_epsilon"]) > 0:
        raise ValueError("model.init_method_std and model.norm_epsilon must be > 0")
    if not float(m["rotary_base"]) > 0:
        raise ValueError(f"model.rotary_base={m['rotary_base']!r} is invalid; valid: > 0")
    return m


def check_parallel_cfg(parallel_cfg: Mapping, model: Mapping) -> dict:
    """Validate the ``parallel`` group against the (checked) model; returns a plain dict. Raises ValueError."""
    _require(parallel_cfg, PARALLEL_KEYS, "parallel")
    p = {k: parallel_cfg[k] for k in PARALLEL_KEYS}
    tp, pp = _positive_int(p["tp"], "parallel.tp"), _positive_int(p["pp"], "parallel.pp")
    if p["cp"] != 1:
        raise ValueError(f"parallel.cp={p['cp']!r} is not supported: S2 attention has no context parallelism; "
                         "set parallel.cp=1")
    heads, groups, layers = model["num_attention_heads"], model["num_query_groups"], model["num_layers"]
    if heads % tp:
        raise ValueError(f"parallel.tp={tp} must divide model.num_attention_heads={heads}")
    if groups % tp and tp % groups:
        raise ValueError(f"parallel.tp={tp} and model.num_query_groups={groups}: one must divide the other")
    if model["ffn_hidden_size"] % tp:
        raise ValueError(f"parallel.tp={tp} must divide model.ffn_hidden_size={model['ffn_hidden_size']}")
    if not isinstance(p["sp"], bool):
        raise ValueError(f"parallel.sp={p['sp']!r} is invalid; valid: true or false")
    if p["sp"] and tp == 1:
        raise ValueError("parallel.sp=true needs parallel.tp > 1 (sequence parallelism splits the tensor-parallel "
                         "group's activations)")
    vpp = p["vpp"]
    if vpp is not None:
        _positive_int(vpp, "parallel.vpp")
        if pp == 1:
            raise ValueError("parallel.vpp needs parallel.pp > 1")
    stages = pp * (vpp or 1)
    if layers % stages:
        raise ValueError(f"model.num_layers={layers} must be divisible by parallel.pp * parallel.vpp = {stages}")
    return p


def _fusion_flags(fusions: bool, m: Mapping) -> dict:
    """TransformerConfig fusion fields for the checked model ``m``."""
    if not fusions:
        return dict(bias_activation_fusion=False, bias_dropout_fusion=False, apply_rope_fusion=False,
                    cross_entropy_loss_fusion=False)
    # megatron fuses SwiGLU, and GeLU only together with its bias
    activation = m["activation"] == "swiglu" or bool(m["add_bias_linear"])
    rope = m["position_embedding"] == "rope" and install_rope_fusion()
    if m["activation"] == "swiglu":
        install_swiglu_fusion()  # megatron's MLP then runs our Triton SwiGLU (bias-free calls; others stay megatron's)
    return dict(bias_activation_fusion=activation, bias_dropout_fusion=True, apply_rope_fusion=rope,
                cross_entropy_loss_fusion=True, cross_entropy_fusion_impl="native")


def transformer_config_from_cfg(model_cfg: Mapping, parallel_cfg: Mapping, *, precision: str = "bf16",
                                recompute: Optional[str] = None, recompute_num_layers: int = 1,
                                fusions: bool = False, overrides: Optional[Mapping] = None) -> TransformerConfig:
    """A megatron-core ``TransformerConfig`` for the S2 GPT model.

    ``precision``: ``bf16``/``fp16`` (parameters in that dtype; wrap the model in megatron's ``Float16Module``
    and keep fp32 main params in the optimizer) or ``fp32``. ``recompute``: None, ``selective`` (core attention
    only) or ``full`` (``recompute_num_layers`` layers per chunk, uniform). ``overrides``: extra TransformerConfig
    fields set last (e.g. ``use_cpu_initialization``, ``calculate_per_token_loss``).

    ``fusions``: megatron's fused GeLU-with-bias, bias-dropout-add and cross-entropy (generated by torch.compile,
    so for CUDA runs), and our Triton kernels: SwiGLU (:mod:`.swiglu`, megatron's fused one where ours does not
    apply), RoPE (Transformer Engine's when present, else ours, :mod:`.rope`) and RMSNorm (``s2_fused_norm``
    attribute, :mod:`.rmsnorm`); off: plain PyTorch ops everywhere (always correct, no compiler needed).

    Defaults chosen here: ``use_cpu_initialization`` when CUDA is absent (it makes the initial weights identical
    for every tensor-parallel degree); apex/TE-only fusions (gradient accumulation, masked softmax, persistent
    layer norm) off; ``transformer_impl`` from ``parallel.use_te``; the norm implementation (``s2_norm_impl``
    attribute: ``torch``/``apex``/``te``) from ``parallel.use_apex``.
    Raises ValueError naming invalid keys or combinations.
    """
    m = check_model_cfg(model_cfg)
    p = check_parallel_cfg(parallel_cfg, m)
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r} is invalid; valid: {list(PRECISIONS)}")
    if recompute not in RECOMPUTE:
        raise ValueError(f"recompute={recompute!r} is invalid; valid: {list(RECOMPUTE)}")
    _positive_int(recompute_num_layers, "recompute_num_layers")
    use_te = resolve_use_te(p["use_te"])
    use_apex = resolve_use_apex(p["use_apex"]) and not use_te
    dtype = PRECISIONS[precision]
    swiglu = m["activation"] == "swiglu"
    kwargs = dict(
        num_layers=m["num_layers"], hidden_size=m["hidden_size"], num_attention_heads=m["num_attention_heads"],
        num_query_groups=m["num_query_groups"], ffn_hidden_size=m["ffn_hidden_size"], kv_channels=m["kv_channels"],
        normalization=m["normalization"], layernorm_epsilon=float(m["norm_epsilon"]),
        gated_linear_unit=swiglu, activation_func=F.silu if swiglu else F.gelu,
        add_bias_linear=bool(m["add_bias_linear"]), hidden_dropout=float(m["hidden_dropout"]),
        attention_dropout=0.0, init_method_std=float(m["init_method_std"]),
        tensor_model_parallel_size=p["tp"], pipeline_model_parallel_size=p["pp"],
        virtual_pipeline_model_parallel_size=p["vpp"], sequence_parallel=p["sp"], context_parallel_size=1,
        params_dtype=dtype, pipeline_dtype=dtype, bf16=precision == "bf16", fp16=precision == "fp16",
        use_cpu_initialization=not torch.cuda.is_available(),
        transformer_impl="transformer_engine" if use_te else "local",
        # apex/TE-only fusions stay off; the torch.compile / Triton ones follow ``fusions``.
        masked_softmax_fusion=False, gradient_accumulation_fusion=False, persist_layer_norm=False,
        **_fusion_flags(fusions, m),
    )
    if p["vpp"] is not None:
        # Megatron-LM's defaults for the interleaved schedule. Batched p2p puts both directions' messages to the
        # same peer in one batch, which on a 2-stage ring pairs an activation with a gradient of the same shape
        # (seen as wrong gradients over gloo with more micro-batches than stages).
        kwargs.update(overlap_p2p_comm=True, batch_p2p_comm=False)
    if recompute == "selective":
        kwargs.update(recompute_granularity="selective", recompute_modules=["core_attn"])
    elif recompute == "full":
        kwargs.update(recompute_granularity="full", recompute_method="uniform",
                      recompute_num_layers=recompute_num_layers)
    kwargs.update(dict(overrides or {}))
    config = TransformerConfig(**kwargs)
    # Not a TransformerConfig field: how norms are built (read by specs.norm_impl_of).
    config.s2_norm_impl = "te" if use_te else ("apex" if use_apex else "torch")
    config.s2_fused_norm = bool(fusions)  # our RMSNorm runs its Triton kernels (read by norms.S2RMSNorm)
    return config
