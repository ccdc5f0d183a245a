"""End-to-end training throughput: S2 attention vs dense, through the same code path as train.py.

    python bench/train_throughput.py --model 1.3b --seq 8192 32768                        # one GPU
    python bench/train_throughput.py --model 7b --seq 8192 32768 --nproc 4 --tp 4 \\
        --variants dense_cudnn s2 hybrid                                                   # TP4 on 4 GPUs

Each (sequence length, variant) point runs in its own process (torchrun when --nproc > 1): the training loop
(s2megatron.training.Trainer) for ``--warmup + --steps`` optimizer steps with evaluation, passkey and
checkpoints off; reported are the median tokens/s of the timed steps, MFU (model FLOPs with causal dense
attention counted the same for every variant, divided by the card's dense bf16 peak) and the peak GPU memory.

Variants: ``dense_cudnn`` / ``dense_fa2`` (sparsity=dense, attention.backend=sdpa pinned to cuDNN / flash),
``dense_ours`` (sparsity=dense through the Triton S2 kernels, vert_stride 1), ``s2`` (L16V16 in every layer),
``hybrid`` (conf/sparsity/hybrid.yaml: some dense layers). Writes ``train_throughput_<card>.{json,md}`` (and a
plot when matplotlib is present) under --out-dir.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from report import card_tag, pyplot, write_markdown  # noqa: E402

VARIANTS = {
    "dense_cudnn": (["sparsity=dense", "attention.backend=sdpa"], "CUDNN_ATTENTION"),
    "dense_fa2": (["sparsity=dense", "attention.backend=sdpa"], "FLASH_ATTENTION"),
    "dense_ours": (["sparsity=dense", "attention.backend=triton"], None),
    "s2": (["sparsity=l16v16", "attention.backend=triton"], None),
    # hybrid: sparse layers through the Triton kernels, its dense layers through SDPA (attention.backend=auto)
    "hybrid": (["sparsity=hybrid", "attention.backend=auto"], None),
}

# Kernel-name fragments -> category, for the per-step profile (first match wins).
KERNEL_CATEGORIES = (
    ("attention fwd (S2 Triton)", ("s2_fwd_kernel",)),
    ("attention bwd (S2 Triton)", ("s2_bwd",)),
    ("attention (SDPA cuDNN/flash)", ("cudnn", "fmha", "flash", "sdpa", "attention")),
    ("GEMM", ("gemm", "xmma", "cutlass", "nvjet", "matmul", "sm90", "sm80")),
    ("NCCL", ("nccl",)),
)


def profile_summary(prof, steps: int) -> dict:
    """CUDA time per step by kernel category, plus the top kernels, from a torch.profiler run over ``steps``."""
    per_cat, top, ops = {}, [], []
    for evt in prof.key_averages():
        dev_us = getattr(evt, "self_device_time_total", None)
        if dev_us is None:
            dev_us = getattr(evt, "self_cuda_time_total", 0)
        if not dev_us:
            continue
        name = evt.key
        if name.startswith("ProfilerStep") or getattr(evt, "is_user_annotation", False) or "#" in name:
            continue  # ranges (a whole step, the optimizer step), not kernels
        if evt.device_type.name != "CUDA":  # a CPU op: the kernels it launched itself (who spends the time)
            ops.append((dev_us / 1e3 / steps, evt.count // steps, name[:90]))
            continue
        cat = next((c for c, frags in KERNEL_CATEGORIES if any(f in name.lower() for f in frags)), "other")
        per_cat[cat] = per_cat.get(cat, 0.0) + dev_us / 1e3 / steps
        top.append((dev_us / 1e3 / steps, name[:160]))
    top.sort(reverse=True)
    ops.sort(reverse=True)
    return {"ms_per_step_by_category": {k: round(v, 2) for k, v in sorted(per_cat.items(), key=lambda kv: -kv[1])},
            "top_kernels_ms_per_step": [(round(t, 2), n) for t, n in top[:30]],
            "top_ops_ms_per_step": [(round(t, 2), c, n) for t, c, n in ops[:30]]}


def idle_summary(prof, steps: int, min_gap_us: float = 20.0) -> dict:
    """GPU idle time per step (gaps between kernels longer than ``min_gap_us``) and, per gap, the innermost CPU
    operator running at its midpoint: where the host keeps the GPU waiting. The profiler's own overhead lengthens
    host time, so these are upper bounds."""
    events = [e for e in prof.events() if not e.name.startswith("ProfilerStep") and "#" not in e.name]
    kernels = sorted((e.time_range.start, e.time_range.end) for e in events if e.device_type.name == "CUDA")
    if not kernels:
        return {}
    gaps, end = [], kernels[0][1]
    for start, stop in kernels[1:]:
        if start - end > min_gap_us:
            gaps.append((end, start))
        end = max(end, stop)
    host = sorted(((e.time_range.start, e.time_range.end, e.name) for e in events
                   if e.device_type.name == "CPU" and not e.name.startswith("cuda")), key=lambda t: t[0])
    by_op = {}
    for g0, g1 in gaps:
        mid = (g0 + g1) / 2
        inner = [h for h in host if h[0] <= mid <= h[1]]
        name = min(inner, key=lambda h: h[1] - h[0])[2] if inner else "(no operator: host between ops)"
        by_op[name] = by_op.get(name, 0.0) + (g1 - g0)
    total = sum(g1 - g0 for g0, g1 in gaps)
    top = sorted(by_op.items(), key=lambda kv: -kv[1])[:12]
    return {"idle_ms_per_step": round(total / 1e3 / steps, 2), "gaps_per_step": len(gaps) // max(steps, 1),
            "idle_by_host_op_ms_per_step": [(round(t / 1e3 / steps, 2), n[:90]) for n, t in top]}


def worker(args) -> None:
    """One point, inside its own process (rank 0 writes the result)."""
    import contextlib

    import torch
    from hydra import compose, initialize_config_dir

    sys.path.insert(0, ROOT)
    from s2megatron.training import Trainer, plan_run

    overrides, sdpa_backend = VARIANTS[args.variant]
    tokens_per_step = args.tokens_per_step or args.seq
    global_batch = max(1, tokens_per_step // args.seq) * args.dp
    out_dir = tempfile.mkdtemp(prefix=f"tp_{args.variant}_")
    overrides = overrides + [
        f"model={args.model}", f"train.seq_len={args.seq}", "train.micro_batch=1",
        f"train.global_batch={global_batch}", f"train.steps={args.warmup + args.steps}", f"train.out_dir={out_dir}",
        f"train.log_interval={args.warmup + args.steps}", "train.eval_interval=0", "train.eval_iters=0",
        "train.save_interval=0", "train.save_on_exit=false", "eval.passkey.enabled=false",
        f"parallel.tp={args.tp}", f"parallel.pp={args.pp}", f"parallel.sp={str(args.tp > 1).lower()}",
        f"optim.warmup_steps={args.warmup}",
    ] + (["train.recompute=full"] if args.recompute else []) + list(args.extra)
    with initialize_config_dir(config_dir=os.path.join(ROOT, "conf"), version_base=None):
        cfg = compose("config", overrides=overrides)
    ctx = contextlib.nullcontext()
    if sdpa_backend:
        from torch.nn.attention import SDPBackend, sdpa_kernel
        ctx = sdpa_kernel(getattr(SDPBackend, sdpa_backend))
    trainer = Trainer(cfg, plan_run(cfg))
    try:
        trainer.setup()
        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        prof_ctx = contextlib.nullcontext()
        if args.profile and cuda:
            from torch.profiler import ProfilerActivity, profile, schedule
            # only the timed steps (after warm-up: compilation, allocator growth)
            prof_ctx = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA],
                               schedule=schedule(wait=0, warmup=args.warmup, active=args.steps, repeat=1))
        with ctx, prof_ctx as prof:
            if prof is not None:
                trainer.on_step_end = lambda step: prof.step()
            result = trainer.train()
        timed = result.step_times_s[args.warmup:]
        step_s = statistics.median(timed)
        tokens_per_s = result.tokens_per_step / step_s
        from s2megatron.training.metrics import peak_flops_per_s
        peak = peak_flops_per_s(trainer.device, trainer.plan.precision)
        world = trainer.plan.world_size
        mfu = trainer.flops_per_token * tokens_per_s / (peak * world) if peak else None
        mem = torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0
        mem_t = torch.tensor([mem], device=trainer.device)
        torch.distributed.all_reduce(mem_t, op=torch.distributed.ReduceOp.MAX)
        if trainer.env.is_main:
            row = {"model": args.model, "seq": args.seq, "variant": args.variant, "tp": args.tp, "pp": args.pp,
                   "gpus": world, "recompute": "full" if args.recompute else None,
                   "tokens_per_step": result.tokens_per_step, "step_s_median": step_s,
                   "step_s_all": result.step_times_s, "tokens_per_s": tokens_per_s, "mfu": mfu,
                   "peak_mem_gib": float(mem_t.item()), "losses": result.losses,
                   "card": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__,
                   "triton": __import__("triton").__version__, "sdpa_backend": sdpa_backend,
                   "overrides": overrides}
            if args.profile and cuda:
                row["profile"] = profile_summary(prof, args.steps)
                row["profile"].update(idle_summary(prof, args.steps))
            with open(args.result, "w") as f:
                json.dump(row, f)
    finally:
        trainer.close()


def point_command(args, seq: int, variant: str, result: str) -> list:
    """The command line of one point: this script in worker mode (under torchrun when --nproc > 1)."""
    cmd = [sys.executable]
    if args.nproc > 1:
        cmd += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}"]
    cmd += [os.path.abspath(__file__), "--worker", "--model", args.model, "--seq", str(seq), "--variant", variant,
            "--steps", str(args.steps), "--warmup", str(args.warmup), "--tp", str(args.tp), "--pp", str(args.pp),
            "--dp", str(args.nproc // (args.tp * args.pp)), "--result", result,
            "--tokens-per-step", str(args.tokens_per_step or 0)] + (["--profile"] if args.profile else [])
    if args.recompute_from and seq >= args.recompute_from:
        cmd += ["--recompute"]
    cmd += ["--extra", *args.extra] if args.extra else []
    return cmd


def run_point(args, seq, variant) -> dict:
    fd, result = tempfile.mkstemp(suffix=".json")
    os.close(fd)
    cmd = point_command(args, seq, variant, result)
    print("+", shlex.join(cmd), flush=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.run(cmd, cwd=ROOT, env=env, timeout=args.point_timeout)
    if proc.returncode != 0 or os.path.getsize(result) == 0:
        return {"model": args.model, "seq": seq, "variant": variant, "error": f"exit code {proc.returncode}"}
    with open(result) as f:
        row = json.load(f)
    os.unlink(result)
    print(f"  {variant:12s} seq {seq:6d}: {row['tokens_per_s']:10.0f} tok/s  MFU "
          f"{(row['mfu'] or 0):6.1%}  mem {row['peak_mem_gib']:6.1f} GiB", flush=True)
    return row


def write_report(rows, out_dir, tag=""):
    ok = [r for r in rows if "error" not in r]
    card = ok[0]["card"] if ok else "unknown"
    slug = card_tag(card)
    model = rows[0]["model"]
    tag = tag.lstrip("_")
    stem = os.path.join(out_dir, f"train_throughput_{model}_{slug}{'_' + tag if tag else ''}")
    with open(stem + ".json", "w") as f:
        json.dump(rows, f, indent=1)
    lines = [f"# Training throughput, model {model}, {card}", ""]
    if ok:
        r0 = ok[0]
        def accumulation(r):
            micro = max(1, r["tokens_per_step"] // (r["seq"] * r["gpus"] // r["tp"] // r["pp"]))
            return (f"{r['tokens_per_step']:,} tokens per optimizer step ({micro} "
                    f"micro-batch{'es' if micro > 1 else ''} of {r['seq']:,} tokens per data-parallel rank)")
        per_step = ", ".join(sorted({accumulation(r) for r in ok}))
        lines += [f"torch {r0['torch']}, triton {r0['triton']}, {r0['gpus']} GPU(s), TP{r0['tp']} PP{r0['pp']}; "
                  f"{per_step}; tokens/s = median over the timed steps (after the warm-up steps); MFU counts causal "
                  "dense attention for every variant.", ""]
    lines += ["| seq | variant | tokens/s | vs dense cuDNN | vs dense FA2 | MFU | peak mem GiB | recompute |",
              "|---|---|---|---|---|---|---|---|"]
    for seq in sorted({r["seq"] for r in rows}):
        at = {r["variant"]: r for r in rows if r["seq"] == seq}
        base = {k: at[k]["tokens_per_s"] for k in ("dense_cudnn", "dense_fa2") if k in at and "error" not in at[k]}
        for name, r in at.items():
            if "error" in r:
                lines.append(f"| {seq} | {name} | {r['error']} | | | | | |")
                continue
            rel = [f"{r['tokens_per_s'] / base[k]:.2f}x" if k in base else "-" for k in ("dense_cudnn", "dense_fa2")]
            mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "n/a"
            lines.append(f"| {seq} | {name} | {r['tokens_per_s']:,.0f} | {rel[0]} | {rel[1]} | {mfu} | "
                         f"{r['peak_mem_gib']:.1f} | {r['recompute'] or '-'} |")
    profiled = [r for r in ok if r.get("profile")]
    if profiled:
        lines += ["", "GPU time per step by kernel category (torch.profiler, ms; averaged over the timed steps):", "",
                  "| seq | variant | step ms (median) | " + " | ".join(c for c, _ in KERNEL_CATEGORIES) + " | other |",
                  "|---|---|---|" + "---|" * (len(KERNEL_CATEGORIES) + 1)]
        for r in profiled:
            cats = r["profile"]["ms_per_step_by_category"]
            cells = [f"{cats.get(c, 0):.0f}" for c, _ in KERNEL_CATEGORIES] + [f"{cats.get('other', 0):.0f}"]
            lines.append(f"| {r['seq']} | {r['variant']} | {r['step_s_median'] * 1e3:.0f} | "
                         + " | ".join(cells) + " |")
        for r in profiled:
            idle = r["profile"].get("idle_by_host_op_ms_per_step")
            if idle:
                lines += ["", f"GPU idle, {r['seq']} {r['variant']}: {r['profile']['idle_ms_per_step']} ms per step in "
                          f"{r['profile']['gaps_per_step']} gaps; host operator running mid-gap (ms per step):", "",
                          "| ms | host operator |", "|---|---|"]
                lines += [f"| {ms:.1f} | `{name}` |" for ms, name in idle]
            ops = r["profile"].get("top_ops_ms_per_step", [])[:15]
            if ops:
                lines += ["", f"Top operators by GPU time of their own kernels, {r['seq']} {r['variant']} "
                          "(ms per step, calls per step):", "", "| ms | calls | operator |", "|---|---|---|"]
                lines += [f"| {ms:.1f} | {calls} | `{name}` |" for ms, calls, name in ops]
    write_markdown(stem + ".md", lines)
    plt = pyplot()
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    seqs = sorted({r["seq"] for r in ok})
    names = list(dict.fromkeys(r["variant"] for r in ok))
    width = 0.8 / max(1, len(names))
    for n, name in enumerate(names):
        vals = [next((r["tokens_per_s"] for r in ok if r["seq"] == s and r["variant"] == name), 0) for s in seqs]
        ax.bar([i + n * width for i in range(len(seqs))], vals, width, label=name)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(seqs))], [f"{s // 1024}k" for s in seqs])
    ax.set_ylabel("tokens/s")
    ax.set_title(f"{model} training throughput, {card}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(stem + ".png", dpi=120)


def _recompute_from(value: str):
    if value == "auto":
        return value
    try:
        n = int(value)
    except ValueError:
        n = -1
    if n < 0:
        raise argparse.ArgumentTypeError(f"got {value!r}: give a sequence length (0 for never) or 'auto'")
    return n


def parse_args(argv=None) -> argparse.Namespace:
    """Command-line options; ``--recompute-from auto`` is resolved to a length (0: never) here."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="1.3b")
    ap.add_argument("--seq", type=int, nargs="+", default=[8192, 32768])
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--steps", type=int, default=4, help="timed optimizer steps per point")
    ap.add_argument("--warmup", type=int, default=2, help="untimed optimizer steps first (compile, allocator)")
    ap.add_argument("--tokens-per-step", type=int, default=32768,
                    help="tokens per optimizer step per data-parallel rank (gradient accumulation tops up)")
    ap.add_argument("--nproc", type=int, default=1)
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--pp", type=int, default=1)
    ap.add_argument("--recompute-from", default="auto", type=_recompute_from,
                    help="full activation recompute at and above this length (0: never; auto: 32768 on cards with "
                         "less than 100 GiB, where 1.3b at 32k does not fit without it, else never)")
    ap.add_argument("--out-dir", default=os.environ.get("OUT") or os.path.join(ROOT, "bench", "results"))
    ap.add_argument("--point-timeout", type=int, default=600)
    ap.add_argument("--extra", nargs="*", default=[], help="more Hydra overrides for every point")
    ap.add_argument("--profile", action="store_true",
                    help="profile every step (CUDA kernels) and report time per step by kernel category")
    ap.add_argument("--tag", default="", help="suffix of the result file names")
    ap.add_argument("--from-json", help="only rewrite the table and plot from an earlier run's JSON")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--variant", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    ap.add_argument("--dp", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--recompute", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.recompute_from == "auto" and not args.worker:
        import torch
        big = torch.cuda.is_available() and torch.cuda.get_device_properties(0).total_memory >= 100 * 2**30
        args.recompute_from = 0 if big else 32768
    return args


def main():
    args = parse_args()
    if args.worker:
        args.seq = args.seq[0]
        return worker(args)
    os.makedirs(args.out_dir, exist_ok=True)
    if args.from_json:
        with open(args.from_json) as f:
            return write_report(json.load(f), args.out_dir, args.tag)
    rows = []
    for seq in args.seq:
        for variant in args.variants:
            rows.append(run_point(args, seq, variant))
            write_report(rows, args.out_dir, args.tag)  # after every point: a time limit keeps the finished ones


if __name__ == "__main__":
    main()
