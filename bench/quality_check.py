"""Short quality check: the same model trained for the same steps on the same data, dense vs S2 vs hybrid.

    python bench/quality_check.py --model 125m --steps 300 --seq 2048          # one GPU per variant, in parallel

Each variant runs ``train.py`` (same seed, data order, optimizer) in its own process, pinned to its own GPU when
there are enough (else one after another). Writes ``quality_<model>_<card>.{json,md,png}`` under --out-dir: the
loss curves in one plot, final validation loss, and the passkey retrieval accuracy each model reaches at the end.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from report import card_tag, pyplot, write_markdown  # noqa: E402
VARIANTS = {"dense": ["sparsity=dense"], "s2_l16v16": ["sparsity=l16v16"], "hybrid": ["sparsity=hybrid"]}


def gpu_count() -> int:
    try:
        import torch
        return torch.cuda.device_count()
    except ImportError:
        return 0


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="125m")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--global-batch", type=int, default=16)
    ap.add_argument("--micro-batch", type=int, default=8)
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--out-dir", default=os.environ.get("OUT") or os.path.join(ROOT, "bench", "results"))
    ap.add_argument("--run-dir", default=os.path.join(ROOT, "outputs", "quality"))
    ap.add_argument("--extra", nargs="*", default=[], help="more Hydra overrides for every variant")
    args = ap.parse_args()
    os.makedirs(args.out_dir, exist_ok=True)
    gpus = gpu_count()
    parallel = gpus >= len(args.variants)
    procs = {}
    for n, name in enumerate(args.variants):
        run_dir = os.path.join(args.run_dir, name)
        cmd = [sys.executable, "train.py", f"model={args.model}", *VARIANTS[name], f"train.steps={args.steps}",
               f"train.seq_len={args.seq}", f"train.global_batch={args.global_batch}",
               f"train.micro_batch={args.micro_batch}", f"train.out_dir={run_dir}", "train.log_interval=10",
               f"train.eval_interval={max(args.steps // 4, 1)}", "train.save_interval=0", "train.resume=false",
               *args.extra]
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        if parallel:
            env["CUDA_VISIBLE_DEVICES"] = str(n)
        log = open(os.path.join(args.out_dir, f"quality_{args.model}_{name}.log"), "w")
        print("+", " ".join(cmd), flush=True)
        procs[name] = (subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT), run_dir, log)
        if not parallel:
            procs[name][0].wait()
    rows = {}
    for name, (proc, run_dir, log) in procs.items():
        code = proc.wait()
        log.close()
        if code != 0:
            rows[name] = {"error": f"exit code {code}"}
            continue
        metrics = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
        summary = json.load(open(os.path.join(run_dir, "summary.json")))
        rows[name] = {"curve": [(m["step"], m["loss"]) for m in metrics if m.get("kind") == "train"],
                      "summary": summary}
    card = "cpu"
    try:
        import torch
        card = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    except ImportError:
        pass
    stem = os.path.join(args.out_dir, f"quality_{args.model}_{card_tag(card)}")
    with open(stem + ".json", "w") as f:
        json.dump({"card": card, "args": vars(args), "runs": rows}, f, indent=1)
    lines = [f"# Quality check: {args.model}, {args.steps} steps x {args.global_batch} x {args.seq} tokens, {card}", "",
             "| variant | final train loss | validation loss | passkey accuracy |", "|---|---|---|---|"]
    for name, r in rows.items():
        if "error" in r:
            lines.append(f"| {name} | {r['error']} | | |")
            continue
        s = r["summary"]
        acc = s.get("passkey_accuracy")
        val = (s.get("validation") or {}).get("loss", float("nan"))
        lines.append(f"| {name} | {r['curve'][-1][1]:.4f} | {val:.4f} | "
                     f"{'n/a' if acc is None else f'{acc:.1%}'} |")
    write_markdown(stem + ".md", lines)
    plt = pyplot()
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, r in rows.items():
        if "curve" in r:
            ax.plot(*zip(*r["curve"]), label=name)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_title(f"{args.model}: dense vs S2 ({card})")
    ax.legend()
    fig.tight_layout()
    fig.savefig(stem + ".png", dpi=120)


if __name__ == "__main__":
    main()
