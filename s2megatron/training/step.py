"""One optimizer step, one evaluation pass and sequence scoring, through megatron-core's pipeline schedules.

``get_forward_backward_func()`` picks no pipelining, 1F1B, or the interleaved 1F1B (virtual stages) from the
parallel state; all three call :func:`forward_step` once per micro-batch and model chunk. The loss is summed
over tokens and divided by the number of loss tokens of the whole global batch (all micro-batches and
data-parallel ranks; ``calculate_per_token_loss``), so gradient accumulation equals one big batch.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Callable, Dict, Iterator, List, Optional, Sequence

import torch
import torch.distributed as dist


@dataclass
class StepOutput:
    loss: float            # mean per-token loss of the global batch
    num_tokens: int        # loss tokens in the global batch
    grad_norm: float       # global gradient norm before clipping (nan if unknown)
    update_skipped: bool   # fp16 overflow: the optimizer skipped this step


def _to(x: Optional[torch.Tensor], device) -> Optional[torch.Tensor]:
    return None if x is None else x.to(device, non_blocking=True)


def lm_loss(loss_mask: torch.Tensor, output_tensor: torch.Tensor):
    """Loss function for the schedules: (sum of masked per-token losses, token count, report).

    ``output_tensor``: per-token cross entropy ``[B, S]`` from the model's last stage; ``loss_mask`` ``[B, S]``.
    The report ``[loss_sum, num_tokens]`` (float32) is summed over micro-batches by the caller."""
    losses = output_tensor.float().reshape(-1)
    mask = loss_mask.float().reshape(-1)
    loss_sum = torch.sum(losses * mask)
    num_tokens = mask.sum().to(torch.int)
    report = torch.stack([loss_sum.detach(), mask.sum().detach()])
    return loss_sum, num_tokens, {"lm": report}


def make_forward_step(device: torch.device, loss_fn: Callable = lm_loss):
    """``forward_step(data_iterator, model) -> (output, loss_func)`` for the schedules.

    Batches are dicts with ``tokens``, ``labels``, ``loss_mask``, ``position_ids`` ``[B, S]``. A chunk that
    is neither the first nor the last pipeline stage gets ``data_iterator=None`` and reads nothing."""

    def forward_step(data_iterator: Optional[Iterator], model):
        batch = next(data_iterator) if data_iterator is not None else {}
        output = model(_to(batch.get("tokens"), device), _to(batch.get("position_ids"), device), None,
                       labels=_to(batch.get("labels"), device))
        loss_mask = _to(batch.get("loss_mask"), device)
        return output, partial(loss_fn, loss_mask)

    return forward_step


def _sum_reports(reports: Sequence[Dict], key: str, device) -> torch.Tensor:
    """Sum this rank's per-micro-batch reports (last pipeline stage only; zeros elsewhere) and share the sum with
    every pipeline stage, so that any rank (e.g. rank 0, which logs) can read it."""
    from megatron.core import parallel_state as ps

    total = None
    for r in reports:
        total = r[key].float() if total is None else total + r[key].float()
    if total is None:
        total = torch.zeros(2, device=device)
    total = total.to(device)
    if ps.get_pipeline_model_parallel_world_size() > 1:
        if not ps.is_pipeline_last_stage(ignore_virtual=True):
            total = torch.zeros_like(total)
        dist.all_reduce(total, group=ps.get_pipeline_model_parallel_group())
    return total


def check_grads_finite(model: List[torch.nn.Module], step: Optional[int] = None) -> None:
    """Raise FloatingPointError, on every rank alike, when this rank's gradient buffers hold a NaN or an Inf.

    Called after the backward pass and the data-parallel reduce, before the optimizer applies the gradients, so
    the parameters, the optimizer state and every checkpoint keep their last finite values. Costs one read of
    the gradient buffers and one flag all-reduced over all ranks (a rank may see a NaN its peers don't: its
    local gradients, or its shard under the distributed optimizer)."""
    sums = [buf.grad_data.sum() for chunk in model
            for buf in getattr(chunk, "buffers", []) + getattr(chunk, "expert_parallel_buffers", [])]
    if not sums:
        return
    bad = (~torch.isfinite(torch.stack(sums).float())).any().float()
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
    if bad.item() > 0:
        at = "" if step is None else f" at step {step}"
        raise FloatingPointError(
            f"gradients are NaN or Inf{at} (on at least one rank); the update was not applied, so the parameters "
            "and the latest checkpoint are unchanged. Lower optim.lr, set optim.clip_grad > 0, or check the data")


def train_step(model: List[torch.nn.Module], optimizer, data_iterators, *, num_microbatches: int, seq_len: int,
               micro_batch: int, device: torch.device, forward_step=None, check_finite: bool = True,
               step: Optional[int] = None) -> StepOutput:
    """Zero grads, forward/backward over ``num_microbatches`` micro-batches, optimizer step (with clipping).

    ``check_finite``: raise before the update when a gradient is NaN/Inf (:func:`check_grads_finite`); off for
    fp16, whose loss scaler skips overflowing steps itself. ``step``: the step number, for that message."""
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    for chunk in model:
        chunk.zero_grad_buffer()
    optimizer.zero_grad()
    reports = get_forward_backward_func()(
        forward_step_func=forward_step or make_forward_step(device),
        data_iterator=data_iterators if len(model) > 1 else data_iterators[0],
        model=model, num_microbatches=num_microbatches, seq_length=seq_len, micro_batch_size=micro_batch,
        decoder_seq_length=seq_len, forward_only=False)
    if check_finite:
        check_grads_finite(model, step)
    update_ok, grad_norm, _ = optimizer.step()
    total = _sum_reports(reports, "lm", device)
    dist.all_reduce(total, group=ps.get_data_parallel_group())
    loss_sum, num_tokens = total.tolist()
    return StepOutput(loss=loss_sum / max(num_tokens, 1.0), num_tokens=int(num_tokens),
                      grad_norm=float("nan") if grad_norm is None else float(grad_norm), update_skipped=not update_ok)


@torch.no_grad()
def evaluate(model: List[torch.nn.Module], make_iterators: Callable[[], list], *, num_batches: int,
             num_microbatches: int, seq_len: int, micro_batch: int, device: torch.device) -> Dict[str, float]:
    """Mean per-token loss (and perplexity) over ``num_batches`` global batches of validation data.

    ``make_iterators()`` returns fresh iterators (one per chunk, ``None`` for chunks that read no data)
    starting at the same validation sample every time, so evaluations are comparable across steps."""
    import math

    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    for chunk in model:
        chunk.eval()
    iterators = make_iterators()
    total = torch.zeros(2, device=device)
    try:
        for _ in range(num_batches):
            reports = get_forward_backward_func()(
                forward_step_func=make_forward_step(device),
                data_iterator=iterators if len(model) > 1 else iterators[0],
                model=model, num_microbatches=num_microbatches, seq_length=seq_len, micro_batch_size=micro_batch,
                decoder_seq_length=seq_len, forward_only=True)
            total += _sum_reports(reports, "lm", device)
    finally:
        for chunk in model:
            chunk.train()
    dist.all_reduce(total, group=ps.get_data_parallel_group())
    loss_sum, num_tokens = total.tolist()
    loss = loss_sum / max(num_tokens, 1.0)
    return {"loss": loss, "ppl": math.exp(min(loss, 50.0)), "tokens": int(num_tokens)}


def _sequence_loglik(loss_mask: torch.Tensor, output_tensor: torch.Tensor):
    """Loss function for scoring: per-sequence sum of masked log-likelihoods, ``[B]`` (no gradient)."""
    ll = -(output_tensor.float() * loss_mask.float()).sum(dim=1)
    zero = torch.zeros((), device=output_tensor.device)
    return zero, torch.zeros((), dtype=torch.int, device=output_tensor.device), {"ll": ll.detach()}


@torch.no_grad()
def score_sequences(model: List[torch.nn.Module], batch: Dict[str, torch.Tensor], *, device: torch.device,
                    reads_data: Sequence[bool]) -> torch.Tensor:
    """Log-likelihood of the masked label tokens of each sequence of ``batch`` (one micro-batch, ``[B, S]``
    tensors) under the model; float32 ``[B]``, the same on every rank. ``reads_data[i]``: whether chunk ``i``
    of this rank consumes data (first or last pipeline stage)."""
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    bsz, seq_len = batch["tokens"].shape
    iterators = [iter([batch]) if reads else None for reads in reads_data]
    for chunk in model:
        chunk.eval()
    try:
        reports = get_forward_backward_func()(
            forward_step_func=make_forward_step(device, _sequence_loglik),
            data_iterator=iterators if len(model) > 1 else iterators[0],
            model=model, num_microbatches=1, seq_length=seq_len, micro_batch_size=bsz, decoder_seq_length=seq_len,
            forward_only=True)
    finally:
        for chunk in model:
            chunk.train()
    ll = reports[0]["ll"].float().to(device) if reports else torch.zeros(bsz, device=device)
    if ps.get_pipeline_model_parallel_world_size() > 1:
        if not ps.is_pipeline_last_stage(ignore_virtual=True):
            ll = torch.zeros_like(ll)
        dist.all_reduce(ll, group=ps.get_pipeline_model_parallel_group())
    return ll.cpu()
