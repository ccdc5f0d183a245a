"""Fused kernels change nothing but speed: the S2 GPT model with fusions on gives the losses and gradients of the
plain PyTorch model (same weights, same batches, megatron's schedule and DDP, one process).

CPU: the fused RoPE (``apply_rope_fusion`` with our kernel; megatron's other fusions are torch.compile-generated and
meant for CUDA). GPU: every fusion ``train.fusions`` turns on, in bf16 (SwiGLU, bias-dropout-add, cross-entropy, RoPE,
and our RMSNorm).
"""
from __future__ import annotations

import pytest
import torch

from dist_utils import (build_chunks, compare_state, gathered_state, load_weights, make_batches, parallel_cfg,
                        run_gloo, train_steps, wrap_ddp)
from test_parallel_cpu import TINY, VOCAB, _schedule

SEQ, MICRO, NUM_MICRO = 128, 2, 2


def _loss_and_grads(fusions, overrides, precision, state, batches):
    from s2megatron.model import destroy_parallel
    chunks, config, ddp_config = build_chunks(TINY, parallel_cfg(), _schedule(4), vocab=VOCAB, seq_len=SEQ,
                                              precision=precision, backend="auto", fusions=fusions,
                                              overrides=overrides)
    if state is not None:
        load_weights(chunks, state)
    weights = gathered_state(chunks, grads=False)
    flags = (config.apply_rope_fusion, config.bias_activation_fusion, config.cross_entropy_loss_fusion,
             config.s2_fused_norm)
    model = wrap_ddp(chunks, config, ddp_config)
    loss = train_steps(model, config, batches)[0]
    grads = gathered_state(model, grads=True)
    destroy_parallel()
    return loss, weights, grads, flags


def _compare(fused_kwargs, precision):
    from s2megatron.model.rope import install_rope_fusion
    install_rope_fusion()
    batches = make_batches(3, NUM_MICRO, MICRO, SEQ, VOCAB)
    ref_loss, state, ref_grads, ref_flags = _loss_and_grads(False, None, precision, None, batches)
    loss, _, grads, flags = _loss_and_grads(state=state, batches=batches, precision=precision, **fused_kwargs)
    worst, name, count = compare_state(grads, ref_grads)
    return dict(ref_loss=ref_loss, loss=loss, worst=worst, name=name, count=count, ref_flags=ref_flags, flags=flags)


def _cpu_case(rank, world_size):
    return _compare(dict(fusions=False, overrides={"apply_rope_fusion": True}), "fp32")


def _gpu_case(rank, world_size):
    return _compare(dict(fusions=True, overrides=None), "bf16")


# the model lives on the GPU when there is one: NCCL then (gloo has no CUDA all-reduce)
BACKEND = "nccl" if torch.cuda.is_available() else "gloo"


def test_fused_rope_model_matches_unfused():
    (r,) = run_gloo(_cpu_case, 1, backend=BACKEND)
    assert r["ref_flags"] == (False,) * 4 and r["flags"] == (True, False, False, False)
    assert abs(r["loss"] - r["ref_loss"]) < 1e-5, r
    assert r["worst"] < 1e-4 and r["count"] > 10, r


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_all_fusions_match_plain_pytorch_bf16():
    (r,) = run_gloo(_gpu_case, 1, backend=BACKEND)
    assert r["ref_flags"] == (False,) * 4 and r["flags"] == (True,) * 4
    assert abs(r["loss"] - r["ref_loss"]) < 2e-2, r
    assert r["worst"] < 5e-2 and r["count"] > 10, r


def _wrapped(*optimizers):
    """Stand-ins for megatron's optimizer wrappers: ``.optimizer`` is the torch optimizer; a chain lists them."""
    class Wrapper:
        def __init__(self, inner):
            self.optimizer = inner

    class Chain:
        def __init__(self, parts):
            self.chained_optimizers = parts
    return Chain([Wrapper(o) for o in optimizers])


def test_fused_adam_only_for_torch_adam_on_cuda():
    from s2megatron.training.build import use_fused_torch_adam
    cpu = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(3))])
    sgd = torch.optim.SGD([torch.nn.Parameter(torch.zeros(3))])
    assert use_fused_torch_adam(_wrapped(cpu, sgd)) == 0
    assert not cpu.param_groups[0]["fused"] and not sgd.param_groups[0].get("fused")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fused_adam_switch_gives_the_same_step():
    from s2megatron.training.build import use_fused_torch_adam
    torch.manual_seed(0)
    w = torch.randn(1000, device="cuda")
    g = torch.randn(1000, device="cuda")
    params = [torch.nn.Parameter(w.clone()), torch.nn.Parameter(w.clone())]
    fused, plain = (torch.optim.AdamW([p], lr=1e-2, weight_decay=0.1) for p in params)
    assert use_fused_torch_adam(_wrapped(fused)) == 1 and fused.param_groups[0]["fused"]
    for opt, p in ((fused, params[0]), (plain, params[1])):
        for _ in range(3):
            p.grad = g.clone()
            opt.step()
    assert torch.allclose(params[0], params[1], rtol=1e-5, atol=1e-6)
    assert not torch.equal(params[0], w)
