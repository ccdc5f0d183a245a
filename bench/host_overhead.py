"""Host time of one S2 attention call (forward, and forward + backward), without the GPU.

The kernel launches are replaced by no-ops, so what is timed is the Python and dispatch work around them: argument
checks, the launch plan, tensor allocation and autograd. It compares the eager path that ``triton_s2_attention`` takes
(an autograd function around the launchers) with the ``torch.library`` custom op that torch.compile traces, and runs
on any machine:

    python bench/host_overhead.py [--out DIR]

A real launch adds Triton's own launcher cost per kernel (one kernel forward, two backward: dQ, which also computes
Delta, and dK/dV). Writes ``host_overhead_cpu.md`` under --out.

With ``--gpu`` it launches for real on the GPU instead (B=1, H=32, D=128, bf16, L16V16, ``--seqs``): the host time
per call (calls enqueued back to back, no sync inside the timed loop), the benchmarks' timer (``attention.bench_ms``:
``triton.testing.do_bench``, an L2 flush before each repeat, CUDA events around the call) and ``do_bench_cudagraph``
(the same call replayed from a CUDA graph, which has no host time). Where the first two medians agree, the benchmarks
time the GPU, not the host. Writes ``host_overhead_<card>.md``.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from report import write_markdown  # noqa: E402

from s2megatron.ops import triton_s2  # noqa: E402
from s2megatron.ops.triton_s2 import kernels, op  # noqa: E402
from s2megatron.sparsity.layout import S2Layout  # noqa: E402

KERNELS = ("s2_fwd_kernel", "s2_bwd_dq_kernel", "s2_bwd_dkdv_kernel")


class _NoLaunch:
    """Stands in for a ``@triton.jit`` kernel: ``kernel[grid](...)`` does nothing."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def _stub_launches():
    for name in KERNELS:
        setattr(kernels, name, _NoLaunch())
    # the plan asks whether the kernels run under the interpreter (they do not: nothing runs), the wrapper whether
    # CPU tensors are allowed (they are, since nothing runs)
    op.decorated_for_interpreter = lambda kernel: False
    triton_s2.decorated_for_interpreter = lambda kernel: True


def _median_us(fn, calls: int, repeats: int = 7, warmup=None, settle=lambda: None) -> float:
    """Median over ``repeats`` of the host time per call of ``calls`` calls in a row, after ``warmup`` calls (a tenth
    of ``calls`` unless given); ``settle`` runs before each repeat and after the last (outside the timed loops)."""
    for _ in range(calls // 10 if warmup is None else warmup):
        fn()
    runs = []
    for _ in range(repeats):
        settle()
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        runs.append((time.perf_counter() - t0) / calls * 1e6)
    settle()
    return statistics.median(runs)


def measure(seq: int = 8192, heads: int = 8, head_dim: int = 128, calls: int = 1000) -> list:
    _stub_launches()
    layout = S2Layout(64, 16, 16)
    q, k, v = (torch.randn(1, seq, heads, head_dim, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    grad_out = torch.empty_like(q)
    key = op.layout_key(layout)

    args = (q, k, v, None, key, head_dim ** -0.5, 0, 0, 0, 0)

    def public():
        return triton_s2.triton_s2_attention(q, k, v, layout, sm_scale=head_dim ** -0.5)

    rows = []
    for name, fwd in (("`triton_s2_attention` (checks, then the eager path)", public),
                      ("eager path alone (autograd function)", lambda: op._EagerS2Attention.apply(*args)[0]),
                      ("custom op alone (what torch.compile traces)", lambda: op.s2_fwd_op(*args)[0])):
        with torch.no_grad():
            fwd_only = _median_us(fwd, calls)
        both = _median_us(lambda: torch.autograd.grad(fwd(), (q, k, v), grad_out), calls)
        rows.append({"path": name, "fwd_us": fwd_only, "fwd_bwd_us": both})
    return rows


def measure_gpu(seqs) -> list:
    """The calls of ``bench/attention.py`` (its shapes and its forward + backward step), timed three ways."""
    import triton
    from attention import B, D, H, bench_ms, fwd_bwd_step, rand
    layout = S2Layout(64, 16, 16)
    rows = []
    for seq in seqs:
        q, k, v = (rand(B, seq, H, D, requires_grad=False) for _ in range(3))

        def forward():
            return triton_s2.triton_s2_attention(q, k, v, layout, sm_scale=D ** -0.5)

        for name, fn in (("forward", forward), ("forward + backward", fwd_bwd_step(layout, seq))):
            fn()
            # calls few enough that the launch queue never fills; the GPU drained between the repeats
            host_us = _median_us(fn, 50, repeats=5, warmup=0, settle=torch.cuda.synchronize)
            rows.append({"seq": seq, "call": name, "host_us": host_us,
                         "do_bench_ms": bench_ms(fn),
                         "cudagraph_ms": triton.testing.do_bench_cudagraph(fn, rep=100, return_mode="median")})
    return rows


def main_gpu(args):
    from report import card_tag
    card = torch.cuda.get_device_name()
    rows = measure_gpu(args.seqs)
    lines = [f"# Host time and GPU time of one S2 attention call on {card}", "",
             f"`python bench/host_overhead.py --gpu`, torch {torch.__version__}, {os.cpu_count()} CPUs; B=1, H=32, "
             "D=128, bf16, L16V16. Host: microseconds per call enqueued back to back (median of 5 runs of 50 calls); "
             "do_bench and CUDA graph: medians in ms.", "",
             "| seq | call | host us | do_bench ms | CUDA graph ms |", "|---|---|---|---|---|"]
    lines += [f"| {r['seq']} | {r['call']} | {r['host_us']:.0f} | {r['do_bench_ms']:.3f} | {r['cudagraph_ms']:.3f} |"
              for r in rows]
    os.makedirs(args.out, exist_ok=True)
    write_markdown(os.path.join(args.out, f"host_overhead_{card_tag(card)}.md"), lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.path.join(ROOT, "bench", "results"))
    ap.add_argument("--gpu", action="store_true", help="real launches on the GPU (see above)")
    ap.add_argument("--seqs", type=int, nargs="+", default=[8192, 32768])
    args = ap.parse_args()
    if args.gpu:
        return main_gpu(args)
    rows = measure()
    lines = ["# Host time of one S2 attention call (kernel launches stubbed out)", "",
             f"`python bench/host_overhead.py` on {platform.processor() or platform.machine()} "
             f"({os.cpu_count()} CPUs), torch {torch.__version__}, Python {platform.python_version()}; "
             "q/k/v bf16 [1, 8192, 8, 128], L16V16; medians of 7 runs of 1000 calls, microseconds per call.", "",
             "| path | forward | forward + backward |", "|---|---|---|"]
    lines += [f"| {r['path']} | {r['fwd_us']:.1f} | {r['fwd_bwd_us']:.1f} |" for r in rows]
    os.makedirs(args.out, exist_ok=True)
    write_markdown(os.path.join(args.out, "host_overhead_cpu.md"), lines)


if __name__ == "__main__":
    main()
