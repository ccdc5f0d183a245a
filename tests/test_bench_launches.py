"""The Hopper benchmarks' record of which launches their calls took (bench/launches.py)."""
import os
import types

from script_modules import load_script

_BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench")


def test_record_launches_keeps_each_return_and_passes_it_on():
    launches_mod = load_script(os.path.join(_BENCH, "launches.py"), "launches")
    seen = []
    module = types.SimpleNamespace(launch=lambda *args: seen.append(args) or len(seen) % 2 == 1)
    launches = launches_mod.record_launches(module, "launch")
    assert [module.launch(1, 2), module.launch(3)] == [True, False]
    assert launches == [True, False] and seen == [(1, 2), (3, )]
    del launches[:]
    module.launch()
    assert launches == [True]
