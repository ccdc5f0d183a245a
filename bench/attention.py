"""Attention benchmark on one GPU: Triton S2 kernels vs SDPA-flash (FA2), SDPA-cuDNN and FlexAttention (same mask).

Shapes: batch 1, 32 heads, head dim 128, bf16, causal; S2 layout L16V16 at block 64 (head sliding, offset 1).
Times are medians of ``triton.testing.do_bench`` over at least ``MIN_SAMPLES`` repeats, in ms; baselines run in the
same process, on the same card.

    python bench/attention.py [--out DIR] [--quick] [--skip-baselines]
                              [--sweep-configs [--sweep-seqs N ...] [--variants JSON] [--only-sweep]]

Writes ``attention_<card>.md`` (tables), ``attention_<card>.json`` (raw numbers) and ``attention_<card>.png`` (if
matplotlib is installed) under ``--out`` (default ``$OUT`` or ``bench/results``).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import statistics
import sys
import time

import torch
import triton

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from report import card_tag, pyplot, write_markdown  # noqa: E402
from s2megatron.ops.triton_s2 import config as tile_cfg  # noqa: E402
from s2megatron.ops.triton_s2 import triton_s2_attention  # noqa: E402
from s2megatron.sparsity import S2Layout, build_metadata, get_metadata  # noqa: E402

B, H, D = 1, 32, 128
DT = torch.bfloat16
RESULTS: dict = {"rows": [], "dense": [], "block_sweep": [], "gqa": [], "metadata": [], "configs": [], "profile": {}}


MIN_SAMPLES = 10


def bench_ms(fn) -> float:
    """Median of ``triton.testing.do_bench`` (an L2 flush before each repeat, CUDA events around the call) over at
    least ``MIN_SAMPLES`` repeats: its 100 ms budget holds a single repeat of a 128k forward + backward, whose one
    sample then decided the table (80.1 or 87.6 ms in two runs on one H100; 12 repeats on one H100: 81.0-82.5)."""
    times = triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="all")
    if len(times) < MIN_SAMPLES:
        rep = 1.05 * MIN_SAMPLES * statistics.median(times)
        times = triton.testing.do_bench(fn, warmup=25, rep=rep, return_mode="all")
    return statistics.median(times)


def log(msg):
    print(msg, flush=True)


def rand(*shape, requires_grad=True):
    return torch.randn(*shape, device="cuda", dtype=DT).requires_grad_(requires_grad)


def density(layout: S2Layout, n: int, heads: int = H) -> float:
    """Kept fraction of the causal blocks."""
    nb = math.ceil(n / layout.block_size)
    kept = get_metadata(layout, heads, n, device="cuda").kept_blocks()
    return kept / (heads * nb * (nb + 1) / 2)


def ours(layout, n, hq=H, hkv=H, bwd=True):
    q, k, v = rand(B, n, hq, D), rand(B, n, hkv, D), rand(B, n, hkv, D)
    do = torch.randn_like(q)
    sm = 1.0 / math.sqrt(D)
    f = lambda: triton_s2_attention(q, k, v, layout, sm_scale=sm)  # noqa: E731
    f()
    res = {"fwd_ms": bench_ms(f)}
    if bwd:
        res["fwdbwd_ms"] = bench_ms(lambda: torch.autograd.grad(f(), (q, k, v), do))
    del q, k, v, do
    return res


def fwd_bwd_step(layout, n, sm_scale=D ** -0.5):
    """One forward + backward of our kernels at ``n`` tokens on fresh random inputs, as a function to call again."""
    q, k, v = rand(B, n, H, D), rand(B, n, H, D), rand(B, n, H, D)
    do = torch.randn_like(q)
    return lambda: torch.autograd.grad(triton_s2_attention(q, k, v, layout, sm_scale=sm_scale), (q, k, v), do)


def warm_up(layout, n=8192, seconds=1.0):
    """Untimed forward + backward steps for ``seconds`` before the first timed row: the process's first timed row
    otherwise measured up to 20 % slower than the same kernel later in the run (8k forward 0.427 / 0.453 ms against
    0.355 / 0.361, two calls on an H100)."""
    step = fwd_bwd_step(layout, n)
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        step()
        torch.cuda.synchronize()


def causal_flops(n):
    return 4 * B * H * n * n * D / 2


def s2_mask_mod(layout: S2Layout):
    bs, L, V = layout.block_size, layout.local_blocks, layout.vert_stride
    step = layout.step(H)
    off = layout.sliding_offset

    def mask(b, h, q_idx, kv_idx):
        qb, kb = q_idx // bs, kv_idx // bs
        return (q_idx >= kv_idx) & (((qb - kb) < L) | (((kb + h * step + off) % V) == 0))
    return mask


def baselines(n, layout, flex):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.attention.flex_attention import create_block_mask
    q, k, v = (torch.randn(B, H, n, D, device="cuda", dtype=DT, requires_grad=True) for _ in range(3))
    do = torch.randn_like(q)
    res = {}
    for name, be in (("fa2", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION)):
        try:
            with sdpa_kernel(be):
                f = lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)  # noqa: E731
                res[f"{name}_fwd_ms"] = bench_ms(f)
                res[f"{name}_fwdbwd_ms"] = bench_ms(lambda: torch.autograd.grad(f(), (q, k, v), do))
        except Exception as e:  # noqa: BLE001 - a missing backend is reported, not fatal
            res[name] = f"ERR {str(e)[:120]}"
    try:
        for _ in range(2):  # the second build is timed (the first one compiles)
            t0 = time.perf_counter()
            bm = create_block_mask(s2_mask_mod(layout), None, H, n, n, device="cuda", BLOCK_SIZE=128, _compile=True)
            torch.cuda.synchronize()
            res["flex_mask_build_ms"] = (time.perf_counter() - t0) * 1e3
        f = lambda: flex(q, k, v, block_mask=bm)  # noqa: E731
        ref = f()
        if n == 8192:  # our output on the same inputs (strided [B, S, H, D] views) agrees with Flex
            with torch.no_grad():
                mine = triton_s2_attention(*(x.transpose(1, 2) for x in (q, k, v)), layout, sm_scale=D ** -0.5)
            RESULTS["flex_check_rel_err"] = ((mine.transpose(1, 2).float() - ref.float()).abs().max()
                                             / ref.float().abs().max()).item()
        res["flex_fwd_ms"] = bench_ms(f)
        res["flex_fwdbwd_ms"] = bench_ms(lambda: torch.autograd.grad(f(), (q, k, v), do))
    except Exception as e:  # noqa: BLE001
        res["flex"] = f"ERR {str(e)[:200]}"
    del q, k, v, do
    torch.cuda.empty_cache()
    return res


def long_cudnn_fwd(n):
    """Dense causal forward through SDPA's cuDNN backend at ``n`` tokens (the baseline of the 256k row)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    q, k, v = (torch.randn(B, H, n, D, device="cuda", dtype=DT) for _ in range(3))
    try:
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION), torch.no_grad():
            return bench_ms(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True))
    except Exception as e:  # noqa: BLE001 - a missing backend is reported, not fatal
        return f"ERR {str(e)[:120]}"
    finally:
        del q, k, v
        torch.cuda.empty_cache()


def profile_split(layout, n):
    """CUDA time per kernel of one forward + backward (where the time goes)."""
    from torch.profiler import ProfilerActivity, profile
    f = fwd_bwd_step(layout, n, sm_scale=0.088)
    f()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            f()
        torch.cuda.synchronize()
    out = {}
    for ev in prof.key_averages():
        if ev.device_type.name == "CUDA" or getattr(ev, "self_device_time_total", 0) > 0:
            t = getattr(ev, "self_device_time_total", None) or getattr(ev, "self_cuda_time_total", 0)
            if t > 0:
                out[ev.key[:60]] = round(t / 5 / 1e3, 4)  # ms per call
    return out


def kernel_ms(split: dict, role: str):
    """The time in ``split`` (:func:`profile_split`) of the forward, dQ or dK/dV kernel (``role`` "fwd", "dq" or
    "dkdv"), whichever of the Triton and Hopper kernels ran, or "-"."""
    return next((ms for name, ms in split.items() if role in name), "-")


SWEEP_VARIANTS = [
    dict(), dict(fwd_tma=False, dq_tma=False, dkdv_tma=False),
    dict(fwd_tma=False), dict(fwd_block_m=128, fwd_warps=8), dict(fwd_stages=2), dict(fwd_stages=4),
    dict(dq_tma=False), dict(dq_stages=4), dict(block_m=64, dq_warps=4),
    dict(dkdv_tma=True), dict(dkdv_stages=4), dict(dkdv_block_m=64),
    dict(dkdv_heads_fastest_below=1 << 40), dict(dkdv_heads_fastest_below=0),  # dK/dV program order, fixed
]


def sweep_configs(layout, seqs, variants=None):
    """Forward / backward time of alternative tile shapes (each kernel varied alone), at each length of ``seqs``."""
    base = tile_cfg.tile_config
    variants = SWEEP_VARIANTS if variants is None else variants
    for n in seqs:
        for over in variants:
            def patched(bs, hd, mq, eb=2, gather_keys=True, _o=over):
                cfg = base(bs, hd, mq, eb, gather_keys)
                return dataclasses.replace(cfg, **_o) if hd == D and bs == 64 else cfg
            tile_cfg.tile_config = patched
            try:
                r = {"seq": n, **ours(layout, n)}
                r["bwd_ms"] = r["fwdbwd_ms"] - r["fwd_ms"]
                r["kernel_ms"] = {k: v for k, v in profile_split(layout, n).items() if k.startswith("s2_")}
            except Exception as e:  # noqa: BLE001 - e.g. out of shared memory for a tile shape
                r = {"seq": n, "error": str(e)[:160]}
            r["override"] = over
            RESULTS["configs"].append(r)
            log(f"config {over}: {r}")
    tile_cfg.tile_config = base


def metadata_times(layout):
    for n in (131072, 1 << 20):
        for dev in ("cpu", "cuda"):
            reps = 1 if (dev == "cpu" and n > 131072) else 3
            ts = []
            for _ in range(reps):
                t0 = time.perf_counter()
                build_metadata(layout, H, n, device=dev, rows_per_tile=2)
                if dev == "cuda":
                    torch.cuda.synchronize()
                ts.append((time.perf_counter() - t0) * 1e3)
            r = {"tokens": n, "device": dev, "ms": sorted(ts)[len(ts) // 2],
                 "cpu_threads": torch.get_num_threads()}
            RESULTS["metadata"].append(r)
            log(f"metadata {r}")


def write_outputs(out_dir, card, echo=False):
    tag = card_tag(card)
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, f"attention_{tag}.json"), "w") as f:
        json.dump(RESULTS, f, indent=1)
    env = RESULTS.get("env", {"torch": torch.__version__, "triton": triton.__version__})
    lines = [f"# S2 attention benchmark on {card}", "",
             f"torch {env['torch']}, triton {env['triton']}; B={B}, H={H}, D={D}, bf16, causal; "
             "L16V16 at block 64 (head sliding, offset 1); medians of triton.testing.do_bench over at least "
             f"{MIN_SAMPLES} repeats, ms. "
             "FlexAttention runs at its 128-token blocks with the same mask_mod.", "",
             f"## L16V16, block 64 ({card})", "",
             "| seq | density | ours fwd | ours fwd+bwd | FA2 fwd | FA2 fwd+bwd | cuDNN fwd | cuDNN fwd+bwd | "
             "Flex fwd | Flex fwd+bwd | Flex mask build |", "|" + "---|" * 11]
    fmt = lambda x: f"{x:.3f}" if isinstance(x, float) else str(x)  # noqa: E731
    for r in RESULTS["rows"]:
        lines.append("| " + " | ".join(fmt(r.get(c, "-")) for c in (
            "seq", "density", "fwd_ms", "fwdbwd_ms", "fa2_fwd_ms", "fa2_fwdbwd_ms", "cudnn_fwd_ms",
            "cudnn_fwdbwd_ms", "flex_fwd_ms", "flex_fwdbwd_ms", "flex_mask_build_ms")) + " |")
    lines += ["", f"## Dense mode (vert_stride 1), TFLOP/s on causal FLOPs ({card})", "",
              "| seq | fwd ms | fwd TFLOP/s | bwd ms | bwd TFLOP/s | bwd/fwd |", "|---|---|---|---|---|---|"]
    for r in RESULTS["dense"]:
        lines.append(f"| {r['seq']} | {r['fwd_ms']:.3f} | {r['fwd_tflops']:.0f} | {r['bwd_ms']:.3f} | "
                     f"{r['bwd_tflops']:.0f} | {r['bwd_ms'] / r['fwd_ms']:.2f} |")
    lines += ["", f"## Block-size sweep at equal token window (1024-token local window, stripe every 1024 tokens), "
              f"seq 32k ({card})", "", "| block | layout | density | fwd ms | fwd+bwd ms |", "|---|---|---|---|---|"]
    for r in RESULTS["block_sweep"]:
        lines.append(f"| {r['block']} | {r['layout']} | {r['density']:.3f} | {r['fwd_ms']:.3f} | "
                     f"{r['fwdbwd_ms']:.3f} |")
    lines += ["", f"## GQA 32 query / 8 kv heads, L16V16 ({card})", "",
              "| seq | ours GQA fwd | fwd+bwd | ours MHA fwd | fwd+bwd |", "|---|---|---|---|---|"]
    for r in RESULTS["gqa"]:
        lines.append(f"| {r['seq']} | {r['fwd_ms']:.3f} | {r['fwdbwd_ms']:.3f} | {r.get('mha_fwd_ms', '-')} | "
                     f"{r.get('mha_fwdbwd_ms', '-')} |")
    if RESULTS.get("long_fwd"):
        lines += ["", f"## Forward only at 256k, L16V16 ({card}), ms", "", "| seq | ours fwd | cuDNN dense fwd |",
                  "|---|---|---|"]
        lines += [f"| {r['seq']} | {fmt(r.get('fwd_ms', '-'))} | {fmt(r.get('cudnn_fwd_ms', '-'))} |"
                  for r in RESULTS["long_fwd"]]
    lines += ["", f"## Metadata build (L16V16, 32 heads, block 64, rows_per_tile 2) ({card} host)", "",
              "| tokens | device | ms |", "|---|---|---|"]
    for r in RESULTS["metadata"]:
        lines.append(f"| {r['tokens']} | {r['device']} ({r['cpu_threads']} CPU threads) | {r['ms']:.1f} |")
    if RESULTS["profile"]:
        lines += ["", f"## Kernel time split, one fwd+bwd at 32k ({card}), ms", "", "| kernel | ms |", "|---|---|"]
        lines += [f"| {k} | {v} |" for k, v in sorted(RESULTS["profile"].items(), key=lambda x: -x[1])]
    if RESULTS["configs"]:
        lines += ["", f"## Tile shapes of the Triton kernels (L16V16, block 64; each row changes the default tiles; "
                  f"the Hopper kernels, where they run, keep theirs) ({card}), ms", "",
                  "| seq | change | fwd | fwd+bwd | forward kernel | dQ kernel | dK/dV kernel |",
                  "|---|---|---|---|---|---|---|"]
        for r in RESULTS["configs"]:
            km = r.get("kernel_ms", {})
            lines.append(f"| {r['seq']} | {r['override'] or 'default'} | "
                         f"{fmt(r.get('fwd_ms', r.get('error', '-')))} | {fmt(r.get('fwdbwd_ms', '-'))} | "
                         + " | ".join(str(kernel_ms(km, role)) for role in ("fwd", "dq", "dkdv")) + " |")
    errs = [f"{k} at {r['seq']}: {v}" for r in RESULTS["rows"] for k, v in r.items()
            if isinstance(v, str) and v.startswith("ERR")]
    if errs:
        lines += ["", "Baselines that failed to run: " + "; ".join(errs)]
    if "flex_check_rel_err" in RESULTS:
        lines += ["", f"Agreement with FlexAttention at 8k (bf16): max abs err / max abs = "
                  f"{RESULTS['flex_check_rel_err']:.2e}."]
    plt = pyplot()
    if plt is not None:
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        for ax, kind in zip(axes, ("fwd_ms", "fwdbwd_ms")):
            for name, pre in (("ours", ""), ("FA2", "fa2_"), ("cuDNN", "cudnn_"), ("Flex", "flex_")):
                pts = [(r["seq"], r[pre + kind]) for r in RESULTS["rows"] if isinstance(r.get(pre + kind), float)]
                if pts:
                    ax.plot(*zip(*pts), marker="o", label=name)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("sequence length")
            ax.set_ylabel("ms")
            ax.set_title(kind.replace("_ms", "").replace("fwdbwd", "fwd+bwd") + f" ({card})")
            ax.legend()
        fig.tight_layout()
        fig.savefig(os.path.join(out_dir, f"attention_{tag}.png"), dpi=110)
        plt.close(fig)
        lines += ["", f"Plot: attention_{tag}.png"]
    else:
        lines += ["", "No plot: matplotlib is not installed on the benchmark machine."]
    write_markdown(os.path.join(out_dir, f"attention_{tag}.md"), lines, echo=echo)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT") or os.path.join(os.path.dirname(__file__), "results"))
    ap.add_argument("--quick", action="store_true", help="8k and 32k only, no 128k and 256k")
    ap.add_argument("--sweep-configs", action="store_true")
    ap.add_argument("--skip-baselines", action="store_true")
    ap.add_argument("--only-sweep", action="store_true")
    ap.add_argument("--sweep-seqs", type=int, nargs="+", default=[8192, 32768], help="lengths of --sweep-configs")
    ap.add_argument("--variants", type=json.loads, default=None,
                    help="--sweep-configs variants as a JSON list of TileConfig overrides (default: SWEEP_VARIANTS)")
    ap.add_argument("--probe", action="store_true", help="one warm-up and one timed fwd+bwd at 32k (for ncu)")
    ap.add_argument("--probe-seq", type=int, default=32768, help="the length of --probe")
    args = ap.parse_args()
    if args.probe:
        lay = S2Layout(64, 16, 16)
        for _ in range(2):
            q, k, v = (rand(B, args.probe_seq, H, D) for _ in range(3))
            torch.autograd.grad(triton_s2_attention(q, k, v, lay, sm_scale=0.088), (q, k, v), torch.randn_like(q))
        torch.cuda.synchronize()
        return
    card = torch.cuda.get_device_name()
    log(f"{card} torch {torch.__version__} triton {triton.__version__}")
    RESULTS["env"] = {"card": card, "torch": torch.__version__, "triton": triton.__version__}
    lay = S2Layout(64, 16, 16)
    if args.sweep_configs:
        sweep_configs(lay, args.sweep_seqs, args.variants)
        if args.only_sweep:
            return
    seqs = [8192, 32768] if args.quick else [8192, 32768, 131072]
    warm_up(lay)
    # ours first, written out after every section, so a time limit still leaves the finished parts on disk
    for n in seqs:
        r = {"seq": n, "density": round(density(lay, n), 4), **ours(lay, n)}
        RESULTS["rows"].append(r)
        log(f"ours {r}")
    dense = S2Layout(64, 1, 1)
    for n in (8192, 32768):
        r = ours(dense, n)
        r.update(seq=n, bwd_ms=r["fwdbwd_ms"] - r["fwd_ms"])
        r["fwd_tflops"] = causal_flops(n) / r["fwd_ms"] / 1e9
        r["bwd_tflops"] = 2.5 * causal_flops(n) / r["bwd_ms"] / 1e9
        RESULTS["dense"].append(r)
        log(f"dense {r}")
    for bs in (16, 32, 64, 128):
        lb = S2Layout(bs, 1024 // bs, 1024 // bs)
        r = {"block": bs, "layout": lb.name, "density": density(lb, 32768), **ours(lb, 32768)}
        RESULTS["block_sweep"].append(r)
        log(f"block {r}")
    for n in (8192, 32768):
        r = {"seq": n, **ours(lay, n, hq=32, hkv=8)}
        mha = next((x for x in RESULTS["rows"] if x["seq"] == n), None)
        if mha:
            r["mha_fwd_ms"], r["mha_fwdbwd_ms"] = round(mha["fwd_ms"], 3), round(mha["fwdbwd_ms"], 3)
        RESULTS["gqa"].append(r)
        log(f"gqa {r}")
    try:
        RESULTS["profile"] = profile_split(lay, 32768)
    except Exception as e:  # noqa: BLE001 - the profiler is an extra; the timings stand without it
        log(f"profile failed: {e}")
    metadata_times(lay)
    if not args.quick:  # forward only at 256k (the backward's activations alone are 8 GB per tensor set)
        RESULTS["long_fwd"] = [{"seq": 262144, **ours(lay, 262144, bwd=False)}]
    write_outputs(args.out, card)
    if args.skip_baselines:
        return
    for r in RESULTS.get("long_fwd", []):
        r["cudnn_fwd_ms"] = long_cudnn_fwd(r["seq"])
        log(f"long {r}")
    from torch.nn.attention.flex_attention import flex_attention
    flex = torch.compile(flex_attention, dynamic=False)
    for r in RESULTS["rows"]:
        r.update(baselines(r["seq"], lay, flex))
        log(f"row {r}")
        write_outputs(args.out, card)


if __name__ == "__main__":
    main()
