"""Diagnostics (temporary): custom non-KV-efficient layouts with small blocks on the GPU, per output and config."""
import dataclasses
import math
import traceback

import torch

from s2megatron.ops.reference import reference_attention
from s2megatron.ops.triton_s2 import config as C
from s2megatron.ops.triton_s2 import triton_s2_attention
from s2megatron.sparsity import BlockMaskLayout


def rel(a, r):
    return ((a.double() - r).abs().max() / r.abs().max()).item()


def run(block, dtype, over=None, s=1000, heads=4):
    base = C.tile_config
    if over:
        C.tile_config = lambda bs, hd, mq, eb=2: dataclasses.replace(base(bs, hd, mq, eb), **over)
    try:
        nb = s // block + 1
        g = torch.Generator().manual_seed(block)
        mask = (torch.rand(heads, nb, nb, generator=g) < 0.3) | torch.eye(nb, dtype=torch.bool)
        lay = BlockMaskLayout(mask, block_size=block)
        gen = torch.Generator(device="cuda").manual_seed(4)
        q, k, v = (torch.randn(1, s, heads, 64, generator=gen, device="cuda").to(dtype).requires_grad_()
                   for _ in range(3))
        out, lse = triton_s2_attention(q, k, v, lay, sm_scale=0.125, return_lse=True)
        q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
        ro, rl = reference_attention(q64, k64, v64, lay, sm_scale=0.125)
        do = torch.randn(out.shape, generator=gen, device="cuda").to(dtype)
        g1 = torch.autograd.grad(out, (q, k, v), do)
        g2 = torch.autograd.grad(ro, (q64, k64, v64), do.double())
        errs = [rel(out, ro), (lse.double() - rl).abs().max().item()] + [rel(a, b) for a, b in zip(g1, g2)]
        bad_rows = ((out.double() - ro).abs().amax(-1) > 0.05).nonzero()[:6].tolist()
        print(f"block {block} {str(dtype)[6:]} {over}: out/lse/dq/dk/dv " + " ".join(f"{e:.1e}" for e in errs),
              "bad rows (b,s,h):", bad_rows, flush=True)
    except Exception:
        traceback.print_exc()
    finally:
        C.tile_config = base


if __name__ == "__main__":
    for block in (16, 32):
        run(block, torch.bfloat16)
        run(block, torch.float16)
        run(block, torch.float32)
        run(block, torch.bfloat16, dict(fwd_stages=1, dq_stages=1, dkdv_stages=1))
        run(block, torch.bfloat16, dict(block_n=block, dq_block_n=block))
        run(block, torch.bfloat16, dict(fwd_warps=1, dq_warps=1, dkdv_warps=1))
    run(64, torch.bfloat16)
    run(16, torch.bfloat16, s=250, heads=2)
