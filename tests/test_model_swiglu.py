"""Fused SwiGLU (s2megatron.model.swiglu) against a float64 reference written here, and its Megatron-Core hook.

Kernels and their PyTorch fallback run the same tests (``backend``); without CUDA the kernels run under the
interpreter (``triton_interpret``), which computes bfloat16 wrongly, so bfloat16 is checked on the GPU only.
"""
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

from triton_interpret import CPU as _CPU  # noqa: E402
from triton_interpret import DEVICE, InterpreterEnv, backend_fixture, interpreted  # noqa: E402
from numerics import gen, rel_err  # noqa: E402

_ENV = InterpreterEnv()  # before triton and the kernels are imported

import triton  # noqa: E402
from megatron.core.fusions import fused_bias_swiglu  # noqa: E402
from megatron.core.transformer import mlp  # noqa: E402

from s2megatron.model import swiglu  # noqa: E402
from s2megatron.model.config import transformer_config_from_cfg  # noqa: E402

swiglu = interpreted(swiglu, "_swiglu_fwd_kernel")

TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}
CONF = Path(__file__).resolve().parents[1] / "conf"


_interpreter_env = _ENV.fixture()


backend = backend_fixture(swiglu)  # each test runs on the Triton kernels and on the PyTorch fallback


@pytest.fixture
def restore_mlp(monkeypatch):
    """Whatever install_swiglu_fusion sets in megatron's mlp module is undone after the test."""
    monkeypatch.setattr(mlp, "bias_swiglu_impl", fused_bias_swiglu.bias_swiglu_impl)


@pytest.fixture
def megatron_calls(monkeypatch):
    """Megatron's bias_swiglu_impl, as swiglu_impl reaches it, replaced by a recorder that returns a sentinel."""
    calls = []
    sentinel = object()

    def fake(*args, **kwargs):
        calls.append((args, kwargs))
        return sentinel
    monkeypatch.setattr(swiglu, "_MEGATRON_IMPL", fake)
    return calls, sentinel


# ---------------------------------------------------------------------------------------------------------------------
# float64 reference: silu(y1) * y2 with y1, y2 the halves of the last dim; the gradient by autograd


def ref_fwd_bwd(y, g):
    """(out, dy) in float64."""
    y64 = y.detach().double().requires_grad_()
    y1, y2 = y64.chunk(2, -1)
    out = F.silu(y1) * y2
    (dy,) = torch.autograd.grad(out, y64, g.double())
    return out.detach(), dy


def random_inputs(shape, dtype, seed):
    """y = randn * 4 (sigmoid saturates at both ends) of ``shape`` [..., 2f], and g [..., f]."""
    y = (torch.randn(shape, generator=gen(seed)) * 4).to(DEVICE, dtype)
    g = torch.randn(*shape[:-1], shape[-1] // 2, generator=gen(seed + 1)).to(DEVICE, dtype)
    return y, g


def check_fwd_bwd(fn, y, g, tol=None):
    """fn(y) forward and backward vs the float64 reference; returns (out, dy)."""
    tol = tol or TOL[y.dtype]
    y = y.detach().requires_grad_()
    out = fn(y)
    assert out.shape == (*y.shape[:-1], y.shape[-1] // 2) and out.dtype == y.dtype and out.is_contiguous()
    (dy,) = torch.autograd.grad(out, y, g)
    assert dy.shape == y.shape and dy.dtype == y.dtype
    ref_out, ref_dy = ref_fwd_bwd(y, g)
    for name, got, ref in (("out", out, ref_out), ("dy", dy, ref_dy)):
        assert torch.isfinite(got).all(), name
        assert rel_err(got, ref) < tol, f"{name}: {rel_err(got, ref):.2e}"
    return out, dy


# ---------------------------------------------------------------------------------------------------------------------
# the reference, and that these comparisons catch a wrong formula


def test_reference_is_megatron_formula_and_distinguishes_wrong_ones():
    y, g = random_inputs((9, 5, 160), torch.float64, seed=1)
    out, dy = ref_fwd_bwd(y, g)
    y1, y2 = y.chunk(2, -1)
    s = torch.sigmoid(y1)
    # Megatron's swiglu / swiglu_back closed forms (what the kernels compute)
    assert rel_err(F.silu(y1) * y2, out) < 1e-12
    assert rel_err(torch.cat((g * s * (1 + y1 * (1 - s)) * y2, g * F.silu(y1)), -1), dy) < 1e-12
    assert (s < 1e-3).any() and (s > 1 - 1e-3).any()  # both saturated ends are exercised
    margin = 10 * TOL[torch.float16]  # the loosest tolerance used, times ten
    # halves swapped; the derivative of silu taken as sigmoid; dy2 without silu
    assert rel_err(F.silu(y2) * y1, out) > margin
    assert rel_err(torch.cat((g * s * y2, g * F.silu(y1)), -1), dy) > margin
    assert rel_err(torch.cat((g * s * (1 + y1 * (1 - s)) * y2, g * y1), -1), dy) > margin


# ---------------------------------------------------------------------------------------------------------------------
# forward and backward


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", [(37, 160), (3, 1, 2000), (2, 3, 2000), (3, 11008), (2, 1, 11008)],
                         ids=["f80", "f1000-sb1", "f1000-sb", "f5504", "f5504-sb1"])
def test_fwd_bwd_vs_reference(backend, dtype, shape):
    """f = 80 (tiles of 32 rows x 128 columns: 37 rows leave a partial second band), 1000 (4 x 1024: 3 and 6 rows)
    and 5504 (8 x 512: 11 column blocks, the last 384 wide)."""
    y, g = random_inputs(shape, dtype, seed=sum(shape))
    check_fwd_bwd(swiglu.swiglu, y, g)


def test_small_tiles_leave_row_and_column_tails(backend, monkeypatch):
    """Tiles of 4 rows x 32 columns over f = 100 (4 column blocks, the last 4 wide) and 7 rows (2 row bands)."""
    monkeypatch.setattr(swiglu, "_TILE_ELEMS", 128)
    monkeypatch.setattr(swiglu, "_MAX_BLOCK_N", 64)
    monkeypatch.setattr(swiglu, "_MIN_BLOCK_N", 32)
    assert swiglu._tile(100) == (4, 32)
    y, g = random_inputs((7, 200), torch.float32, seed=10)
    check_fwd_bwd(swiglu.swiglu, y, g)


def test_tile_choice():
    """Power-of-two columns, at most 1024, padding at most f / 16 (or the smallest block); 4096-element tiles."""
    assert swiglu._tile(80) == (32, 128) and swiglu._tile(1000) == (4, 1024)
    assert swiglu._tile(5504) == (8, 512) and swiglu._tile(4096) == (4, 1024) and swiglu._tile(2752) == (16, 256)
    for f in (1, 3, 80, 1000, 1025, 1500, 2752, 4096, 5504, 7000, 14336):
        block_m, block_n = swiglu._tile(f)
        assert block_n == triton.next_power_of_2(block_n) and block_n <= 1024
        assert block_m * block_n == max(block_n, 4096)
        assert block_n >= f or block_n == 256 or (-f) % block_n <= f // 16, f


def test_strided_input(backend):
    """y a slice of a wider tensor (made contiguous; the gradient reaches the wide tensor's slice only)."""
    big, _ = random_inputs((6, 2, 400), torch.float32, seed=20)
    big.requires_grad_()
    y = big[..., 40:200]
    assert not y.is_contiguous()
    g = torch.randn(6, 2, 80, generator=gen(21)).to(DEVICE)
    out = swiglu.swiglu(y)
    (dbig,) = torch.autograd.grad(out, big, g)
    ref_out, ref_dy = ref_fwd_bwd(y, g)
    assert rel_err(out, ref_out) < TOL[torch.float32] and rel_err(dbig[..., 40:200], ref_dy) < TOL[torch.float32]
    assert (dbig[..., :40] == 0).all() and (dbig[..., 200:] == 0).all()


@pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")  # the interpreter's numpy exp
def test_deterministic_and_extreme_values(backend):
    """Bitwise-repeatable; large |y1| (sigmoid 0 or 1 in float32, exp overflowing to inf) stays finite and matches
    the reference element by element (row 0; the other rows are ordinary and checked as above)."""
    y, g = random_inputs((5, 160), torch.float32, seed=30)
    y[0, :80] = torch.tensor([-1e4, -200.0, -89.0, -30.0, 30.0, 89.0, 200.0, 1e4]).repeat(10).to(DEVICE)
    first = check_fwd_bwd(swiglu.swiglu, y[1:], g[1:])
    second = check_fwd_bwd(swiglu.swiglu, y[1:], g[1:])
    for a, b in zip(first, second):
        assert torch.equal(a, b)
    y0 = y[:1].clone().requires_grad_()
    out = swiglu.swiglu(y0)
    (dy,) = torch.autograd.grad(out, y0, g[:1])
    ref_out, ref_dy = ref_fwd_bwd(y0, g[:1])
    for got, ref in ((out, ref_out), (dy, ref_dy)):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-5)


def test_empty_and_value_errors(backend):
    y = torch.randn(0, 3, 160, device=DEVICE, requires_grad=True)
    out = swiglu.swiglu(y)
    assert out.shape == (0, 3, 80)
    (dy,) = torch.autograd.grad(out, y, torch.ones_like(out))
    assert dy.shape == y.shape
    for bad, needle in ((torch.randn(3, 161, device=DEVICE), "(3, 161)"),
                        (torch.randn(3, 160, device=DEVICE, dtype=torch.float64), "torch.float64")):
        with pytest.raises(ValueError) as info:
            swiglu.swiglu(bad)
        assert needle in str(info.value), (needle, str(info.value))


# ---------------------------------------------------------------------------------------------------------------------
# swiglu_impl: Megatron's bias_swiglu_impl signature; ours where it applies, Megatron's otherwise


@pytest.mark.parametrize("shape", [(7, 2000), (3, 2, 2000)], ids=["2d", "3d"])
def test_swiglu_impl_runs_the_kernels(shape, megatron_calls):
    calls, _ = megatron_calls
    y, g = random_inputs(shape, torch.float32, seed=40)
    check_fwd_bwd(lambda t: swiglu.swiglu_impl(t, None, False, False), y, g)
    check_fwd_bwd(lambda t: swiglu.swiglu_impl(t, None), y, g)
    assert not calls


@pytest.mark.parametrize("case", ["bias", "fp8_input_store", "extra_arg", "4d", "float64", "no_triton"])
def test_swiglu_impl_passes_other_calls_to_megatron(case, megatron_calls, monkeypatch):
    calls, sentinel = megatron_calls
    y = torch.randn(3, 2, 160, device=DEVICE)
    args, kwargs = [y, None, False, False], {}
    if case == "bias":
        args[1] = torch.randn(160, device=DEVICE)
    elif case == "fp8_input_store":
        args[2] = True
    elif case == "extra_arg":
        kwargs = dict(future_option=1)
    elif case == "4d":
        args[0] = y[None]
    elif case == "float64":
        args[0] = y.double()
    else:
        monkeypatch.setattr(swiglu, "_use_triton", lambda x: False)
    assert swiglu.swiglu_impl(*args, **kwargs) is sentinel
    assert len(calls) == 1
    got_args, got_kwargs = calls[0]
    assert len(got_args) == 4 and all(a is b for a, b in zip(got_args, args)) and got_kwargs == kwargs


def test_megatron_impl_is_megatrons_function():
    assert swiglu._MEGATRON_IMPL is fused_bias_swiglu.bias_swiglu_impl


def _saved_input(out):
    """The tensor the SwiGLU autograd node saved for its backward pass (below the output's view node)."""
    node = out.grad_fn
    while not hasattr(node, "saved_tensors"):
        node = node.next_functions[0][0]
    (saved,) = node.saved_tensors
    return saved


@pytest.mark.parametrize("shape", [(4, 160), (2, 2, 160)], ids=["2d", "3d"])
def test_cpu_offload_input_marks_the_saved_input(shape):
    """As Megatron's SwiGLUFunction: the tensor saved for backward carries ``activation_offloading``."""
    marked = swiglu.swiglu_impl(torch.randn(shape, device=DEVICE, requires_grad=True), None, False, True)
    assert _saved_input(marked).activation_offloading is True
    plain = swiglu.swiglu_impl(torch.randn(shape, device=DEVICE, requires_grad=True), None, False, False)
    assert _saved_input(plain).shape == (4, 160) and not hasattr(_saved_input(plain), "activation_offloading")


# ---------------------------------------------------------------------------------------------------------------------
# the Megatron hook


def test_install_patches_the_mlp_only(restore_mlp):
    from megatron.core.transformer.moe import shared_experts

    assert mlp.bias_swiglu_impl is fused_bias_swiglu.bias_swiglu_impl
    assert swiglu.install_swiglu_fusion() is True
    assert swiglu.install_swiglu_fusion() is True  # idempotent
    assert mlp.bias_swiglu_impl is swiglu.swiglu_impl
    # megatron's own module and the other modules that imported the name keep megatron's function
    assert fused_bias_swiglu.bias_swiglu_impl is swiglu._MEGATRON_IMPL
    assert shared_experts.bias_swiglu_impl is swiglu._MEGATRON_IMPL


def test_install_leaves_a_foreign_function(restore_mlp, monkeypatch):
    def foreign(*args):
        return None
    monkeypatch.setattr(mlp, "bias_swiglu_impl", foreign)
    assert swiglu.install_swiglu_fusion() is False
    assert mlp.bias_swiglu_impl is foreign


def test_config_fusions_install_for_swiglu_only(restore_mlp):
    model = yaml.safe_load((CONF / "model" / "tiny.yaml").read_text())
    single = yaml.safe_load((CONF / "parallel" / "single.yaml").read_text())
    assert model["activation"] == "swiglu"
    transformer_config_from_cfg(model, single, precision="fp32", fusions=False)
    transformer_config_from_cfg(dict(model, activation="gelu"), single, precision="fp32", fusions=True)
    assert mlp.bias_swiglu_impl is fused_bias_swiglu.bias_swiglu_impl
    config = transformer_config_from_cfg(model, single, precision="fp32", fusions=True)
    assert config.bias_activation_fusion and config.gated_linear_unit
    assert mlp.bias_swiglu_impl is swiglu.swiglu_impl


# ---------------------------------------------------------------------------------------------------------------------
# GPU: bfloat16 and training size, and Megatron's torch.compile-generated functions


@pytest.mark.skipif(_CPU, reason="needs CUDA (the interpreter computes bfloat16 wrongly)")
@pytest.mark.parametrize("shape", [(4096, 1, 11008), (37, 3, 2000), (5, 160), (9, 2, 5506)])
def test_gpu_bf16(shape):
    y, g = random_inputs(shape, torch.bfloat16, seed=70)
    out, dy = check_fwd_bwd(lambda t: swiglu.swiglu_impl(t, None), y, g)
    again = check_fwd_bwd(swiglu.swiglu, y, g)
    assert torch.equal(out, again[0]) and torch.equal(dy, again[1])
    # Megatron's fused functions agree to bfloat16 rounding
    ym = y.detach().requires_grad_()
    ref = fused_bias_swiglu.bias_swiglu_impl(ym, None)
    (ref_dy,) = torch.autograd.grad(ref, ym, g)
    assert rel_err(out, ref.double()) < TOL[torch.bfloat16] and rel_err(dy, ref_dy.double()) < TOL[torch.bfloat16]


_ENV.restore()  # after this module's kernels are decorated: other modules see the environment as it was
