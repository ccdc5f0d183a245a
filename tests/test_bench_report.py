"""The benchmarks' shared output helpers (bench/report.py)."""
import json
import os

from script_modules import load_script

_BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench")


def test_write_rows_names_the_file_after_the_card_and_keeps_env_and_rows(tmp_path):
    report = load_script(os.path.join(_BENCH, "report.py"), "report")
    env = dict(card="NVIDIA H100 80GB HBM3", torch="2.11.0", triton="3.6.0")
    rows = [dict(seq=8192, ms=0.31), dict(seq=32768, ms=1.9)]
    out = tmp_path / "results"  # made by the helper
    base = report.write_rows(str(out), "hopper_dq", env, rows)
    assert base == str(out / "hopper_dq_H100_80GB_HBM3")
    with open(base + ".json") as f:
        assert json.load(f) == dict(env=env, rows=rows)
    report.write_markdown(base + ".md", ["| a |", "|---|"], echo=False)
    assert (out / "hopper_dq_H100_80GB_HBM3.md").read_text() == "| a |\n|---|\n"
