"""The two S2 forward kernels side by side on one card: the Triton forward and the warp-specialised Hopper forward
(``s2megatron/ops/triton_s2/hopper_fwd.py``), switched per call with ``S2MEGATRON_HOPPER_FWD``.

B=1, H=32, D=128, bf16, L16V16 at block 64 (the issue's shape), lengths 8k-256k, plus a GQA (32 / 8) row, block 128
and dense mode (vert_stride 1) TFLOP/s at 8k / 32k; the Hopper kernel with the grid its policy picks and with one CTA
per query tile. Medians of ``triton.testing.do_bench`` in ms; each row checks that the two outputs agree (max abs difference over max abs output) and that the Hopper kernel actually ran.
Writes ``hopper_forward_<card>.md`` and ``.json``.

    python bench/hopper_forward.py [--seqs 8192 32768 ...] [--out bench/results]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import triton  # noqa: E402

from launches import record_launches  # noqa: E402
from report import run_env, write_markdown, write_rows  # noqa: E402
from s2megatron.ops.triton_s2 import op as _op  # noqa: E402
from s2megatron.ops.triton_s2 import triton_s2_attention  # noqa: E402
from s2megatron.sparsity import S2Layout  # noqa: E402

_launches = record_launches(_op._hopper, "hopper_forward")
_PERSISTENT_ROW_SHARE = _op._hopper.PERSISTENT_ROW_SHARE


def forward_ms(layout, n, hq=32, hkv=32, d=128, hopper=False, per_tile=False):
    """Median ms of the forward; ``per_tile``: the Hopper kernel with one CTA per query tile, not its policy's grid."""
    os.environ["S2MEGATRON_HOPPER_FWD"] = "1" if hopper else "0"
    _op._hopper.PERSISTENT_ROW_SHARE = 0.0 if per_tile else _PERSISTENT_ROW_SHARE
    gen = torch.Generator(device="cuda").manual_seed(n)
    q = torch.randn(1, n, hq, d, device="cuda", dtype=torch.bfloat16, generator=gen)
    k, v = (torch.randn(1, n, hkv, d, device="cuda", dtype=torch.bfloat16, generator=gen) for _ in range(2))
    fn = lambda: triton_s2_attention(q, k, v, layout, sm_scale=1 / math.sqrt(d))  # noqa: E731
    del _launches[:]
    out = fn()
    ran = bool(_launches) and all(_launches)
    ms = triton.testing.do_bench(fn, warmup=25, rep=1000 if n >= 131072 else 300, return_mode="median")
    return ms, out, ran


def row(name, layout, n, hq=32, hkv=32, flops=None):
    t_ms, t_out, _ = forward_ms(layout, n, hq, hkv, hopper=False)
    h_ms, h_out, ran = forward_ms(layout, n, hq, hkv, hopper=True)
    p_ms, _, _ = forward_ms(layout, n, hq, hkv, hopper=True, per_tile=True)
    diff = ((h_out.float() - t_out.float()).abs().max() / t_out.float().abs().max()).item()
    res = dict(name=name, seq=n, triton_ms=t_ms, hopper_ms=h_ms, hopper_per_tile_ms=p_ms, speedup=t_ms / h_ms,
               hopper_ran=ran, rel_diff=diff)
    if flops:
        res["triton_tflops"] = flops / t_ms / 1e9
        res["hopper_tflops"] = flops / h_ms / 1e9
    print(json.dumps(res), flush=True)
    return res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seqs", type=int, nargs="*", default=[8192, 16384, 32768, 65536, 131072, 262144])
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = ap.parse_args()
    env = run_env()
    card = env["card"]
    s2 = S2Layout(64, 16, 16)
    rows = [row("L16V16", s2, n) for n in args.seqs]
    rows.append(row("L16V16 GQA 32/8", s2, 32768, hkv=8))
    rows.append(row("L8V8 block 128", S2Layout(128, 8, 8), 32768))
    for n in (8192, 32768):
        rows.append(row("dense (vert_stride 1)", S2Layout(64, 1, 1), n, flops=4 * 32 * n * n * 128 / 2))  # causal
    base = write_rows(args.out, "hopper_forward", env, rows)
    lines = [f"# S2 forward: Triton kernel vs warp-specialised Hopper kernel ({card})", "",
             f"torch {env['torch']}, triton {env['triton']}; B=1, H=32 (GQA row: 8 kv heads), D=128, bf16; medians "
             "of `triton.testing.do_bench`, ms; `python bench/hopper_forward.py`.", "",
             "Hopper fwd: the grid its policy picks (persistent, one CTA per SM, where the rows keep under half of "
             "the keys; else one CTA per query tile); the next column: one CTA per query tile always.", "",
             "| layout | seq | Triton fwd | Hopper fwd | Hopper, one CTA per tile | speed-up | TFLOP/s (Triton / Hopper) "
             "| rel. diff |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        tf = f"{r['triton_tflops']:.0f} / {r['hopper_tflops']:.0f}" if "triton_tflops" in r else ""
        ran = "" if r["hopper_ran"] else " (Hopper kernel did not run)"
        lines.append(f"| {r['name']} | {r['seq']} | {r['triton_ms']:.3f} | {r['hopper_ms']:.3f}{ran} | "
                     f"{r['hopper_per_tile_ms']:.3f} | {r['speedup']:.2f}x | {tf} | {r['rel_diff']:.1e} |")
    write_markdown(base + ".md", lines)


if __name__ == "__main__":
    main()
