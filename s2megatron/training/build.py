"""Model chunks, data-parallel wrapping and the optimizer: everything about parallelism applied in one place.

:func:`build_model` returns the list of model chunks of this rank (one per virtual pipeline stage), each wrapped
for mixed precision (``Float16Module``, bf16/fp16 params with fp32 main weights kept by the optimizer) and in
megatron-core's ``DistributedDataParallel`` (contiguous grad buffers, gradient reduce overlapped with the
backward pass). :func:`build_optimizer` returns megatron-core's AdamW (distributed or not) and wires the hooks
the pipeline schedules call (grad scaling, no_sync, grad sync, finalize).
"""
from __future__ import annotations

from typing import List, Mapping

import torch

from .config import RunPlan

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _plain(node):
    from omegaconf import OmegaConf
    return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else dict(node)


def build_transformer_config(cfg: Mapping, plan: RunPlan):
    """megatron-core TransformerConfig of the run (model + parallel + precision + recompute), with the loss
    averaged per token over the whole global batch (``calculate_per_token_loss``)."""
    from ..model import transformer_config_from_cfg

    return transformer_config_from_cfg(_plain(cfg.model), _plain(cfg.parallel), precision=plan.precision,
                                       recompute=cfg.train.recompute,
                                       recompute_num_layers=cfg.train.recompute_num_layers,
                                       fusions=plan.fusions, overrides={"calculate_per_token_loss": True})


def build_model(cfg: Mapping, plan: RunPlan, config, *, vocab_size: int, device: torch.device,
                wrap_ddp: bool = True) -> List[torch.nn.Module]:
    """This rank's model chunks (``vpp`` chunks with an interleaved pipeline, else one), on ``device``.

    With ``wrap_ddp`` each chunk is a megatron ``DistributedDataParallel``; otherwise (evaluation only) the chunk
    is returned after mixed-precision wrapping.
    """
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.transformer.module import Float16Module

    from ..model import build_gpt_model

    chunks = []
    num_chunks = plan.vpp or 1
    for vp_stage in range(num_chunks):
        vp = vp_stage if plan.vpp else None
        model = build_gpt_model(
            config, plan.schedule, vocab_size=vocab_size, max_seq_len=cfg.train.seq_len, model_cfg=_plain(cfg.model),
            attention_backend=cfg.attention.backend,
            pre_process=ps.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp),
            post_process=ps.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp), vp_stage=vp)
        model = model.to(device)
        if plan.precision in ("bf16", "fp16"):
            model = Float16Module(config, model)
        chunks.append(model)
    if not wrap_ddp:
        return chunks
    # With one data-parallel rank there is no reduce to overlap: the gradient buffer is then one bucket, so the
    # backward pass launches no per-bucket communication. Non-finite gradients are caught once per step, before
    # the update (step.check_grads_finite), not per bucket: megatron's per-bucket check reads each bucket's norm
    # back to the host in the middle of the backward pass, which stalls the GPU.
    overlap = bool(cfg.train.overlap_grad_reduce) and ps.get_data_parallel_world_size() > 1
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=plan.precision != "fp32",
        overlap_grad_reduce=overlap,
        use_distributed_optimizer=bool(cfg.parallel.get("distributed_optimizer", False)),
        check_for_nan_in_grad=False,
    )
    # Chunks after the first reduce their grads as one bucket: under the interleaved schedule that reduce already
    # overlaps with the other chunks' compute (as in Megatron-LM).
    return [DistributedDataParallel(config=config, ddp_config=ddp_config, module=chunk, disable_bucketing=i > 0)
            for i, chunk in enumerate(chunks)]


def build_optimizer(cfg: Mapping, plan: RunPlan, config, model: List[torch.nn.Module]):
    """megatron-core AdamW over ``model`` (fp32 main weights for bf16/fp16, global-norm clipping), and the
    schedule hooks in ``config``. Returns the optimizer."""
    from megatron.core.distributed import finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    o = cfg.optim
    opt_config = OptimizerConfig(
        optimizer="adam", lr=float(o.lr), min_lr=float(o.min_lr), weight_decay=float(o.weight_decay),
        adam_beta1=float(o.beta1), adam_beta2=float(o.beta2), adam_eps=float(o.eps), clip_grad=float(o.clip_grad),
        bf16=plan.precision == "bf16", fp16=plan.precision == "fp16", params_dtype=_DTYPES[plan.precision],
        use_distributed_optimizer=bool(cfg.parallel.get("distributed_optimizer", False)),
    )
    optimizer = get_megatron_optimizer(opt_config, model)
    if plan.fusions:
        use_fused_torch_adam(optimizer)

    # Hooks the pipeline schedules call (as megatron's own training loop wires them).
    config.grad_scale_func = optimizer.scale_loss
    config.finalize_model_grads_func = finalize_model_grads
    no_sync = [chunk.no_sync for chunk in model]
    config.no_sync_func = no_sync[0] if len(model) == 1 else no_sync
    if model[0].ddp_config.overlap_grad_reduce:
        grad_sync = [chunk.start_grad_sync for chunk in model]
        config.grad_sync_func = grad_sync[0] if len(model) == 1 else grad_sync
    return optimizer


def use_fused_torch_adam(optimizer) -> int:
    """Switch torch's Adam/AdamW inside a megatron optimizer (used when apex and TE are absent) from the
    multi-tensor ``foreach`` path to the single-kernel ``fused`` one, for parameter groups that live on CUDA.
    apex/TE fused optimizers are left alone. Returns the number of groups switched."""
    switched = 0
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(opt, "optimizer", None)
        if not isinstance(inner, (torch.optim.Adam, torch.optim.AdamW)):
            continue
        for group in inner.param_groups:
            if group["params"] and all(p.is_cuda for p in group["params"]):
                group["foreach"], group["fused"] = False, True
                switched += 1
    return switched


@torch.no_grad()
def init_optimizer_state(optimizer) -> None:
    """Create the state tensors of a fresh distributed optimizer so that a checkpoint can be loaded into it.

    megatron-core's DistributedOptimizer reads the inner torch optimizer's ``step`` while building its loading
    template and fails on an optimizer that never stepped. One step at lr 0 and weight decay 0 on zero gradients
    creates the state and leaves every parameter bit-identical; the load then overwrites the state.
    """
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(opt, "optimizer", None)
        if not isinstance(opt, DistributedOptimizer) or inner is None or len(inner.state) > 0:
            continue
        saved = [(g["lr"], g.get("weight_decay", 0.0)) for g in inner.param_groups]
        for g in inner.param_groups:
            g["lr"], g["weight_decay"] = 0.0, 0.0
            for p in g["params"]:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
        inner.step()
        inner.zero_grad(set_to_none=True)
        for g, (lr, wd) in zip(inner.param_groups, saved):
            g["lr"], g["weight_decay"] = lr, wd


@torch.no_grad()
def load_optimizer_state(optimizer, state_dict) -> None:
    """``optimizer.load_state_dict(state_dict)``, working around megatron-core's fully_reshardable loader.

    With torch's AdamW (no apex/TE), ``DistributedOptimizer.load_state_dict`` adds a per-parameter ``step`` to the
    inner optimizer state, and ``load_parameter_state_from_fully_reshardable`` then copies every inner state key from
    the checkpoint, which stores ``step`` only once: a KeyError. So the param state is loaded separately, with
    ``step`` set aside meanwhile (it was already restored from the param groups). Runs under no_grad because the
    distributed optimizer copies into views of leaf tensors.
    """
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    inner_opts = getattr(optimizer, "chained_optimizers", [optimizer])
    dist_opt = inner_opts[0] if len(inner_opts) == 1 and isinstance(inner_opts[0], DistributedOptimizer) else None
    if dist_opt is None or state_dict.get("param_state_sharding_type") != "fully_reshardable":
        optimizer.load_state_dict(state_dict)
    else:
        state_dict = dict(state_dict)
        param_state = state_dict.pop("param_state")
        state_dict.pop("param_state_sharding_type")
        dist_opt.load_state_dict(state_dict)
        steps = {p: s.pop("step") for p, s in dist_opt.optimizer.state.items() if "step" in s}
        try:
            dist_opt.load_parameter_state_from_fully_reshardable(param_state)
        finally:
            for p, step in steps.items():
                dist_opt.optimizer.state[p]["step"] = step
    # The distributed optimizer hands every parameter the same ``step`` tensor; torch's AdamW increments it in
    # place once per parameter, which would corrupt the bias correction. Give each parameter its own.
    for opt in inner_opts:
        for param_state_ in getattr(getattr(opt, "optimizer", None), "state", {}).values():
            if isinstance(param_state_.get("step"), torch.Tensor):
                param_state_["step"] = param_state_["step"].clone()
