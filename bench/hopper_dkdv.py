"""The two S2 dK/dV kernels side by side on one card: the Triton kernel and the warp-specialised Hopper kernel
(``s2megatron/ops/triton_s2/hopper_bwd.py``), switched per call with ``S2MEGATRON_HOPPER_BWD``.

B=1, H=32, D=128, bf16, L16V16 at block 64 (the issue's shape), lengths 8k-128k, plus a GQA (32 / 8) row, block 128
and dense mode (vert_stride 1) at 8k / 32k. Forward + backward medians of ``triton.testing.do_bench`` in ms (the
forward and dQ kernels are the same in both columns, so the difference is the dK/dV kernel's); each row checks that
the two kernels' dK and dV agree (max abs difference over max abs value) and that the Hopper kernel actually ran.
``--tiles`` times other tiles of the Hopper kernel beside the default.
Writes ``hopper_dkdv_<card>.md`` and ``.json``.

    python bench/hopper_dkdv.py [--seqs 8192 32768 ...] [--tiles block_m=64,stages=4 ...] [--out bench/results]
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import triton  # noqa: E402

from launches import record_launches  # noqa: E402
from report import run_env, write_markdown, write_rows  # noqa: E402
from s2megatron.ops.triton_s2 import hopper_bwd  # noqa: E402
from s2megatron.ops.triton_s2 import op as _op  # noqa: E402
from s2megatron.ops.triton_s2 import triton_s2_attention  # noqa: E402
from s2megatron.sparsity import S2Layout  # noqa: E402

_launches = record_launches(_op._hopper_bwd, "hopper_dkdv")
_real_tiles = _op._hopper_bwd.hopper_dkdv_tiles
_tiles = [None]  # tiles to time instead of the default


def _chosen_tiles(plan, q):
    tiles = _real_tiles(plan, q)
    return tiles if tiles is None or _tiles[0] is None else _tiles[0]


_op._hopper_bwd.hopper_dkdv_tiles = _chosen_tiles


def fwd_bwd_ms(layout, n, hq=32, hkv=32, d=128, hopper=False, tiles=None):
    os.environ["S2MEGATRON_HOPPER_BWD"] = "1" if hopper else "0"
    _tiles[0] = tiles
    gen = torch.Generator(device="cuda").manual_seed(n)
    q = torch.randn(1, n, hq, d, device="cuda", dtype=torch.bfloat16, generator=gen).requires_grad_()
    k, v = (torch.randn(1, n, hkv, d, device="cuda", dtype=torch.bfloat16, generator=gen).requires_grad_()
            for _ in range(2))
    dout = torch.randn(1, n, hq, d, device="cuda", dtype=torch.bfloat16, generator=gen)

    def fn():
        q.grad = k.grad = v.grad = None
        triton_s2_attention(q, k, v, layout, sm_scale=1 / math.sqrt(d)).backward(dout)

    del _launches[:]
    fn()
    ran = bool(_launches) and all(_launches)
    grads = (k.grad.clone(), v.grad.clone())
    ms = triton.testing.do_bench(fn, warmup=25, rep=1000 if n >= 131072 else 300, return_mode="median")
    return ms, grads, ran


def _rel(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


def row(name, layout, n, variants, hq=32, hkv=32, flops=None):
    t_ms, t_grads, _ = fwd_bwd_ms(layout, n, hq, hkv)
    res = dict(name=name, seq=n, triton_ms=t_ms, hopper={})
    for label, tiles in variants:
        h_ms, h_grads, ran = fwd_bwd_ms(layout, n, hq, hkv, hopper=True, tiles=tiles)
        res["hopper"][label] = dict(ms=h_ms, speedup=t_ms / h_ms, ran=ran,
                                    rel_diff=max(_rel(h, t) for h, t in zip(h_grads, t_grads)))
        if flops:
            res["hopper"][label]["tflops"] = flops / h_ms / 1e9
    if flops:
        res["triton_tflops"] = flops / t_ms / 1e9
    print(json.dumps(res), flush=True)
    return res


def _parse_tiles(spec):
    fields = dict(kv.split("=") for kv in spec.split(","))
    return dataclasses.replace(hopper_bwd.HopperDkdvTiles(), **{k: int(v) for k, v in fields.items()})


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seqs", type=int, nargs="*", default=[8192, 16384, 32768, 65536, 131072])
    ap.add_argument("--tiles", nargs="*", default=[], help="other Hopper tiles, e.g. block_m=64,stages=4")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = ap.parse_args()
    env = run_env()
    card = env["card"]
    variants = [("default", None)] + [(spec, _parse_tiles(spec)) for spec in args.tiles]
    s2 = S2Layout(64, 16, 16)
    rows = [row("L16V16", s2, n, variants) for n in args.seqs]
    rows.append(row("L16V16 GQA 32/8", s2, 32768, variants, hkv=8))
    rows.append(row("L8V8 block 128", S2Layout(128, 8, 8), 32768, variants))
    for n in (8192, 32768):  # causal fwd + bwd: 3.5x the forward's 2 matrix products
        rows.append(row("dense (vert_stride 1)", S2Layout(64, 1, 1), n, variants,
                        flops=3.5 * 4 * 32 * n * n * 128 / 2))
    base = write_rows(args.out, "hopper_dkdv", env, rows)
    labels = [label for label, _ in variants]
    lines = [f"# S2 forward + backward: Triton dK/dV vs warp-specialised Hopper dK/dV ({card})", "",
             f"torch {env['torch']}, triton {env['triton']}; B=1, H=32 (GQA row: 8 kv heads), D=128, bf16; medians "
             "of `triton.testing.do_bench`, ms, forward + backward; `python bench/hopper_dkdv.py`.", "",
             "| layout | seq | Triton dK/dV | " + " | ".join(f"Hopper dK/dV ({lb})" for lb in labels) +
             " | rel. diff dK, dV |", "|---|---|---|" + "---|" * len(labels) + "---|"]
    for r in rows:
        cells = []
        for lb in labels:
            h = r["hopper"][lb]
            tf = f", {h['tflops']:.0f} TFLOP/s" if "tflops" in h else ""
            ran = "" if h["ran"] else " (did not run)"
            cells.append(f"{h['ms']:.3f} ({h['speedup']:.2f}x{tf}){ran}")
        tf = f" ({r['triton_tflops']:.0f} TFLOP/s)" if "triton_tflops" in r else ""
        diff = max(h["rel_diff"] for h in r["hopper"].values())
        lines.append(f"| {r['name']} | {r['seq']} | {r['triton_ms']:.3f}{tf} | " + " | ".join(cells) +
                     f" | {diff:.1e} |")
    write_markdown(base + ".md", lines)


if __name__ == "__main__":
    main()
