"""Does this Triton warp-specialise a flash-attention loop on this GPU, and does the result run?

Triton's automatic warp specialisation (``tl.range(..., warp_specialize=True)``) is what would let the S2 kernels
overlap the softmax with the tensor-core work on Hopper (a producer warp issuing TMA copies, two consumer
warpgroups). This probe times the smallest kernel of that kind (dense, non-causal, one head: Q, K and V through
tensor descriptors, one key-tile loop) with and without the hint. Each variant runs in a child process under a
time limit, so a kernel that deadlocks is reported as such instead of hanging the caller.

    python bench/warp_specialize_probe.py [--seq 8192 32768] [--timeout 60]

Prints one line per variant: time and TFLOP/s with its error against a float32 reference, or why it gave none.
"""
from __future__ import annotations

import argparse
import math
import subprocess
import sys

import torch
import triton
import triton.language as tl

D = 128
BLOCK_M, BLOCK_N = 128, 64


@triton.jit
def _flash_forward(Q_DESC, K_DESC, V_DESC, O, num_key_tiles, qk_scale,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr, WARP_SPECIALIZE: tl.constexpr):
    start = tl.program_id(0) * BLOCK_M
    q = Q_DESC.load([start, 0])
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D], tl.float32)
    for it in tl.range(0, num_key_tiles, warp_specialize=WARP_SPECIALIZE):
        k = K_DESC.load([it * BLOCK_N, 0])
        v = V_DESC.load([it * BLOCK_N, 0])
        s = tl.dot(q, tl.trans(k))
        m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
        alpha = tl.math.exp2(m_i - m_new)
        p = tl.math.exp2(s * qk_scale - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    rows = start + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, D)
    tl.store(O + rows[:, None] * D + cols[None, :], (acc / l_i[:, None]).to(O.dtype.element_ty))


def run_one(seq: int, warp_specialize: bool) -> None:
    """One variant in this process: compile, check against float32, time (median ms)."""
    from triton.tools.tensor_descriptor import TensorDescriptor
    q, k, v = (torch.randn(seq, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    out = torch.empty_like(q)
    descs = [TensorDescriptor(x, [seq, D], [D, 1], [rows, D]) for x, rows in ((q, BLOCK_M), (k, BLOCK_N), (v, BLOCK_N))]
    scale = 1.0 / math.sqrt(D) * 1.4426950408889634

    def launch():
        _flash_forward[(seq // BLOCK_M,)](*descs, out, seq // BLOCK_N, scale, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, D=D,
                                          WARP_SPECIALIZE=warp_specialize, num_warps=4, num_stages=3)

    launch()
    torch.cuda.synchronize()
    ref = torch.softmax(q.float() @ k.float().T / math.sqrt(D), -1) @ v.float()
    err = ((out.float() - ref).abs().max() / ref.abs().max()).item()
    ms = triton.testing.do_bench(launch, warmup=10, rep=50, return_mode="median")
    print(f"seq {seq} warp_specialize={warp_specialize}: {ms:.4f} ms, {4 * seq * seq * D / ms / 1e9:.0f} TFLOP/s, "
          f"rel err {err:.1e}", flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seq", type=int, nargs="+", default=[8192, 32768])
    ap.add_argument("--timeout", type=float, default=60.0, help="seconds per variant (compile, check and timing)")
    ap.add_argument("--child", nargs=2, metavar=("SEQ", "WS"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        run_one(int(args.child[0]), args.child[1] == "1")
        return
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}", flush=True)
    for seq in args.seq:
        for ws in (False, True):
            cmd = [sys.executable, __file__, "--child", str(seq), "1" if ws else "0"]
            try:
                res = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
            except subprocess.TimeoutExpired:
                print(f"seq {seq} warp_specialize={ws}: no result within {args.timeout:.0f} s (hung)", flush=True)
                continue
            if res.returncode == 0:
                print(res.stdout.strip(), flush=True)
            else:
                last = (res.stderr.strip().splitlines() or ["?"])[-1]
                print(f"seq {seq} warp_specialize={ws}: failed (exit {res.returncode}): {last[:200]}", flush=True)


if __name__ == "__main__":
    main()
