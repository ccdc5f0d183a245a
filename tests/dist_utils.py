"""Run a function on N gloo processes (torch.multiprocessing spawn) and collect each rank's return value.

    results = run_gloo(worker, world_size=4, args=(...,), timeout_s=240)

``worker(rank, world_size, *args)`` runs with ``torch.distributed`` initialised (gloo, CPU); its return value
(anything ``torch.save`` can store) comes back in ``results[rank]``. A worker's exception fails the call with the
worker's traceback; a hang is killed after ``timeout_s``. The worker must be importable by module path (define
it at module level).
"""
from __future__ import annotations

import os
import socket
import tempfile
import time

import torch
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _entry(rank: int, world_size: int, port: int, out_dir: str, fn, args, backend: str = "gloo") -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_RANK=str(rank), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)  # N processes share 2 cores: oversubscription only slows them down
    if backend == "nccl":
        torch.cuda.set_device(rank)
    torch.distributed.init_process_group(backend, rank=rank, world_size=world_size)
    try:
        result = fn(rank, world_size, *args)
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
        torch.distributed.barrier()
    finally:
        torch.distributed.destroy_process_group()


def run_gloo(fn, world_size: int, args: tuple = (), timeout_s: float = 300.0, backend: str = "gloo") -> list:
    """Spawn ``world_size`` workers running ``fn(rank, world_size, *args)``; returns their results by rank.
    ``backend`` "gloo" (CPU tensors) or "nccl" (one GPU per rank, for models that live on CUDA).
    Raises the worker's error (torch.multiprocessing.ProcessRaisedException) or TimeoutError."""
    with tempfile.TemporaryDirectory(prefix="s2m-gloo-") as out_dir:
        ctx = mp.start_processes(_entry, args=(world_size, free_port(), out_dir, fn, args, backend),
                                 nprocs=world_size, join=False, start_method="spawn")
        deadline = time.monotonic() + timeout_s
        try:
            while not ctx.join(timeout=1.0):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"gloo workers of {getattr(fn, '__name__', fn)} did not finish in {timeout_s} s")
        finally:
            for proc in ctx.processes:  # only the processes started here
                if proc.is_alive():
                    proc.kill()
                    proc.join(5)
        return [torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=False) for r in range(world_size)]


# ----------------------------------------------------------------------------------------------------------------
# Harness for parallel-equivalence runs of the S2 GPT model (CPU gloo tests and the GPU script share it).
# Every layout is loaded with the same canonical full weights (by global parameter name), fed the same
# micro-batches on every data-parallel rank, and trained through megatron-core's DDP, pipeline schedules and
# optimizer, i.e. the path the training loop uses.
# ----------------------------------------------------------------------------------------------------------------

def parallel_cfg(tp: int = 1, pp: int = 1, vpp=None, sp: bool = False, distributed_optimizer: bool = False) -> dict:
    return dict(tp=tp, pp=pp, vpp=vpp, sp=sp, cp=1, distributed_optimizer=distributed_optimizer, use_te="auto",
                use_apex="auto")


def make_batches(seed: int, num_micro: int, micro_batch: int, seq_len: int, vocab: int) -> list:
    """``num_micro`` (tokens, labels) pairs of shape [micro_batch, seq_len], identical on every rank."""
    gen = torch.Generator().manual_seed(seed)
    data = torch.randint(0, vocab, (num_micro, micro_batch, seq_len + 1), generator=gen)
    return [(d[:, :-1].contiguous(), d[:, 1:].contiguous()) for d in data]


def build_chunks(model_cfg: dict, par: dict, schedule, *, vocab: int, seq_len: int, precision: str = "fp32",
                 backend: str = "auto", recompute=None, overlap_grad_reduce: bool = False,
                 use_cpu_initialization: bool = True, fusions: bool = False, overrides=None):
    """initialize_parallel + one GPTModel chunk per virtual stage (``Float16Module``-wrapped for bf16/fp16).
    Returns (chunks, config, ddp_config); wrap the chunks with :func:`wrap_ddp` after loading weights."""
    from megatron.core.distributed import DistributedDataParallelConfig
    from megatron.core.transformer.module import Float16Module

    from s2megatron.model import build_gpt_model, initialize_parallel, transformer_config_from_cfg

    initialize_parallel(par["tp"], par["pp"], par["vpp"], seed=1234)
    config = transformer_config_from_cfg(model_cfg, par, precision=precision, recompute=recompute, fusions=fusions,
                                         overrides=dict(use_cpu_initialization=use_cpu_initialization,
                                                        **(overrides or {})))
    ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=overlap_grad_reduce,
                                               use_distributed_optimizer=par["distributed_optimizer"])
    chunks = []
    for vp_stage in (range(par["vpp"]) if par["vpp"] else [None]):
        model = build_gpt_model(config, schedule, vocab_size=vocab, max_seq_len=seq_len, model_cfg=model_cfg,
                                attention_backend=backend, vp_stage=vp_stage)
        if precision != "fp32":
            model = Float16Module(config, model)
        chunks.append(model)
    return chunks, config, ddp_config


def wrap_ddp(chunks, config, ddp_config):
    from megatron.core.distributed import DistributedDataParallel
    return [DistributedDataParallel(config=config, ddp_config=ddp_config, module=c, disable_bucketing=i > 0)
            for i, c in enumerate(chunks)]


def tp_group_and_rank():
    from megatron.core import parallel_state as ps
    return ps.get_tensor_model_parallel_group(), ps.get_tensor_model_parallel_rank(), \
        ps.get_tensor_model_parallel_world_size()


def load_weights(chunks, state: dict) -> None:
    from s2megatron.model.weights import load_full_state
    _, rank, size = tp_group_and_rank()
    load_full_state(chunks, state, rank, size)


def gathered_state(chunks, *, grads: bool) -> dict:
    """Full tensors by global name from the whole world (TP all-gather, then all ranks' dicts merged)."""
    from s2megatron.model.weights import full_state
    group, _, _ = tp_group_and_rank()
    local = full_state(chunks, group, grads=grads)
    every = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(every, local)
    merged = {}
    for part in every:
        merged.update(part)
    return merged


def train_steps(chunks, config, batches: list, *, steps: int = 1, optimizer=None) -> list:
    """Run ``steps`` x (forward/backward over ``batches`` via megatron's schedule, finalize_model_grads, and an
    optimizer step when given). Returns each step's mean micro-batch loss (the same on every rank)."""
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import finalize_model_grads
    from megatron.core.pipeline_parallel import get_forward_backward_func

    seq_len, micro_batch = batches[0][0].shape[1], batches[0][0].shape[0]
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    position_ids = torch.arange(seq_len, device=device)[None].expand(micro_batch, -1)

    def forward_step(data_iterator, model):
        tokens, labels = next(data_iterator)
        per_token = model(tokens.to(device), position_ids, None, labels=labels.to(device))

        def loss_func(output):
            loss = output.float().mean()
            return loss, {"lm loss": loss.detach().clone()}  # the schedule scales loss in place
        return per_token, loss_func

    config.no_sync_func = [c.no_sync for c in chunks] if len(chunks) > 1 else chunks[0].no_sync
    config.finalize_model_grads_func = finalize_model_grads
    losses = []
    for _ in range(steps):
        for c in chunks:
            c.zero_grad_buffer()
        if optimizer is not None:
            optimizer.zero_grad()
        iters = [iter(batches) for _ in chunks]
        out = get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=iters if len(chunks) > 1 else iters[0],
            model=chunks if len(chunks) > 1 else chunks[0], num_microbatches=len(batches), seq_length=seq_len,
            micro_batch_size=micro_batch, forward_only=False)
        if optimizer is not None:
            ok, grad_norm, _ = optimizer.step()
            assert ok, "optimizer step skipped (inf/nan gradients)"
        local = float(torch.stack([d["lm loss"] for d in out]).mean()) if ps.is_pipeline_last_stage(
            ignore_virtual=True) else None
        every = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(every, local)
        losses.append(next(v for v in every if v is not None))
    return losses


def compare_state(got: dict, ref: dict) -> tuple:
    """(max over tensors of max|got - ref| / max|ref|, worst name, compared count). A tied output weight of the
    last pipeline stage is compared with the reference embedding."""
    worst, worst_name, count = 0.0, None, 0
    for name, tensor in got.items():
        ref_name = name if name in ref else "embedding.word_embeddings.weight"
        want = ref[ref_name]
        if tensor.shape != want.shape:
            raise AssertionError(f"{name}: shape {tuple(tensor.shape)} != reference {tuple(want.shape)}")
        err = float((tensor.double() - want.double()).abs().max() / want.double().abs().max().clamp_min(1e-30))
        count += 1
        if err > worst:
            worst, worst_name = err, name
    missing = sorted(set(ref) - set(got))
    if missing:
        raise AssertionError(f"parameters missing from the parallel run: {missing}")
    return worst, worst_name, count
