"""Parallel equivalence of the S2 GPT model on 4 GPUs (NCCL), with the attention backend ``auto`` (Triton kernels).

    torchrun --nproc_per_node=4 tests/gpu/parallel_equivalence.py --results results.log

Every layout (TP2, PP2, TP2+SP, TP2xPP2, TP4+SP with num_query_groups < tp, PP2 with virtual stages) is loaded with
the TP1 reference's weights and trained on the same batches:
  * bf16 (Float16Module, fp32 main weights, distributed optimizer): 5 AdamW steps; every step's loss must match
    TP1's within LOSS_TOL_BF16, and the first step's gradients (a separate, non-distributed run) within
    GRAD_RTOL_BF16 (max |g - g_ref| / max |g_ref| per tensor);
  * fp32: one step's loss and gradients for TP2xPP2 within the fp32 tolerances.
Plus one model forward with backend triton vs reference (fp32, TP1). Writes every number to the log; exit code 1
on any failure. The same harness runs on the CPU in tests/test_parallel_cpu.py.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))          # tests/ (dist_utils)
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))          # repo root (s2megatron)
from dist_utils import (build_chunks, compare_state, gathered_state, load_weights, make_batches,  # noqa: E402
                        parallel_cfg, train_steps, wrap_ddp)

SEQ, MICRO, NUM_MICRO, VOCAB, STEPS = 1024, 2, 4, 1000, 5
MODEL = dict(num_layers=4, hidden_size=512, num_attention_heads=8, num_query_groups=2, ffn_hidden_size=1024,
             kv_channels=None, normalization="RMSNorm", activation="swiglu", position_embedding="rope",
             rotary_base=10000, tie_embeddings=False, add_bias_linear=False, hidden_dropout=0.0,
             attention_dropout=0.0, init_method_std=0.02, make_vocab_size_divisible_by=128, norm_epsilon=1e-5)
SCHEDULE = {"default": {"block_size": 64, "local_blocks": 4, "vert_stride": 4},
            "layers": {1: {"per_kv_head": True}, 2: {"vert_stride": 8, "sliding_offset": 3}, 3: "dense"}}
CASES = {  # name: (tp, pp, vpp, sp)
    "tp2": (2, 1, None, False),
    "pp2": (1, 2, None, False),
    "tp2_sp": (2, 1, None, True),
    "tp2_pp2": (2, 2, None, False),
    "tp4_sp_groups2": (4, 1, None, True),      # num_query_groups 2 < tp 4
    "pp2_vpp2": (1, 2, 2, False),
}
LOSS_TOL_BF16, GRAD_RTOL_BF16 = 2e-2, 5e-2
LOSS_TOL_FP32, GRAD_RTOL_FP32 = 1e-4, 1e-3


def schedule():
    from s2megatron.sparsity import LayerSchedule
    return LayerSchedule.from_config(SCHEDULE, MODEL["num_layers"])


def optimizer_for(model, precision, distributed):
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[precision]
    return get_megatron_optimizer(OptimizerConfig(optimizer="adam", lr=1e-3, weight_decay=0.01, clip_grad=1.0,
                                                  bf16=precision == "bf16", params_dtype=dtype,
                                                  use_distributed_optimizer=distributed), model)


def run(par, batches, precision, *, state=None, steps=STEPS, backend="auto"):
    """(first-step grads, per-step losses, full weights) of one layout: a grads-only pass with plain DDP, then
    ``steps`` optimizer steps with the distributed optimizer, both from the same weights."""
    from s2megatron.model import destroy_parallel
    out = {}
    for phase, distributed in (("grads", False), ("train", True)):
        chunks, config, ddp_config = build_chunks(MODEL, dict(par, distributed_optimizer=distributed), schedule(),
                                                  vocab=VOCAB, seq_len=SEQ, precision=precision, backend=backend)
        if state is not None:
            load_weights(chunks, state)
        if phase == "grads":
            out["weights"] = gathered_state(chunks, grads=False)
        model = wrap_ddp(chunks, config, ddp_config)
        if phase == "grads":
            out["first_loss"] = train_steps(model, config, batches)[0]
            out["grads"] = gathered_state(model, grads=True)
        else:
            out["losses"] = train_steps(model, config, batches, steps=steps,
                                        optimizer=optimizer_for(model, precision, True))
        destroy_parallel()
    return out


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--results", required=True, help="log file of the numbers")
    parser.add_argument("--small", action="store_true", help="short sequences and 2 steps (a CPU dry run over gloo)")
    args = parser.parse_args()
    global SEQ, STEPS
    if args.small:
        SEQ, STEPS = 256, 2
    cuda = torch.cuda.is_available()
    torch.distributed.init_process_group("nccl" if cuda else "gloo")
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
    failures = []
    results = Path(args.results)
    if rank == 0:
        results.parent.mkdir(parents=True, exist_ok=True)
        results.write_text("")

    def log(msg):  # appended line by line: a run cut short still leaves its numbers
        if rank == 0:
            print(msg, flush=True)
            with results.open("a") as f:
                f.write(msg + "\n")

    import megatron.core
    import triton

    from s2megatron.ops import resolve_backend
    backend = resolve_backend("auto", torch.device("cuda" if cuda else "cpu"))
    log(f"device: {torch.cuda.get_device_name() if cuda else 'cpu'} x{world} | torch {torch.__version__} | triton {triton.__version__} | "
        f"megatron-core {megatron.core.__version__} | attention backend auto -> {backend}")
    log(f"model: {MODEL['num_layers']} layers, hidden {MODEL['hidden_size']}, heads {MODEL['num_attention_heads']}, "
        f"query groups {MODEL['num_query_groups']}, ffn {MODEL['ffn_hidden_size']}, vocab {VOCAB} | seq {SEQ}, "
        f"micro-batch {MICRO} x {NUM_MICRO} micro-batches | layouts: {schedule().describe()}")
    if world != 4:
        log(f"needs 4 processes, got {world}")
        return 1
    batches = make_batches(5, NUM_MICRO, MICRO, SEQ, VOCAB)

    t0 = time.time()
    ref = run(parallel_cfg(), batches, "bf16")
    log(f"[bf16] tp1 (dp4) reference: losses {['%.5f' % x for x in ref['losses']]} ({time.time() - t0:.1f} s)")
    for name, (tp, pp, vpp, sp) in CASES.items():
        t0 = time.time()
        got = run(parallel_cfg(tp, pp, vpp, sp), batches, "bf16", state=ref["weights"])
        dloss = max(abs(a - b) for a, b in zip(got["losses"], ref["losses"]))
        gerr, worst, count = compare_state(got["grads"], ref["grads"])
        ok = dloss <= LOSS_TOL_BF16 and gerr <= GRAD_RTOL_BF16 and abs(got["first_loss"] - ref["first_loss"]) <= LOSS_TOL_BF16
        log(f"[bf16] {name:16s} losses {['%.5f' % x for x in got['losses']]} max|dloss| {dloss:.2e} "
            f"(tol {LOSS_TOL_BF16}) | step-1 grads: max rel err {gerr:.2e} at {worst} over {count} tensors "
            f"(tol {GRAD_RTOL_BF16}) | {'PASS' if ok else 'FAIL'} ({time.time() - t0:.1f} s)")
        if not ok:
            failures.append(f"bf16 {name}")

    ref32 = run(parallel_cfg(), batches, "fp32", steps=1)
    got32 = run(parallel_cfg(2, 2), batches, "fp32", state=ref32["weights"], steps=1)
    dloss = abs(got32["losses"][0] - ref32["losses"][0])
    gerr, worst, count = compare_state(got32["grads"], ref32["grads"])
    ok = dloss <= LOSS_TOL_FP32 and gerr <= GRAD_RTOL_FP32
    log(f"[fp32] tp2_pp2 vs tp1: loss {got32['losses'][0]:.6f} vs {ref32['losses'][0]:.6f} (|d| {dloss:.2e}, tol "
        f"{LOSS_TOL_FP32}) | grads max rel err {gerr:.2e} at {worst} over {count} tensors (tol {GRAD_RTOL_FP32}) | "
        f"{'PASS' if ok else 'FAIL'}")
    if not ok:
        failures.append("fp32 tp2_pp2")

    # the same model, weights and batch through the reference backend (fp32, TP1): the kernels' patterns agree
    refb = run(parallel_cfg(), batches, "fp32", state=ref32["weights"], steps=1, backend="reference")
    dloss = abs(refb["first_loss"] - ref32["first_loss"])
    gerr, worst, _ = compare_state(ref32["grads"], refb["grads"])
    ok = dloss <= LOSS_TOL_FP32 and gerr <= GRAD_RTOL_FP32
    log(f"[fp32] tp1 backend {backend} vs reference: loss |d| {dloss:.2e}, grads max rel err {gerr:.2e} at {worst} | "
        f"{'PASS' if ok else 'FAIL'}")
    if not ok:
        failures.append("fp32 backend vs reference")

    log(f"RESULT: {'PASS' if not failures else 'FAIL ' + ', '.join(failures)}")
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
    return 0 if not failures else 1


if __name__ == "__main__":
    sys.exit(main())
