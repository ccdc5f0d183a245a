"""Attention under sustained load: step times of back-to-back forward + backward steps, with the GPU's SM clock and
power draw sampled alongside (``nvidia-smi``), for our S2 kernels and SDPA-cuDNN's dense causal kernel.

With ``--forward`` the steps are forward calls alone (no autograd).

``bench/attention.py`` reports medians of ``triton.testing.do_bench`` (about 100 ms of repeats per number); a card
near its power limit lowers its clocks within such a window. This script shows how far: the first steps after a rest
against the steady state of several seconds of steps, and the clocks and power the card ran at. Shapes as in
``bench/attention.py`` (B=1, H=32, D=128, bf16, L16V16 at block 64). Each step is timed with CUDA events, without the
L2 flush do_bench puts between repeats.

    python bench/sustained.py [--seqs 32768 ...] [--seconds 8] [--forward] [--cudnn-seq N] [--out DIR]

Writes ``sustained_<card>.md`` and ``.json`` (``sustained_forward_<card>.*`` with ``--forward``) under ``--out``
(default ``$OUT`` or ``bench/results``).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from attention import B, D, H, fwd_bwd_step, rand  # noqa: E402
from report import card_tag, write_markdown  # noqa: E402
from s2megatron.ops.triton_s2 import triton_s2_attention  # noqa: E402
from s2megatron.sparsity import S2Layout  # noqa: E402

LAYOUT = S2Layout(64, 16, 16)
FIRST = 10  # steps that make up "first"
COOL_S = 5.0  # idle seconds before each row's timed steps
# nvidia-smi's clocks_event_reasons bits (clocks_throttle_reasons in older drivers)
REASONS = {0x1: "idle", 0x4: "power cap", 0x8: "hw slowdown", 0x20: "sw thermal", 0x40: "hw thermal",
           0x80: "power brake"}


class Sampler:
    """``nvidia-smi`` sampling SM clock (MHz), power (W) and the clock-event bitmask of GPU ``index`` every
    ``period_ms`` in a background process; :meth:`between` returns the samples of a time window."""

    def __init__(self, index: int, period_ms: int = 50):
        self.samples: list = []
        self.proc = None
        exe = shutil.which("nvidia-smi")
        if exe is None:
            return
        query = "timestamp,clocks.sm,power.draw,clocks_throttle_reasons.active"
        self.proc = subprocess.Popen([exe, "-i", str(index), f"--query-gpu={query}", "--format=csv,noheader,nounits",
                                      f"-lms={period_ms}"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                     text=True)
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self):
        for line in self.proc.stdout:
            parts = [p.strip() for p in line.split(",")]
            try:
                self.samples.append((time.monotonic(), float(parts[1]), float(parts[2]), int(parts[3], 16)))
            except (IndexError, ValueError):
                continue

    def between(self, t0: float, t1: float) -> list:
        return [s for s in self.samples if t0 <= s[0] <= t1]

    def close(self):
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait()


def timed_steps(step, seconds: float) -> list:
    """Milliseconds of each of about ``seconds`` worth of back-to-back calls of ``step`` (at least 30; CUDA events,
    one pair per step)."""
    step()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(5):
        step()
    torch.cuda.synchronize()
    steps = max(30, int(seconds / ((time.perf_counter() - t0) / 5)))
    time.sleep(COOL_S)  # the probe above warmed the card: start the timed steps from a rested one
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(steps)]
    for start, end in events:
        start.record()
        step()
        end.record()
    torch.cuda.synchronize()
    return [start.elapsed_time(end) for start, end in events]


def summary(ms: list, samples: list) -> dict:
    """First steps against the steady state (the median of the second half of the steps), and the clocks of
    ``samples`` (those of the second half of the run: nvidia-smi's power reading is a one-second average)."""
    steady = ms[len(ms) // 2:]
    out = dict(first_ms=round(statistics.median(ms[:FIRST]), 3), steady_ms=round(statistics.median(steady), 3),
               min_ms=round(min(ms), 3), steps=len(ms))
    out["steady_over_first"] = round(out["steady_ms"] / out["first_ms"], 3)
    busy = [s for s in samples if not s[3] & 0x1]  # not idle
    if busy:
        clocks = sorted(s[1] for s in busy)
        out.update(sm_clock_median_mhz=statistics.median(clocks), sm_clock_p10_mhz=clocks[len(clocks) // 10],
                   power_median_w=round(statistics.median(s[2] for s in busy), 1), samples=len(busy))
        seen = 0
        for s in busy:
            seen |= s[3]
        out["clock_reasons"] = [name for bit, name in REASONS.items() if seen & bit] or ["none"]
    return out


def forward_step(n: int):
    """One forward of our kernels at ``n`` tokens, without autograd, as a function to call again."""
    q, k, v = (rand(B, n, H, D, requires_grad=False) for _ in range(3))

    def step():
        with torch.no_grad():
            return triton_s2_attention(q, k, v, LAYOUT, sm_scale=D ** -0.5)
    return step


def cudnn_step(n: int, backward: bool = True):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    q, k, v, do = (torch.randn(B, H, n, D, device="cuda", dtype=torch.bfloat16) for _ in range(4))
    for x in (q, k, v):
        x.requires_grad_(backward)

    def step():
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION), torch.set_grad_enabled(backward):
            out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        return torch.autograd.grad(out, (q, k, v), do) if backward else out
    return step


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seqs", type=int, nargs="+", default=[8192, 32768])
    ap.add_argument("--seconds", type=float, default=8.0, help="of back-to-back steps per row")
    ap.add_argument("--cudnn-seq", type=int, default=8192, help="length of the cuDNN dense rows (0: none)")
    ap.add_argument("--forward", action="store_true", help="forward calls alone instead of forward + backward steps")
    ap.add_argument("--out", default=os.environ.get("OUT", os.path.join(os.path.dirname(__file__), "results")))
    args = ap.parse_args()
    card = torch.cuda.get_device_name()
    sampler = Sampler(torch.cuda.current_device())
    rows = []
    ours = forward_step if args.forward else (lambda n: fwd_bwd_step(LAYOUT, n))
    cases = [("ours S2 L16V16", n, ours) for n in args.seqs]
    if args.cudnn_seq:
        cases.append(("cuDNN dense causal", args.cudnn_seq, lambda n: cudnn_step(n, backward=not args.forward)))
    try:
        for name, n, make in cases:
            step = make(n)
            ms = timed_steps(step, args.seconds)
            t1 = time.monotonic()  # the steps ran back to back up to here (timed_steps synchronises)
            t0 = t1 - sum(ms) / 2e3  # start of the second half
            row = dict(kernel=name, seq=n, **summary(ms, sampler.between(t0, t1)))
            print(json.dumps(row), flush=True)
            rows.append(row)
            del step
            torch.cuda.empty_cache()
    finally:
        sampler.close()
    os.makedirs(args.out, exist_ok=True)
    stem = f"sustained_forward_{card_tag(card)}" if args.forward else f"sustained_{card_tag(card)}"
    what = "Forward" if args.forward else "Forward + backward"
    with open(os.path.join(args.out, f"{stem}.json"), "w") as f:
        json.dump(dict(card=card, torch=torch.__version__, seconds=args.seconds, forward_only=args.forward, rows=rows),
                  f, indent=1)
    lines = [f"# {what} under sustained load on {card}", "",
             f"torch {torch.__version__}; B=1, H=32, D=128, bf16; about {args.seconds:g} s of back-to-back steps per "
             f"row after {COOL_S:g} s idle, each step timed with CUDA events (no L2 flush); first = median of the "
             f"first {FIRST} steps, steady = median of the second half. SM clock and power: nvidia-smi every 50 ms "
             "over the second half (samples not marked idle).",
             "", "| kernel | seq | steps | first ms | steady ms | steady / first | SM clock median (p10) MHz "
             "| power median W | clock reasons |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        clock = f"{r['sm_clock_median_mhz']:.0f} ({r['sm_clock_p10_mhz']:.0f})" if "samples" in r else "n/a"
        lines.append(f"| {r['kernel']} | {r['seq']} | {r['steps']} | {r['first_ms']} | {r['steady_ms']} "
                     f"| {r['steady_over_first']} "
                     f"| {clock} | {r.get('power_median_w', 'n/a')} | {', '.join(r.get('clock_reasons', ['n/a']))} |")
    write_markdown(os.path.join(args.out, f"{stem}.md"), lines)


if __name__ == "__main__":
    main()
