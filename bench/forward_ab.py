"""A/B of the Hopper forward kernel: this tree's ``s2_fwd_hopper_kernel`` against the one of a git revision, in one
process on one card.

The card's clock moves between calls and machines by more than the changes worth measuring (a few per cent), so the
two kernels run alternately, round by round, each through the same launcher (this tree's ``hopper_fwd.hopper_forward``:
the base revision's kernel must take the same arguments), timed as CUDA-graph replays of 20 forward calls (2 at 128k)
so that the host is left out. Each shape also checks that the two outputs are bitwise equal.

    python bench/forward_ab.py --base 6fa2075 [--base-file FILE] [--rounds 4] [--out DIR]

Prints one line per shape (median ms of each kernel, new / base per round) and writes ``forward_ab_<card>.json``
(the run's environment with the base revision, and the shapes' results).
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
from s2megatron.ops.triton_s2 import hopper_fwd  # noqa: E402
from s2megatron.sparsity import S2Layout  # noqa: E402

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_PATH = "s2megatron/ops/triton_s2/hopper_fwd.py"
# name, tokens, query heads, kv heads, head dim, block size, batch
SHAPES = [("8k", 8192, 32, 32, 128, 64, 1), ("16k", 16384, 32, 32, 128, 64, 1), ("32k", 32768, 32, 32, 128, 64, 1),
          ("128k", 131072, 32, 32, 128, 64, 1), ("gqa8k", 8192, 32, 8, 128, 64, 1), ("d64_8k", 8192, 32, 32, 64, 64, 1),
          ("b128_16k", 16384, 32, 32, 128, 128, 1), ("b2_gqa_6000", 6000, 32, 8, 128, 64, 2)]


def load_base(rev: str, root: str = _ROOT, source: str = None):
    """The module ``hopper_fwd`` of git revision ``rev`` (of the repository at ``root``; or its ``source`` text, on a
    machine without the repository's history), imported beside this tree's (its relative imports made absolute);
    ValueError where its kernel takes other arguments than this tree's."""
    if source is None:
        source = subprocess.run(["git", "-C", root, "show", f"{rev}:{_PATH}"], capture_output=True, text=True,
                                check=True).stdout
    source = source.replace("\nfrom .", "\nfrom s2megatron.ops.triton_s2.")
    name = "hopper_fwd_" + "".join(c if c.isalnum() else "_" for c in rev)
    path = os.path.join(tempfile.mkdtemp(prefix="forward_ab_"), name + ".py")
    with open(path, "w") as f:
        f.write(source)
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    base, new = module.s2_fwd_hopper_kernel, hopper_fwd.s2_fwd_hopper_kernel
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


def compare(kernels: dict, rounds: int) -> dict:
    """Per shape: each kernel's median ms per round (graph replay / calls), new / base per round, bitwise equality."""
    import triton
    from s2megatron.ops.triton_s2 import triton_s2_attention
    os.environ["S2MEGATRON_HOPPER_FWD"] = "1"
    names = list(kernels)
    results = {}
    for shape, n, hq, hkv, d, bs, batch in SHAPES:
        layout = S2Layout(bs, 1024 // bs, 1024 // bs)
        gen = torch.Generator(device="cuda").manual_seed(n)
        q = torch.randn(batch, n, hq, d, device="cuda", dtype=torch.bfloat16, generator=gen)
        k, v = (torch.randn(batch, n, hkv, d, device="cuda", dtype=torch.bfloat16, generator=gen) for _ in range(2))
        calls = 2 if n >= 131072 else 20
        outs, graphs = {}, {}
        with torch.no_grad():
            for name in names:
                hopper_fwd.s2_fwd_hopper_kernel = kernels[name]
                outs[name] = triton_s2_attention(q, k, v, layout, sm_scale=d ** -0.5).clone()
                graphs[name] = _graph(lambda: triton_s2_attention(q, k, v, layout, sm_scale=d ** -0.5), calls)
        times = {name: [] for name in names}
        for r in range(3 if n >= 131072 else rounds):
            for name in (names if r % 2 == 0 else names[::-1]):
                ms = triton.testing.do_bench(graphs[name].replay, warmup=5, rep=900 if n >= 131072 else 300,
                                             return_mode="all")
                times[name].append(statistics.median(ms) / calls)
        results[shape] = {"ms": {name: statistics.median(t) for name, t in times.items()}, "rounds": times,
                          "new_over_base": [b / a for a, b in zip(times[names[0]], times[names[1]])],
                          "bitwise_equal": torch.equal(outs[names[0]], outs[names[1]])}
        res = results[shape]
        print(f"{shape:12s} " + " ".join(f"{name} {ms:.4f}" for name, ms in res["ms"].items())
              + " new/base per round " + " ".join(f"{x:.3f}" for x in res["new_over_base"])
              + f" bitwise equal {res['bitwise_equal']}", flush=True)
        del graphs
    return results


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", required=True, help="git revision of the base kernel")
    ap.add_argument("--base-file", help="that revision's hopper_fwd.py (git show REV:PATH > FILE), where the machine "
                    "has no git history")
    ap.add_argument("--rounds", type=int, default=4, help="rounds per shape (3 at 128k)")
    ap.add_argument("--out", default=os.environ.get("OUT", os.path.join(_ROOT, "bench", "results")))
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("forward_ab needs a CUDA GPU (sm_90)")
    base = load_base(args.base, source=open(args.base_file).read() if args.base_file else None)
    new = hopper_fwd.s2_fwd_hopper_kernel
    env = run_env()
    try:
        results = compare({"base": base.s2_fwd_hopper_kernel, "new": new}, args.rounds)
    finally:
        hopper_fwd.s2_fwd_hopper_kernel = new
    print("wrote", write_rows(args.out, "forward_ab", dict(env, base=args.base), results) + ".json")


if __name__ == "__main__":
    main()
