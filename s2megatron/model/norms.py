"""LayerNorm / RMSNorm in plain PyTorch that work with sequence parallelism.

megatron-core's torch fallback (``WrappedTorchNorm``) refuses ``sequence_parallel``. Under sequence parallelism
each tensor-parallel rank normalises a different slice of the sequence, so the norm weights receive partial
gradients; tagging the parameters ``sequence_parallel`` makes ``finalize_model_grads`` sum them over the
tensor-parallel group (what TE and apex norms do too).

With ``config.s2_fused_norm`` set, :class:`S2RMSNorm` computes with the fused RMSNorm of :mod:`.rmsnorm` (Triton
kernels on CUDA, the same float32 math in PyTorch on the CPU).
"""
from __future__ import annotations

import torch

from . import rmsnorm


def _check_norm_config(config) -> None:
    for flag in ("layernorm_zero_centered_gamma", "persist_layer_norm", "memory_efficient_layer_norm"):
        if getattr(config, flag, False):
            raise ValueError(f"{flag}=True is not supported by the torch norms; set it to False")


def _factory_kwargs(config) -> dict:
    # Same placement as megatron's linear layers: on the GPU unless use_cpu_initialization (or no CUDA).
    on_gpu = torch.cuda.is_available() and not config.use_cpu_initialization
    return dict(dtype=config.params_dtype, device=torch.cuda.current_device() if on_gpu else "cpu")


def _tag_sequence_parallel(module: torch.nn.Module, config) -> None:
    for param in module.parameters():
        setattr(param, "sequence_parallel", bool(config.sequence_parallel))


class S2LayerNorm(torch.nn.LayerNorm):
    """``torch.nn.LayerNorm`` built from a TransformerConfig, sequence-parallel aware. Input ``[..., hidden]``."""

    def __init__(self, config, hidden_size: int, eps: float = 1e-5, **kwargs):
        _check_norm_config(config)
        super().__init__(hidden_size, eps=eps, **_factory_kwargs(config))
        _tag_sequence_parallel(self, config)


class S2RMSNorm(torch.nn.RMSNorm):
    """``torch.nn.RMSNorm`` built from a TransformerConfig, sequence-parallel aware. Input ``[..., hidden]``.

    ``config.s2_fused_norm`` (default False) selects :func:`.rmsnorm.fused_rms_norm` for the forward and backward
    pass; otherwise this is ``torch.nn.RMSNorm.forward`` unchanged."""

    def __init__(self, config, hidden_size: int, eps: float = 1e-5, **kwargs):
        _check_norm_config(config)
        super().__init__(hidden_size, eps=eps, **_factory_kwargs(config))
        _tag_sequence_parallel(self, config)
        self.fused = bool(getattr(config, "s2_fused_norm", False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.fused or self.weight is None:
            return super().forward(x)
        eps = self.eps if self.eps is not None else torch.finfo(x.dtype).eps  # torch.nn.RMSNorm's default
        # the module attribute, not an imported name: a reload of .rmsnorm (tests, the interpreter) is seen here
        return rmsnorm.fused_rms_norm(x, self.weight, eps)


class S2Norm:
    """Builds :class:`S2LayerNorm` or :class:`S2RMSNorm` from ``config.normalization`` (the spec entry for
    megatron's ``input_layernorm`` / ``pre_mlp_layernorm`` / final ``layer_norm``). Raises ValueError for other
    normalizations."""

    def __new__(cls, config, hidden_size: int, eps: float = 1e-5, **kwargs):
        if config.normalization == "LayerNorm":
            return S2LayerNorm(config, hidden_size, eps=eps)
        if config.normalization == "RMSNorm":
            return S2RMSNorm(config, hidden_size, eps=eps)
        raise ValueError(f"normalization={config.normalization!r} is invalid; valid: LayerNorm, RMSNorm")
