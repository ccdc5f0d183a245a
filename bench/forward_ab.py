"""A/B of a Hopper kernel, the forward or the dQ: this tree's kernel against the one of a git revision, in one
process on one card.

The card's clock moves between calls and machines by more than the changes worth measuring (a few per cent), so the
two kernels run alternately, round by round, each through the same launcher (this tree's ``hopper_fwd.hopper_forward``
or ``hopper_dq.hopper_dq``: the base revision's kernel must take the same arguments), so that the host is left out:
the forward as CUDA-graph replays of 20 calls (2 at 128k), the dQ as its own kernel time under the profiler over 10
forward + backward calls (2 at 128k; a backward does not capture in a graph apart from its forward, and the whole
step would dilute the dQ's share). Each shape also checks whether the two outputs (O, or dQ) are bitwise equal, and
reports their largest difference.

    python bench/forward_ab.py --base 6fa2075 [--kernel dq] [--base-file FILE] [--rounds 4] [--shapes 8k,32k]
        [--out DIR]

Prints one line per shape (median ms of each kernel, new / base per round) and writes ``forward_ab_<card>.json``
(``dq_ab_<card>.json`` for the dQ: the run's environment with the base revision, and the shapes' results).
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

from report import run_env, write_rows  # noqa: E402
from s2megatron.ops.triton_s2 import hopper_dq, hopper_fwd  # noqa: E402
from s2megatron.sparsity import S2Layout  # noqa: E402

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# kernel: (this tree's module, its path, the kernel's name in it, the variable that makes the op take it)
KERNELS = {"forward": (hopper_fwd, "s2megatron/ops/triton_s2/hopper_fwd.py", "s2_fwd_hopper_kernel",
                       "S2MEGATRON_HOPPER_FWD"),
           "dq": (hopper_dq, "s2megatron/ops/triton_s2/hopper_dq.py", "s2_dq_hopper_kernel", "S2MEGATRON_HOPPER_DQ")}
# name, tokens, query heads, kv heads, head dim, block size, batch, vertical stride in blocks (None: 1024 tokens)
SHAPES = [("8k", 8192, 32, 32, 128, 64, 1, None), ("16k", 16384, 32, 32, 128, 64, 1, None),
          ("32k", 32768, 32, 32, 128, 64, 1, None), ("128k", 131072, 32, 32, 128, 64, 1, None),
          ("gqa8k", 8192, 32, 8, 128, 64, 1, None), ("d64_8k", 8192, 32, 32, 64, 64, 1, None),
          ("b128_16k", 16384, 32, 32, 128, 128, 1, None), ("b2_gqa_6000", 6000, 32, 8, 128, 64, 2, None),
          ("dense8k", 8192, 32, 32, 128, 64, 1, 1)]


def load_base(rev: str, root: str = _ROOT, source: str = None, kernel: str = "forward"):
    """The module of ``kernel`` (``hopper_fwd`` or ``hopper_dq``) at git revision ``rev`` (of the repository at
    ``root``; or its ``source`` text, on a machine without the repository's history), imported beside this tree's
    (its relative imports made absolute); ValueError where its kernel takes other arguments than this tree's."""
    this, path, attr, _ = KERNELS[kernel]
    if source is None:
        source = subprocess.run(["git", "-C", root, "show", f"{rev}:{path}"], capture_output=True, text=True,
                                check=True).stdout
    source = (source.replace("\nfrom . import", "\nfrom s2megatron.ops.triton_s2 import")
              .replace("\nfrom .", "\nfrom s2megatron.ops.triton_s2."))
    name = this.__name__.rsplit(".", 1)[1] + "_" + "".join(c if c.isalnum() else "_" for c in rev)
    path = os.path.join(tempfile.mkdtemp(prefix="forward_ab_"), name + ".py")
    with open(path, "w") as f:
        f.write(source)
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    base, new = getattr(module, attr), getattr(this, attr)
    if base.arg_names != new.arg_names:
        raise ValueError(f"the kernel at {rev} takes {base.arg_names}, this tree's launcher passes {new.arg_names}")
    return module


def _graph(call, calls: int):
    call()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            call()
    return graph


def _kernel_ms(call, calls: int, kernel_name: str) -> float:
    """Mean CUDA time of the kernel named ``kernel_name`` per call, over ``calls`` calls under the profiler."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            call()
        torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.key == kernel_name]
    if not events:
        raise RuntimeError(f"no {kernel_name} launch among {sorted(e.key for e in prof.key_averages())[:20]}")
    return sum(getattr(e, "device_time_total", None) or e.cuda_time_total for e in events) / 1000 / calls


def compare(kernels: dict, rounds: int, kernel: str = "forward", shapes=None) -> dict:
    """Per shape (``shapes``: names of ``SHAPES``, None for all): each kernel's median ms per round, new / base per
    round, whether the outputs (O, or dQ) are bitwise equal, and their largest difference."""
    import triton
    from s2megatron.ops.triton_s2 import triton_s2_attention
    this, _, attr, env = KERNELS[kernel]
    os.environ[env] = "1"
    names = list(kernels)
    results = {}
    for shape, n, hq, hkv, d, bs, batch, stride in SHAPES:
        if shapes is not None and shape not in shapes:
            continue
        layout = S2Layout(bs, 1024 // bs, stride or 1024 // bs)
        gen = torch.Generator(device="cuda").manual_seed(n)
        q = torch.randn(batch, n, hq, d, device="cuda", dtype=torch.bfloat16, generator=gen)
        k, v = (torch.randn(batch, n, hkv, d, device="cuda", dtype=torch.bfloat16, generator=gen) for _ in range(2))
        outs, timers = {}, {}
        if kernel == "forward":
            calls = 2 if n >= 131072 else 20

            def call():
                return triton_s2_attention(q, k, v, layout, sm_scale=d ** -0.5)
            with torch.no_grad():
                for name in names:
                    setattr(this, attr, kernels[name])
                    outs[name] = call().clone()
                    graph = _graph(call, calls)
                    timers[name] = lambda g=graph: statistics.median(triton.testing.do_bench(
                        g.replay, warmup=5, rep=900 if n >= 131072 else 300, return_mode="all")) / calls
        else:  # a forward + backward; dQ
            calls = 2 if n >= 131072 else 10
            for x in (q, k, v):
                x.requires_grad_(True)
            do = torch.randn(q.shape, device="cuda", dtype=q.dtype, generator=gen)

            def call():
                return torch.autograd.grad(triton_s2_attention(q, k, v, layout, sm_scale=d ** -0.5), (q, k, v), do)[0]
            for name in names:
                setattr(this, attr, kernels[name])
                outs[name] = call().clone()
                call()

                def timer(name=name):
                    setattr(this, attr, kernels[name])
                    return _kernel_ms(call, calls, attr)
                timers[name] = timer
        times = {name: [] for name in names}
        for r in range(3 if n >= 131072 else rounds):
            for name in (names if r % 2 == 0 else names[::-1]):
                times[name].append(timers[name]())
        results[shape] = {"ms": {name: statistics.median(t) for name, t in times.items()}, "rounds": times,
                          "new_over_base": [b / a for a, b in zip(times[names[0]], times[names[1]])],
                          "bitwise_equal": torch.equal(outs[names[0]], outs[names[1]]),
                          "max_abs_diff": (outs[names[0]].float() - outs[names[1]].float()).abs().max().item()}
        res = results[shape]
        print(f"{shape:12s} " + " ".join(f"{name} {ms:.4f}" for name, ms in res["ms"].items())
              + " new/base per round " + " ".join(f"{x:.3f}" for x in res["new_over_base"])
              + f" bitwise equal {res['bitwise_equal']} max abs diff {res['max_abs_diff']:.3g}", flush=True)
        del timers
    return results


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", required=True, help="git revision of the base kernel")
    ap.add_argument("--kernel", choices=sorted(KERNELS), default="forward")
    ap.add_argument("--base-file", help="that revision's module of the kernel (git show REV:PATH > FILE), where the "
                    "machine has no git history")
    ap.add_argument("--rounds", type=int, default=4, help="rounds per shape (3 at 128k)")
    ap.add_argument("--shapes", help="comma-separated names of the shapes to run (default: all): "
                    + ",".join(s[0] for s in SHAPES))
    ap.add_argument("--out", default=os.environ.get("OUT", os.path.join(_ROOT, "bench", "results")))
    args = ap.parse_args()
    shapes = None if args.shapes is None else args.shapes.split(",")
    unknown = sorted(set(shapes or ()) - {s[0] for s in SHAPES})
    if unknown:
        ap.error(f"unknown shapes {unknown}; valid: {[s[0] for s in SHAPES]}")
    if not torch.cuda.is_available():
        sys.exit("forward_ab needs a CUDA GPU (sm_90)")
    this, _, attr, _ = KERNELS[args.kernel]
    base = load_base(args.base, source=open(args.base_file).read() if args.base_file else None, kernel=args.kernel)
    new = getattr(this, attr)
    env = run_env()
    try:
        results = compare({"base": getattr(base, attr), "new": new}, args.rounds, args.kernel, shapes)
    finally:
        setattr(this, attr, new)
    stem = "forward_ab" if args.kernel == "forward" else f"{args.kernel}_ab"
    print("wrote", write_rows(args.out, stem, dict(env, base=args.base, kernel=args.kernel), results) + ".json")


if __name__ == "__main__":
    main()
