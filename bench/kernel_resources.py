"""Compile the S2 kernels for a GPU architecture without a GPU and report registers, spills and shared memory.

Triton ships ``ptxas``, so the kernels can be compiled ahead of time on any machine: this shows whether a tile shape
fits (no spills, registers per thread, CTAs per SM) before any time is spent on a GPU. The signature mimics a
runtime launch (bf16 inputs, pointers and strides divisible by 16, lengths not specialised).

    python bench/kernel_resources.py [--arch 90] [--head-dim 128] [--block 64] [--override fwd_stages=4 ...]
"""
from __future__ import annotations

import argparse
import dataclasses
import inspect
import os
import re
import subprocess
import sys
import tempfile
from collections import Counter
from typing import Optional

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from s2megatron.ops.triton_s2 import config as tile_cfg  # noqa: E402
from s2megatron.ops.triton_s2 import kernels  # noqa: E402

try:
    from triton.experimental.gluon._runtime import GluonASTSource  # noqa: E402

    from s2megatron.ops.triton_s2 import hopper_bwd, hopper_dq, hopper_fwd  # noqa: E402
except ImportError:  # a Triton without Gluon: no Hopper kernels
    hopper_fwd = hopper_bwd = hopper_dq = None

FP32_PTRS = {"LSE", "DELTA", "DLSE"}
INT_PTRS = {"CU_SEQLENS", "HEAD_TO_PAT", "ROW_PTR", "ROW_COLS", "ROW_LAST", "RESIDUES", "COL_PTR", "COL_ROWS",
            "ORDER"}
FLOATS = {"qk_scale", "sm_scale"}
SMEM_PER_SM_KB = {80: 164, 86: 100, 87: 164, 89: 100, 90: 228, 100: 228, 103: 228, 120: 100}  # per SM, for CTAs


def _signature(fn, constexprs: dict, desc_type):
    """(signature, attrs) of a launch with bf16 tensors; strides and pointers get the divisible-by-16 attribute;
    ``desc_type(name)`` is the type of tensor descriptor ``name`` (``*_DESC``), or None for a None argument."""
    params = list(inspect.signature(fn.fn).parameters)
    backend_attr = [["tt.divisibility", 16]]
    sig, attrs = {}, {}
    for i, name in enumerate(params):
        if name in constexprs:
            sig[name] = "constexpr"
        elif name.endswith("_DESC"):
            sig[name] = desc_type(name)
            if sig[name] is None:
                sig[name], constexprs[name] = "constexpr", None
        elif name in FP32_PTRS:
            sig[name], attrs[(i,)] = "*fp32", backend_attr
        elif name in INT_PTRS:
            sig[name], attrs[(i,)] = "*i32", backend_attr
        elif name.isupper():
            sig[name], attrs[(i,)] = "*bf16", backend_attr
        elif name in FLOATS:
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
            if name.startswith("stride_"):
                attrs[(i,)] = backend_attr
    return sig, attrs


_MMA = re.compile(r"\b(HGMMA|HMMA)\b")
_LOCAL = re.compile(r"\b(LDL|STL)\b")
_INSTR = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*)")
_BRANCH = re.compile(r"\bBRA\b[^`]*`\((\.L_x_\d+)\)")


def loop_local_memory(sass: str) -> int:
    """Local-memory instructions (spill loads and stores, ``LDL`` / ``STL``) inside the innermost loops that hold
    tensor-core instructions (the key-tile loops), from ``nvdisasm`` output. A loop is a backward branch and the
    code from its target up to it; branches after the last ``EXIT`` are the out-of-line retries of barrier waits,
    which jump back into a loop, not loops."""
    labels, instrs, pending = {}, [], []
    for line in sass.splitlines():
        label = re.match(r"\s*(\.L_x_\d+):", line)
        if label:
            pending.append(label.group(1))
            continue
        m = _INSTR.search(line)
        if m:
            addr = int(m.group(1), 16)
            for name in pending:
                labels[name] = addr
            pending = []
            instrs.append((addr, m.group(2)))
    last_exit = max((a for a, text in instrs if re.search(r"\bEXIT\b", text)), default=-1)
    loops = []
    for addr, text in instrs:
        br = _BRANCH.search(text)
        if br and addr < last_exit and labels.get(br.group(1), addr + 1) <= addr:
            loops.append((labels[br.group(1)], addr))
    mma = [a for a, text in instrs if _MMA.search(text)]
    tensor = [(lo, hi) for lo, hi in loops if any(lo <= a <= hi for a in mma)]
    innermost = [(lo, hi) for lo, hi in tensor
                 if not any((lo, hi) != (l2, h2) and lo <= l2 and h2 <= hi for l2, h2 in tensor)]
    return sum(1 for a, text in instrs if _LOCAL.search(text) and any(lo <= a <= hi for lo, hi in innermost))


def ptxas_report(ptx: str, arch: int) -> dict:
    """Registers, spill bytes and static shared memory from ``ptxas -v``; local-memory instructions in the key-tile
    loops (:func:`loop_local_memory`) from ``nvdisasm``."""
    bin_dir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    with tempfile.TemporaryDirectory() as tmp:
        path, cubin = os.path.join(tmp, "k.ptx"), os.path.join(tmp, "k.cubin")
        with open(path, "w") as f:
            f.write(ptx)
        suffix = "a" if arch >= 90 else ""  # the arch-specific features (wgmma, TMA) of sm_90a and later
        res = subprocess.run([os.path.join(bin_dir, "ptxas"), f"-arch=sm_{arch}{suffix}", "-v", path, "-o", cubin],
                             capture_output=True, text=True, check=True)
        sass = subprocess.run([os.path.join(bin_dir, "nvdisasm"), "-c", cubin], capture_output=True, text=True,
                              check=True).stdout
    text = res.stderr
    regs = re.search(r"Used (\d+) registers", text)
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text)
    return {"registers": int(regs.group(1)) if regs else None,
            "spill_store_bytes": int(spill.group(1)) if spill else None,
            "spill_load_bytes": int(spill.group(2)) if spill else None,
            "loop_local_memory": loop_local_memory(sass)}


def compile_one(fn, constexprs: dict, num_warps: int, num_stages: int, arch: int, desc_rows: int,
                maxnreg: Optional[int] = None) -> dict:
    constexprs = dict(constexprs)
    desc = f"tensordesc<bf16[{desc_rows},{constexprs['BLOCK_D']}]>" if constexprs["DESC"] else None
    sig, attrs = _signature(fn, constexprs, lambda name: desc)
    src = ASTSource(fn, sig, constexprs, attrs)
    options = {"num_warps": num_warps, "num_stages": num_stages}
    if maxnreg is not None:
        options["maxnreg"] = maxnreg
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
    out = ptxas_report(compiled.asm["ptx"], arch)
    out["shared_bytes"] = compiled.metadata.shared
    threads = 32 * num_warps
    if out["registers"]:
        by_regs = 65536 // (out["registers"] * threads)
        by_smem = SMEM_PER_SM_KB.get(arch, 100) * 1024 // max(out["shared_bytes"], 1)
        out["ctas_per_sm"] = min(by_regs, by_smem, 64 // num_warps)
    return out


def _compile_gluon_sm90(fn, constexprs: dict, desc_rows, head_dim: int, maxnreg: int) -> dict:
    """A warp-specialised Gluon kernel compiled for sm_90a as launched (bf16, 4 warps per partition, ``maxnreg``);
    ``desc_rows(name)`` is the block height of tensor descriptor ``name``."""
    def desc_type(name):
        rows = desc_rows(name)
        layout = hopper_fwd._smem_layout(rows, head_dim, True)  # as the launcher builds it (bf16)
        return f"tensordesc<bf16[{rows},{head_dim}],{layout!r}>"

    sig, attrs = _signature(fn, constexprs, desc_type)
    compiled = triton.compile(GluonASTSource(fn, sig, constexprs, attrs), target=GPUTarget("cuda", 90, 32),
                              options={"num_warps": 4, "maxnreg": maxnreg})
    ptx = compiled.asm["ptx"]
    out = ptxas_report(ptx, 90)
    out["shared_bytes"] = compiled.metadata.shared
    out["warps"] = compiled.metadata.num_warps
    # the global stores by width, and the shared-memory round trips of layout conversions (ldmatrix)
    out["global_stores"] = dict(sorted(Counter(re.findall(r"\bst\.global[\w.]*", ptx)).items()))
    out["ldmatrix"] = len(re.findall(r"\bldmatrix\b", ptx))
    # integer divisions and remainders by values known only at run time (a constant divisor compiles to a product)
    out["int_divisions"] = len(re.findall(r"\b(?:div|rem)\.[su](?:32|64)\b", ptx))
    return out


def _layout_constants(layout, heads) -> dict:
    """The compile-time constants the forward and the dQ take from the call: ``layout`` (local blocks, vertical stride)
    and ``heads`` (query heads, query heads per kv head), as their launchers pass them."""
    return dict(num_heads=heads[0], group=heads[1], local_blocks=layout[0], vert_stride=layout[1])


def compile_hopper_forward(head_dim: int, block: int, tiles=None, layout=(16, 16), heads=(32, 1)) -> dict:
    """The warp-specialised Hopper forward (``hopper_fwd``), compiled for sm_90a as launched (bf16, 12 warps) for
    ``layout`` (local blocks, vertical stride) and ``heads`` (query heads, query heads per kv head), which it takes
    as compile-time constants."""
    tiles = tiles or hopper_fwd.hopper_tiles()
    constexprs = dict(_layout_constants(layout, heads), HEAD_DIM=head_dim, BLOCK_M=tiles.block_m,
                      BLOCK_N=tiles.block_n, BS=block, STAGES=tiles.stages, VARLEN=False,
                      CONSUMER_REGS=tiles.consumer_regs, num_warps=4)
    return _compile_gluon_sm90(hopper_fwd.s2_fwd_hopper_kernel, constexprs,
                               lambda name: 64 if name == "Q_DESC" else min(block, tiles.block_n),
                               head_dim, tiles.maxnreg)


def compile_hopper_dkdv(head_dim: int, block: int, tiles=None) -> dict:
    """The warp-specialised Hopper dK/dV (``hopper_bwd``), compiled for sm_90a as launched (bf16, 12 warps)."""
    tiles = tiles or hopper_bwd.HopperDkdvTiles()
    constexprs = dict(HEAD_DIM=head_dim, BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n, BS=block,
                      STAGES=tiles.stages, VARLEN=False, HEADS_FASTEST=True, DESCENDING=tiles.descending,
                      CONSUMER_REGS=tiles.consumer_regs,
                      PRODUCER_REGS=tiles.producer_regs, num_warps=4)
    return _compile_gluon_sm90(hopper_bwd.s2_dkdv_hopper_kernel, constexprs,
                               lambda name: tiles.block_n if name in ("K_DESC", "V_DESC", "DK_DESC", "DV_DESC")
                               else tiles.block_m,
                               head_dim, tiles.maxnreg)


def compile_hopper_dq(head_dim: int, block: int, tiles=None, ordered: bool = True, layout=(16, 16),
                      heads=(32, 1)) -> dict:
    """The warp-specialised Hopper dQ (``hopper_dq``), compiled for sm_90a as launched (bf16, 12 warps; ``ordered``:
    the persistent grid's turn order, ``hopper_fwd.balanced_order``) for ``layout`` (local blocks, vertical stride)
    and ``heads`` (query heads, query heads per kv head), which it takes as compile-time constants, as the forward
    does."""
    tiles = tiles or hopper_dq.HopperDqTiles()
    constexprs = dict(_layout_constants(layout, heads), HEAD_DIM=head_dim, BLOCK_M=tiles.block_m,
                      BLOCK_N=tiles.block_n, BS=block, STAGES=tiles.stages, VARLEN=False, HAS_DLSE=False,
                      ORDERED=ordered, CONSUMER_REGS=tiles.consumer_regs, num_warps=4)
    if not ordered:
        constexprs["ORDER"] = None  # round robin: the launcher passes no turn order
    return _compile_gluon_sm90(hopper_dq.s2_dq_hopper_kernel, constexprs,
                               lambda name: 64 if name in ("Q_DESC", "DO_DESC", "DQ_DESC")
                               else min(block, tiles.block_n),
                               head_dim, tiles.maxnreg)


def report(cfg, head_dim: int, block: int, arch: int, analytic: bool = True) -> dict:
    bd = tile_cfg.block_d(head_dim)
    common = dict(HEAD_DIM=head_dim, BLOCK_D=bd, BS=block, VARLEN=False, UPCAST=False, PREC="tf32")
    rows = {}
    # as launched: descriptors need the head dim to fill the tile (op.row_descriptor) and TMA (sm_90 or later)
    even = head_dim == bd and arch >= 90
    rows["fwd"] = compile_one(kernels.s2_fwd_kernel, dict(common, BLOCK_M=cfg.fwd_block_m, BLOCK_N=cfg.block_n,
                                                           ANALYTIC=analytic, DESC=cfg.fwd_tma and even),
                              cfg.fwd_warps, cfg.fwd_stages, arch, cfg.block_n)
    rows["dq"] = compile_one(kernels.s2_bwd_dq_kernel, dict(common, BLOCK_M=cfg.block_m, BLOCK_N=cfg.dq_block_n,
                                                            ANALYTIC=analytic, DESC=cfg.dq_tma and even,
                                                            HAS_DLSE=False),
                             cfg.dq_warps, cfg.dq_stages, arch, cfg.dq_block_n, cfg.dq_maxnreg)
    rows["dkdv"] = compile_one(kernels.s2_bwd_dkdv_kernel, dict(common, BLOCK_M=cfg.dkdv_block_m,
                                                                BLOCK_N=cfg.dkdv_block_n, RUN=True, ANALYTIC=analytic,
                                                                HEADS_FASTEST=True,
                                                                DESC=cfg.dkdv_tma and even),
                               cfg.dkdv_warps, cfg.dkdv_stages, arch, cfg.dkdv_block_m)
    if arch == 90 and analytic and hopper_fwd is not None and block in (64, 128) and head_dim in (64, 128):
        rows["fwd_hopper"] = compile_hopper_forward(head_dim, block)
        rows["dkdv_hopper"] = compile_hopper_dkdv(head_dim, block)
        rows["dq_hopper"] = compile_hopper_dq(head_dim, block)
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", type=int, default=90)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--block", type=int, default=64)
    ap.add_argument("--override", nargs="*", default=[], help="TileConfig fields, e.g. block_n=128 fwd_stages=2")
    args = ap.parse_args()
    cfg = tile_cfg.tile_config(args.block, args.head_dim, True)
    fields = {f.name: f.type for f in dataclasses.fields(cfg)}
    cfg = dataclasses.replace(cfg, **{k: (v.lower() in ("1", "true")) if fields[k] in (bool, "bool") else int(v)
                                      for k, v in (o.split("=") for o in args.override)})
    print(cfg)
    for name, row in report(cfg, args.head_dim, args.block, args.arch).items():
        print(f"{name:5s} {row}")


if __name__ == "__main__":
    main()
