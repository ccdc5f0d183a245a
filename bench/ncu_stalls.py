"""Where a kernel's warps wait, from ncu's source counters (warp-state samples per SASS instruction).

Profile one launch with the source counters, export them per instruction, and summarise:

    ncu --section SourceCounters --section WarpStateStats -k regex:s2_fwd_hopper --launch-skip 1 --launch-count 1 \\
        -o fwd python bench/attention.py --probe --probe-seq 8192
    ncu --import fwd.ncu-rep --page source --csv --print-source sass > fwd_sass.csv
    python bench/ncu_stalls.py fwd_sass.csv [--levels N] [--top N]

With ``--lines LISTING`` (``nvdisasm -c -g`` of the same cubin, which Triton keeps in its cache as ``<kernel>.cubin``)
it also sums the samples per source line of the kernel (the innermost line the listing names for each instruction):

    nvdisasm -c -g ~/.triton/cache/<hash>/s2_fwd_hopper_kernel.cubin > fwd.sass
    python bench/ncu_stalls.py fwd_sass.csv --lines fwd.sass

Prints the share of the warp samples per stall reason, per *level* (the instructions that ran equally often: one
basic block, or blocks of the same loop level, such as once per CTA, per work item, per key tile) and the
instructions with the most samples. A warp is sampled at a fixed interval whether or not it issues, so a level's
share is the share of the warps' time spent there; warps that wait at the kernel's end for the others (the idle
warps of a warp-specialised kernel's producer warpgroup) show as a level that ran once per CTA.
"""
from __future__ import annotations

import argparse
import csv
import os
import re
from collections import defaultdict

SAMPLES = "Warp Stall Sampling (All Samples)"
EXECUTED = "Instructions Executed"
# instruction classes named in the level table
MARKS = {"mma": ("HGMMA", "HMMA"), "ex2": ("MUFU.EX2",), "mbarrier wait": ("SYNCS.PHASECHK",),
         "mma wait": ("WARPGROUP.DEPBAR",), "global load": ("LDG",), "global store": ("STG",),
         "TMA": ("UTMALDG", "UTMASTG")}


def _int(text: str) -> int:
    text = text.replace(",", "").strip()
    return int(float(text)) if text not in ("", "-") else 0


def read(path: str):
    """(kernel name, rows): one row per SASS instruction, with its text, warp samples, executions and samples per
    stall reason (issued or not)."""
    with open(path, newline="") as f:
        lines = list(csv.reader(f))
    name = lines[0][1] if lines and len(lines[0]) > 1 and lines[0][0] == "Kernel Name" else "?"
    start = 1 if name != "?" else 0
    header = lines[start]
    col = {h: i for i, h in enumerate(header)}
    for needed in ("Source", SAMPLES, EXECUTED):
        if needed not in col:
            raise ValueError(f"{path}: no column {needed!r}; export with --page source --csv --print-source sass")
    reasons = [(h[len("stall_"):], i) for h, i in col.items() if h.startswith("stall_") and "Not Issued" not in h]
    rows = []
    for line in lines[start + 1:]:
        if len(line) < len(header):
            continue
        rows.append({"source": line[col["Source"]].strip(), "samples": _int(line[col[SAMPLES]]),
                     "executed": _int(line[col[EXECUTED]]),
                     "stalls": {r: _int(line[i]) for r, i in reasons}})
    return name, rows


def _top_reason(stalls: dict) -> str:
    return max(stalls, key=stalls.get) if stalls and max(stalls.values()) > 0 else "-"


def summary(rows, levels: int = 12, top: int = 12) -> dict:
    """Shares of the warp samples: per stall reason, per level (instructions executed equally often; the
    ``levels`` largest), and the ``top`` instructions."""
    total = sum(r["samples"] for r in rows) or 1
    reasons = defaultdict(int)
    for r in rows:
        for k, v in r["stalls"].items():
            reasons[k] += v
    by_count = defaultdict(list)
    for r in rows:
        by_count[r["executed"]].append(r)
    table = []
    for executed, group in by_count.items():
        samples = sum(r["samples"] for r in group)
        worst = max(group, key=lambda r: r["samples"])
        marks = {m: sum(1 for r in group if any(op in r["source"] for op in ops)) for m, ops in MARKS.items()}
        table.append({"executed": executed, "instructions": len(group), "share": samples / total,
                      "marks": {m: n for m, n in marks.items() if n},
                      "worst": (worst["source"], worst["samples"] / total, _top_reason(worst["stalls"]))})
    table.sort(key=lambda t: -t["share"])
    ranked = sorted(rows, key=lambda r: -r["samples"])[:top]
    return {"samples": total,
            "reasons": sorted(((k, v / total) for k, v in reasons.items() if v), key=lambda kv: -kv[1]),
            "levels": table[:levels],
            "top": [(r["source"], r["executed"], r["samples"] / total, _top_reason(r["stalls"])) for r in ranked]}


def format_summary(name: str, s: dict) -> list:
    pct = lambda x: f"{100 * x:.1f} %"  # noqa: E731
    out = [f"## {name}: {s['samples']} warp samples", "",
           "stall reasons: " + ", ".join(f"{k} {pct(v)}" for k, v in s["reasons"][:8]), "",
           "| executed | instructions | share of samples | contains | most sampled instruction (share, reason) |",
           "|---|---|---|---|---|"]
    for t in s["levels"]:
        marks = ", ".join(f"{n} {m}" for m, n in t["marks"].items())
        src, share, reason = t["worst"]
        out.append(f"| {t['executed']} | {t['instructions']} | {pct(t['share'])} | {marks} | "
                   f"`{src[:48]}` ({pct(share)}, {reason}) |")
    out += ["", "| instruction | executed | share of samples | reason |", "|---|---|---|---|"]
    out += [f"| `{src[:60]}` | {ex} | {pct(share)} | {reason} |" for src, ex, share, reason in s["top"]]
    return out


_LINE = re.compile(r'//## File "([^"]+)", line (\d+)')
_INSTRUCTION = re.compile(r"^\s*/\*[0-9a-f]{4,}\*/\s+(\S+)")


def source_lines(listing: str) -> list:
    """``file:line`` of each instruction of an ``nvdisasm -c -g`` listing, in order (the last line comment above
    it; ``?`` before the first)."""
    where, out = "?", []
    for text in listing.splitlines():
        m = _LINE.search(text)
        if m:
            where = f"{os.path.basename(m.group(1))}:{m.group(2)}"
            continue
        m = _INSTRUCTION.match(text)
        if m:
            out.append((where, m.group(1).rstrip(";")))
    return out


def by_line(rows, listing: str, top: int = 40) -> list:
    """(source line, instructions, share of the samples, executions) for the ``top`` lines with the most samples.
    The listing must be of the profiled binary: the same number of instructions, and the same first token (opcode
    or predicate) at every position, else ValueError."""
    lines = source_lines(listing)
    if len(lines) != len(rows):
        raise ValueError(f"the listing has {len(lines)} instructions, the export {len(rows)}: not the same binary")
    total = sum(r["samples"] for r in rows) or 1
    acc = defaultdict(lambda: [0, 0, 0])
    for i, ((where, first), r) in enumerate(zip(lines, rows)):
        if r["source"].split()[:1] != [first]:
            raise ValueError(f"instruction {i}: {first!r} in the listing, {r['source']!r} in the export")
        acc[where][0] += 1
        acc[where][1] += r["samples"]
        acc[where][2] += r["executed"]
    ranked = sorted(acc.items(), key=lambda kv: -kv[1][1])[:top]
    return [(where, n, samples / total, executed) for where, (n, samples, executed) in ranked]


def format_lines(table) -> list:
    out = ["| source line | instructions | share of samples | executed |", "|---|---|---|---|"]
    return out + [f"| {where} | {n} | {100 * share:.2f} % | {executed} |" for where, n, share, executed in table]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("csv", nargs="+", help="ncu --page source --csv --print-source sass exports")
    ap.add_argument("--levels", type=int, default=12, help="levels to list (largest share first)")
    ap.add_argument("--top", type=int, default=12, help="instructions to list (most samples first)")
    ap.add_argument("--lines", help="nvdisasm -c -g listing of the profiled cubin: samples per source line too")
    ap.add_argument("--top-lines", type=int, default=40, help="source lines to list (most samples first)")
    args = ap.parse_args()
    listing = open(args.lines).read() if args.lines else None
    for path in args.csv:
        name, rows = read(path)
        print("\n".join(format_summary(f"{name} ({path})", summary(rows, args.levels, args.top))) + "\n")
        if listing is not None:
            print("\n".join(format_lines(by_line(rows, listing, args.top_lines))) + "\n")


if __name__ == "__main__":
    main()
