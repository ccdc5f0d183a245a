"""The attention benchmark's tile-sweep table (bench/attention.py): each kernel's time is found whichever of the
Triton and Hopper kernels ran."""
import os

import pytest

from script_modules import load_script

_BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench")


@pytest.fixture(scope="module")
def attention():
    return load_script(os.path.join(_BENCH, "attention.py"), "attention")


def test_kernel_ms_finds_each_kernel_of_either_family(attention):
    triton = {"s2_fwd_kernel": 1.9, "s2_bwd_dq_kernel": 2.7, "s2_bwd_dkdv_kernel": 3.4}
    hopper = {"s2_fwd_hopper_kernel": 1.8, "s2_dq_hopper_kernel": 2.4, "s2_dkdv_hopper_kernel": 3.5}
    roles = ("fwd", "dq", "dkdv")
    assert [attention.kernel_ms(triton, r) for r in roles] == [1.9, 2.7, 3.4]
    assert [attention.kernel_ms(hopper, r) for r in roles] == [1.8, 2.4, 3.5]
    assert attention.kernel_ms({"s2_fwd_hopper_kernel": 1.8}, "dq") == "-"
