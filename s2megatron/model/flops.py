"""Model FLOPs per trained token (for MFU): the standard 6*N plus causal dense attention."""
from __future__ import annotations

from typing import Mapping, Optional

from .config import check_model_cfg


def matmul_params(model_cfg: Mapping, vocab_size: Optional[int] = None) -> int:
    """Parameters that take part in a matmul per token: q/k/v/output projections and MLP of every layer, plus the
    LM head (``vocab_size * hidden``) when ``vocab_size`` is given. Norms, biases and the embedding lookup are
    left out (they are not matmuls)."""
    m = check_model_cfg(model_cfg)
    h, d = m["hidden_size"], m["kv_channels"]
    q_width, kv_width = m["num_attention_heads"] * d, m["num_query_groups"] * d
    attention = h * q_width + 2 * h * kv_width + q_width * h
    up = 2 if m["activation"] == "swiglu" else 1                      # SwiGLU: gate and up projections
    mlp = (up + 1) * h * m["ffn_hidden_size"]
    head = vocab_size * h if vocab_size else 0
    return m["num_layers"] * (attention + mlp) + head


def num_model_flops_per_token(model_cfg: Mapping, seq_len: int, *, vocab_size: Optional[int] = None) -> float:
    """Training FLOPs per token (forward + backward = 3x forward):

    ``6 * N + 6 * num_layers * seq_len * num_attention_heads * kv_channels``

    with N from :func:`matmul_params`. The attention term is dense causal attention: per token and layer the
    forward computes ``QK^T`` and ``PV`` over seq_len/2 keys on average, ``2 * 2 * seq_len * (heads * kv_channels)
    / 2`` FLOPs. Every sparsity variant is counted as dense, so MFU compares layouts at equal useful work (a
    sparse model's MFU above the dense one's is time saved). Raises ValueError for a bad config or seq_len.
    """
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
        raise ValueError(f"seq_len={seq_len!r} is invalid; valid: an integer >= 1")
    m = check_model_cfg(model_cfg)
    attention = 6 * m["num_layers"] * seq_len * m["num_attention_heads"] * m["kv_channels"]
    return float(6 * matmul_params(model_cfg, vocab_size) + attention)
