"""The ncu source-counter summary (bench/ncu_stalls.py): samples per stall reason, per level (instructions executed
equally often) and per instruction, from a small export in ncu's format."""
import os

import pytest

from script_modules import load_script

_BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench")

_HEADER = ('"Address","Source","Warp Stall Sampling (All Samples)","Warp Stall Sampling (Not-issued Samples)",'
           '"Instructions Executed","stall_barrier","stall_long_sb","stall_wait","stall_barrier (Not Issued)"')
_ROWS = [  # address, source, samples, executed, barrier, long_sb, wait
    ("0x10", "LDG.E R12, desc[UR58][R12.64]", 2, 800, 0, 0, 2),
    ("0x20", "LEA R14, P1, R12, UR6, 0x2", 30, 800, 0, 30, 0),
    ("0x30", "HGMMA.64x128x16.F32.BF16 R88, R152, gdesc[UR12].tnspB, R88", 5, 5600, 0, 0, 5),
    ("0x40", "WARPGROUP.DEPBAR.LE gsb0, 0x0", 40, 5600, 40, 0, 0),
    ("0x50", "MUFU.EX2 R72, R27", 3, 5600, 0, 0, 3),
    ("0x60", "NOP", 20, 132, 20, 0, 0),
]


@pytest.fixture(scope="module")
def ncu_stalls():
    return load_script(os.path.join(_BENCH, "ncu_stalls.py"), "ncu_stalls")


@pytest.fixture()
def export(tmp_path):
    path = tmp_path / "k_sass.csv"
    lines = ['"Kernel Name","s2_fwd_hopper_kernel",', _HEADER]
    for addr, src, samples, executed, barrier, long_sb, wait in _ROWS:
        lines.append(f'"{addr}","      {src}","{samples}","{samples}","{executed}","{barrier}","{long_sb}","{wait}",'
                     f'"{barrier}"')
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def test_levels_reasons_and_top_instructions(ncu_stalls, export):
    name, rows = ncu_stalls.read(export)
    assert name == "s2_fwd_hopper_kernel" and len(rows) == 6 and rows[1]["source"].startswith("LEA")
    s = ncu_stalls.summary(rows, levels=3, top=2)
    assert s["samples"] == 100
    assert s["reasons"] == [("barrier", 0.6), ("long_sb", 0.3), ("wait", 0.1)]  # the not-issued column is not summed
    loop, item, cta = s["levels"]
    assert (loop["executed"], loop["instructions"], loop["share"]) == (5600, 3, 0.48)
    assert loop["marks"] == {"mma": 1, "ex2": 1, "mma wait": 1}
    assert loop["worst"] == ("WARPGROUP.DEPBAR.LE gsb0, 0x0", 0.4, "barrier")
    assert (item["executed"], item["share"], item["marks"]) == (800, 0.32, {"global load": 1})
    assert (cta["executed"], cta["share"]) == (132, 0.2)
    assert [t[0].split()[0] for t in s["top"]] == ["WARPGROUP.DEPBAR.LE", "LEA"]
    lines = ncu_stalls.format_summary(name, s)
    assert lines[0] == "## s2_fwd_hopper_kernel: 100 warp samples"
    assert any(line.startswith("| 5600 | 3 | 48.0 % | 1 mma, 1 ex2, 1 mma wait |") for line in lines)


def test_an_export_without_source_counters_is_refused(ncu_stalls, tmp_path):
    path = tmp_path / "details.csv"
    path.write_text('"ID","Kernel Name","Metric Name","Metric Value"\n"0","k","Duration","1"\n')
    with pytest.raises(ValueError, match="--page source --csv --print-source sass"):
        ncu_stalls.read(str(path))


def _listing(opcodes_and_lines):
    """An ``nvdisasm -c -g`` listing: a line comment before each change of source line, one instruction per row."""
    out, last = ["\t.text.s2_fwd_hopper_kernel:"], None
    for i, (text, line) in enumerate(opcodes_and_lines):
        if line != last:
            out.append(f'\t//## File "/src/s2megatron/ops/triton_s2/hopper_fwd.py", line {line}')
            last = line
        out.append(f"        /*{16 * (i + 1):04x}*/                   {text} ;")
    return "\n".join(out) + "\n"


def test_samples_per_source_line_from_the_cubin_listing(ncu_stalls, export):
    _, rows = ncu_stalls.read(export)
    listing = _listing([("LDG.E R12, desc[UR58][R12.64]", 280), ("LEA R14, P1, R12, UR6, 0x2", 280),
                        ("HGMMA.64x128x16.F32.BF16 R88, R152, gdesc[UR12].tnspB, R88", 216),
                        ("WARPGROUP.DEPBAR.LE gsb0, 0x0", 219), ("MUFU.EX2 R72, R27", 216), ("NOP", 490)])
    assert ncu_stalls.by_line(rows, listing, top=3) == [("hopper_fwd.py:219", 1, 0.4, 5600),
                                                        ("hopper_fwd.py:280", 2, 0.32, 1600),
                                                        ("hopper_fwd.py:490", 1, 0.2, 132)]
    first = ncu_stalls.format_lines(ncu_stalls.by_line(rows, listing, top=1))[2]
    assert first == "| hopper_fwd.py:219 | 1 | 40.00 % | 5600 |"


def test_a_listing_of_another_binary_is_refused(ncu_stalls, export):
    _, rows = ncu_stalls.read(export)
    five = [("LDG.E R12, desc[UR58][R12.64]", 1)] * 5
    with pytest.raises(ValueError, match="5 instructions, the export 6"):
        ncu_stalls.by_line(rows, _listing(five))
    swapped = five[:1] + [("IMAD R14, R12, 0x4, RZ", 2)] + five[:4]
    with pytest.raises(ValueError, match="instruction 1: 'IMAD'"):
        ncu_stalls.by_line(rows, _listing(swapped))
