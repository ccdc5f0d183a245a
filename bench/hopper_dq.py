"""The two S2 dQ kernels side by side on one card: the Triton dQ kernel and the warp-specialised Hopper dQ
(``s2megatron/ops/triton_s2/hopper_dq.py``), switched per call with ``S2MEGATRON_HOPPER_DQ`` in alternating rounds.

B=1, H=32, D=128, bf16, L16V16 at block 64 (the issue's shape) from 2k to 128k, plus a GQA (32 / 8) row, block 128
and dense mode (vert_stride 1). Per row and kernel: the dQ kernel's time under the profiler and the forward + backward median of
``attention.bench_ms`` (the forward and dK/dV kernels are the same in both columns), each the median over the
rounds; the two kernels' dQ, dK and dV compared (max abs difference over max abs value: dK and dV read the Delta
that the dQ kernel writes), and whether the Hopper kernel ran. Writes ``hopper_dq_<card>.md`` and ``.json``.

    python bench/hopper_dq.py [--seqs 8192 32768 ...] [--rounds 3] [--out bench/results]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

from attention import bench_ms  # noqa: E402
from launches import record_launches  # noqa: E402
from report import run_env, write_markdown, write_rows  # noqa: E402
from s2megatron.ops.triton_s2 import op as _op  # noqa: E402
from s2megatron.ops.triton_s2 import triton_s2_attention  # noqa: E402
from s2megatron.sparsity import S2Layout  # noqa: E402

_launches = record_launches(_op._hopper_dq, "hopper_dq")
MODES = {"triton": "0", "hopper": "auto"}  # the policy's choice: the Hopper dQ wherever it can run


def step(layout, n, hq, hkv, d=128):
    gen = torch.Generator(device="cuda").manual_seed(n)
    q = torch.randn(1, n, hq, d, device="cuda", dtype=torch.bfloat16, generator=gen).requires_grad_()
    k, v = (torch.randn(1, n, hkv, d, device="cuda", dtype=torch.bfloat16, generator=gen).requires_grad_()
            for _ in range(2))
    dout = torch.randn(1, n, hq, d, device="cuda", dtype=torch.bfloat16, generator=gen)
    return lambda: torch.autograd.grad(triton_s2_attention(q, k, v, layout, sm_scale=1 / math.sqrt(d)), (q, k, v),
                                       dout)


def dq_kernel_ms(fn, reps):
    """Median time of the dQ kernel (either) over ``reps`` forward + backward calls, under the profiler."""
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    return statistics.median(e.device_time for e in prof.events() if "dq" in e.name) / 1e3


def _rel(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


def row(name, layout, n, rounds, hq=32, hkv=32):
    fn = step(layout, n, hq, hkv)
    grads = {}
    for label, mode in MODES.items():
        os.environ["S2MEGATRON_HOPPER_DQ"] = mode
        del _launches[:]
        grads[label] = fn()
        if label == "hopper":
            ran = bool(_launches) and all(_launches)
    res = dict(name=name, seq=n, ran=ran,
               rel_diff=[_rel(h, t) for h, t in zip(grads["hopper"], grads["triton"])])
    big = n >= 131072
    for _ in range(rounds):
        for label, mode in MODES.items():
            os.environ["S2MEGATRON_HOPPER_DQ"] = mode
            res.setdefault(f"{label}_dq_ms", []).append(dq_kernel_ms(fn, 2 if big else 10))
            res.setdefault(f"{label}_fwdbwd_ms", []).append(bench_ms(fn))
    for key in [k for k in res if k.endswith("_ms")]:
        res[key + "_median"] = statistics.median(res[key])
    print(json.dumps(res), flush=True)
    return res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seqs", type=int, nargs="*", default=[2048, 4096, 8192, 16384, 32768, 131072])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = ap.parse_args()
    env = run_env()
    card = env["card"]
    s2 = S2Layout(64, 16, 16)
    rows = [row("L16V16", s2, n, args.rounds) for n in args.seqs]
    rows.append(row("L16V16 GQA 32/8", s2, 32768, args.rounds, hkv=8))
    rows.append(row("L8V8 block 128", S2Layout(128, 8, 8), 32768, args.rounds))
    rows.append(row("dense (vert_stride 1)", S2Layout(64, 1, 1), 8192, args.rounds))
    base = write_rows(args.out, "hopper_dq", env, rows)
    lines = [f"# S2 dQ: Triton dQ kernel vs warp-specialised Hopper dQ ({card})", "",
             f"torch {env['torch']}, triton {env['triton']}; B=1, H=32 (GQA row: 8 kv heads), D=128, bf16; "
             f"`python bench/hopper_dq.py`, {args.rounds} alternating rounds, medians over the rounds, ms: the dQ "
             "kernel under the profiler, and forward + backward (medians of `triton.testing.do_bench` over at least "
             "ten repeats; the forward and dK/dV kernels are the same in both).", "",
             "| layout | seq | dQ Triton | dQ Hopper | dQ ratio | fwd+bwd Triton dQ | fwd+bwd Hopper dQ | "
             "rel. diff dQ, dK, dV |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ran = "" if r["ran"] else " (did not run)"
        lines.append(f"| {r['name']} | {r['seq']} | "
                     f"{r['triton_dq_ms_median']:.4f} | {r['hopper_dq_ms_median']:.4f}{ran} | "
                     f"{r['hopper_dq_ms_median'] / r['triton_dq_ms_median']:.3f} | "
                     f"{r['triton_fwdbwd_ms_median']:.3f} | {r['hopper_fwdbwd_ms_median']:.3f} | "
                     + ", ".join(f"{x:.1e}" for x in r["rel_diff"]) + " |")
    write_markdown(base + ".md", lines)


if __name__ == "__main__":
    main()
