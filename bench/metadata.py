"""Time the kernel-metadata build (row + column lists) for an S2 layout.

    python bench/metadata.py [--device cpu|cuda] [--seq 131072 1048576] [--heads 32] [--repeats 5]

Prints one JSON line per length: median build time (ms), kept blocks, bytes of metadata; the build is uncached
(build_metadata), i.e. what the first forward at a new length pays.
"""
import argparse
import gc
import json
import statistics
import time

import torch

from s2megatron.sparsity import S2Layout, build_metadata


def time_build(layout, heads, seq, device, repeats):
    times, meta = [], None
    for _ in range(repeats):
        del meta
        gc.collect()
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        meta = build_metadata(layout, heads, seq, device=device)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    nbytes = sum(t.numel() * t.element_size() for t in (meta.row_ptr, meta.row_cols, meta.row_last, meta.col_ptr,
                                                         meta.col_rows))
    return statistics.median(times), meta.kept_blocks(), nbytes


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--seq", type=int, nargs="+", default=[131072, 1048576])
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--block", type=int, default=64)
    ap.add_argument("--local-blocks", type=int, default=16)
    ap.add_argument("--vert-stride", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    device = torch.device(args.device)
    layout = S2Layout(args.block, args.local_blocks, args.vert_stride)
    build_metadata(layout, args.heads, 4096, device=device)  # warm-up (allocator, kernels)
    for seq in args.seq:
        ms, kept, nbytes = time_build(layout, args.heads, seq, device, args.repeats)
        print(json.dumps({"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                          "threads": torch.get_num_threads(), "layout": layout.name, "heads": args.heads,
                          "seq": seq, "build_ms_median": round(ms, 2), "kept_blocks": kept,
                          "metadata_bytes": nbytes, "bytes_per_kept_block": round(nbytes / kept, 2)}), flush=True)


if __name__ == "__main__":
    main()
