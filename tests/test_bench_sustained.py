"""The sustained-load benchmark's summary (bench/sustained.py): first steps against the steady state, and the
clocks of the samples that were not idle."""
import os

import pytest

from script_modules import load_script

_BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench")


@pytest.fixture(scope="module")
def sustained():
    return load_script(os.path.join(_BENCH, "sustained.py"), "sustained")


def test_summary_separates_first_steps_from_the_steady_state(sustained):
    ms = [8.0] * 10 + [8.5] * 30 + [9.0] * 50
    # (time, SM clock, power, reasons): idle samples (bit 0x1) are not the run's
    samples = [(0.0, 1980.0, 70.0, 0x1), (0.1, 1900.0, 650.0, 0x0), (0.2, 1500.0, 700.0, 0x4),
               (0.3, 1400.0, 699.0, 0x4), (0.4, 345.0, 75.0, 0x1)]
    out = sustained.summary(ms, samples)
    assert (out["first_ms"], out["steady_ms"], out["min_ms"], out["steps"]) == (8.0, 9.0, 8.0, 90)
    assert out["steady_over_first"] == pytest.approx(9.0 / 8.0, abs=1e-3)
    assert out["samples"] == 3
    assert out["sm_clock_median_mhz"] == 1500.0 and out["sm_clock_p10_mhz"] == 1400.0
    assert out["power_median_w"] == 699.0
    assert out["clock_reasons"] == ["power cap"]


def test_summary_without_samples_reports_times_only(sustained):
    out = sustained.summary([2.0] * 12, [])
    assert out["first_ms"] == out["steady_ms"] == 2.0 and "samples" not in out
