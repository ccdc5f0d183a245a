"""Fused RMSNorm (s2megatron.model.rmsnorm) against a float64 reference written here, and S2RMSNorm with it.

Kernels and their PyTorch fallback run the same tests (``backend``); without CUDA the kernels run under the
interpreter (``triton_interpret``), which computes bfloat16 wrongly, so bfloat16 is checked on the GPU only.
"""
import pytest
import torch

from triton_interpret import CPU as _CPU  # noqa: E402
from triton_interpret import DEVICE, InterpreterEnv, backend_fixture, interpreted  # noqa: E402
from numerics import gen, rel_err  # noqa: E402

_ENV = InterpreterEnv()  # before triton and the kernels are imported

import triton  # noqa: E402
from megatron.core.transformer.transformer_config import TransformerConfig  # noqa: E402

from s2megatron.model import rmsnorm  # noqa: E402
from s2megatron.model.norms import S2RMSNorm  # noqa: E402

rmsnorm = interpreted(rmsnorm, "_rms_norm_fwd_kernel")

TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}
EPS = 0.05  # comparable to mean(x^2) of the smaller rows below: where eps goes matters at the tolerances


_interpreter_env = _ENV.fixture()


backend = backend_fixture(rmsnorm)  # each test runs on the Triton kernels and on the PyTorch fallback


# ---------------------------------------------------------------------------------------------------------------------
# float64 reference: x / sqrt(mean(x^2) + eps) * w; its gradients by autograd


def ref_rms_norm(x64: torch.Tensor, w64: torch.Tensor, eps: float) -> torch.Tensor:
    return x64 / torch.sqrt(x64.square().mean(-1, keepdim=True) + eps) * w64


def ref_fwd_bwd(x, w, dy, eps):
    """(y, dx, dw) in float64."""
    x64 = x.detach().double().requires_grad_()
    w64 = w.detach().double().requires_grad_()
    y = ref_rms_norm(x64, w64, eps)
    dx, dw = torch.autograd.grad(y, (x64, w64), dy.double())
    return y.detach(), dx, dw


def random_inputs(shape, dtype, w_dtype, seed):
    """x with rows of different magnitudes (rms 0.1 to 2), a random weight (signs and sizes vary) and dy."""
    scale = torch.rand(*shape[:-1], 1, generator=gen(seed)) * 1.9 + 0.1
    x = (torch.randn(shape, generator=gen(seed + 1)) * scale).to(DEVICE, dtype)
    w = torch.randn(shape[-1], generator=gen(seed + 2)).to(DEVICE, w_dtype)
    dy = torch.randn(shape, generator=gen(seed + 3)).to(DEVICE, dtype)
    return x, w, dy


def check_fwd_bwd(x, w, dy, eps=EPS, tol=None):
    """fused_rms_norm forward and backward vs the float64 reference; returns (y, dx, dw)."""
    tol = tol or max(TOL[x.dtype], TOL[w.dtype])
    x, w = x.detach().requires_grad_(), w.detach().requires_grad_()
    y = rmsnorm.fused_rms_norm(x, w, eps)
    assert y.shape == x.shape and y.dtype == x.dtype and y.is_contiguous()
    dx, dw = torch.autograd.grad(y, (x, w), dy)
    assert dx.dtype == x.dtype and dw.dtype == w.dtype and dx.shape == x.shape and dw.shape == w.shape
    ref_y, ref_dx, ref_dw = ref_fwd_bwd(x, w, dy, eps)
    for name, got, ref in (("y", y, ref_y), ("dx", dx, ref_dx), ("dw", dw, ref_dw)):
        assert torch.isfinite(got).all(), name
        assert rel_err(got, ref) < tol, f"{name}: {rel_err(got, ref):.2e}"
    return y, dx, dw


# ---------------------------------------------------------------------------------------------------------------------
# the reference, and that these comparisons catch a wrong formula


def test_reference_is_torch_rms_norm_and_distinguishes_wrong_formulas():
    x, w, dy = random_inputs((9, 5, 80), torch.float64, torch.float64, seed=1)
    y, dx, dw = ref_fwd_bwd(x, w, dy, EPS)
    assert rel_err(torch.nn.functional.rms_norm(x, (80,), w, eps=EPS), y) < 1e-12
    margin = 10 * TOL[torch.float16]  # the loosest tolerance used, times ten
    # eps outside the square root / no eps
    assert rel_err(x / (x.square().mean(-1, keepdim=True).sqrt() + EPS) * w, y) > margin
    assert rel_err(x / x.square().mean(-1, keepdim=True).sqrt() * w, y) > margin
    # dx without the mean term, and dw without the normalisation
    rstd = 1 / torch.sqrt(x.square().mean(-1, keepdim=True) + EPS)
    assert rel_err(rstd * dy * w, dx) > margin
    assert rel_err((dy * x).sum((0, 1)), dw) > margin
    # and the right closed forms agree (what the kernels compute)
    xhat = x * rstd
    g = dy * w
    assert rel_err(rstd * (g - xhat * (g * xhat).mean(-1, keepdim=True)), dx) < 1e-12
    assert rel_err((dy * xhat).sum((0, 1)), dw) < 1e-12


# ---------------------------------------------------------------------------------------------------------------------
# forward and backward


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("hidden", [80, 1000, 2048])
@pytest.mark.parametrize("lead", [(1,), (7,), (9, 5)], ids=["1row", "7rows", "sbh"])
def test_fwd_bwd_vs_reference(backend, dtype, hidden, lead):
    """1 row, 7 rows and [s=9, b=5] (45 rows): no row count above 1 is a multiple of the forward's rows per tile
    (32, 4, 2 for 80, 1000, 2048 channels) or the backward's (16, 2, 1) above 1; the backward programs get uneven
    shares of tiles (7 tiles: 3 + 3 + 1; 23 tiles: 8 + 8 + 7)."""
    x, w, dy = random_inputs((*lead, hidden), dtype, dtype, seed=hidden + len(lead))
    check_fwd_bwd(x, w, dy)


@pytest.mark.parametrize("x_dtype,w_dtype", [(torch.float16, torch.float32), (torch.float32, torch.float16)])
def test_mixed_dtypes(backend, x_dtype, w_dtype):
    """The output has x's dtype, dw the weight's."""
    x, w, dy = random_inputs((3, 4, 1000), x_dtype, w_dtype, seed=20)
    check_fwd_bwd(x, w, dy)


def test_strided_input_and_model_eps(backend):
    """x a slice of a wider tensor (made contiguous; the gradient reaches the wide tensor's slice only); eps=1e-5."""
    big, w, dy = random_inputs((6, 2, 240), torch.float32, torch.float32, seed=30)
    big.requires_grad_()
    x, dy = big[..., 40:120], dy[..., :80].contiguous()
    w = w[:80].contiguous().requires_grad_()
    assert not x.is_contiguous()
    y = rmsnorm.fused_rms_norm(x, w, 1e-5)
    dbig, dw = torch.autograd.grad(y, (big, w), dy)
    ref_y, ref_dx, ref_dw = ref_fwd_bwd(x, w, dy, 1e-5)
    assert rel_err(y, ref_y) < TOL[torch.float32] and rel_err(dw, ref_dw) < TOL[torch.float32]
    assert rel_err(dbig[..., 40:120], ref_dx) < TOL[torch.float32]
    assert (dbig[..., :40] == 0).all() and (dbig[..., 120:] == 0).all()


@pytest.mark.parametrize("x_grad,w_grad", [(True, False), (False, True), (False, False)])
def test_grad_of_one_input(backend, x_grad, w_grad):
    x, w, dy = random_inputs((5, 3, 80), torch.float32, torch.float32, seed=40)
    x.requires_grad_(x_grad)
    w.requires_grad_(w_grad)
    y = rmsnorm.fused_rms_norm(x, w, EPS)
    ref_y, ref_dx, ref_dw = ref_fwd_bwd(x, w, dy, EPS)
    assert rel_err(y, ref_y) < TOL[torch.float32]
    assert y.requires_grad == (x_grad or w_grad)
    if x_grad or w_grad:
        y.backward(dy)
    assert (x.grad is not None) == x_grad and (w.grad is not None) == w_grad
    if x_grad:
        assert rel_err(x.grad, ref_dx) < TOL[torch.float32]
    if w_grad:
        assert rel_err(w.grad, ref_dw) < TOL[torch.float32]


def test_deterministic(backend):
    """Two backward passes give bitwise-identical dx and dw (several backward programs on the kernel path)."""
    x, w, dy = random_inputs((9, 5, 1000), torch.float32, torch.float32, seed=50)
    first = check_fwd_bwd(x, w, dy)
    second = check_fwd_bwd(x, w, dy)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_backward_grid_covers_rows_without_empty_programs():
    """Each program gets a contiguous, tile-aligned range; together they cover every tile, and none is empty."""
    cpu = torch.device("cpu")
    for rows in (1, 2, 7, 45, 64, 97):
        for block_m in (1, 2, 32):
            progs, per_prog = rmsnorm._bwd_grid(rows, block_m, 8, cpu)
            tiles = triton.cdiv(rows, block_m)
            assert 1 <= progs <= max(rmsnorm._CPU_PROGS, 1)
            assert (progs - 1) * per_prog < tiles <= progs * per_prog, (rows, block_m, progs, per_prog)


def test_empty_and_value_errors(backend):
    x = torch.randn(0, 3, 80, device=DEVICE, requires_grad=True)
    w = torch.randn(80, device=DEVICE, requires_grad=True)
    y = rmsnorm.fused_rms_norm(x, w, EPS)
    assert y.shape == x.shape
    dx, dw = torch.autograd.grad(y, (x, w), torch.ones_like(y))
    assert dx.shape == x.shape and torch.equal(dw, torch.zeros_like(w))
    cases = [
        (lambda: rmsnorm.fused_rms_norm(x.double(), w, EPS), "torch.float64"),
        (lambda: rmsnorm.fused_rms_norm(x, w[:40], EPS), "(40,)"),
        (lambda: rmsnorm.fused_rms_norm(x, w[None], EPS), "(1, 80)"),
    ]
    for call, needle in cases:
        with pytest.raises(ValueError) as info:
            call()
        assert needle in str(info.value), (needle, str(info.value))


# ---------------------------------------------------------------------------------------------------------------------
# S2RMSNorm


def _config(fused: bool, hidden: int = 80) -> TransformerConfig:
    config = TransformerConfig(num_layers=1, hidden_size=hidden, num_attention_heads=1)
    if fused:
        config.s2_fused_norm = True
    return config


def test_s2_rms_norm_fused_matches_torch(backend, monkeypatch):
    """Fused on: torch.nn.RMSNorm's output and gradients (x and weight) in float32, through fused_rms_norm. Off:
    torch.nn.RMSNorm.forward itself."""
    hidden, eps = 80, 1e-5
    calls = []
    real = rmsnorm.fused_rms_norm
    monkeypatch.setattr(rmsnorm, "fused_rms_norm", lambda *a: calls.append(1) or real(*a))
    plain, fused = S2RMSNorm(_config(False), hidden, eps=eps), S2RMSNorm(_config(True), hidden, eps=eps)
    assert not plain.fused and fused.fused
    ref = torch.nn.RMSNorm(hidden, eps=eps, device=DEVICE)
    w = torch.randn(hidden, generator=gen(60)).to(DEVICE)
    for norm in (plain, fused, ref):
        assert norm.weight.device.type == torch.device(DEVICE).type
        with torch.no_grad():
            norm.weight.copy_(w)
    x, _, dy = random_inputs((7, 3, hidden), torch.float32, torch.float32, seed=61)
    outs = {}
    for name, norm in (("plain", plain), ("fused", fused), ("ref", ref)):
        xi = x.clone().requires_grad_()
        y = norm(xi)
        y.backward(dy)
        outs[name] = (y.detach(), xi.grad, norm.weight.grad)
    assert len(calls) == 1  # the fused module only
    for a, b in zip(outs["plain"], outs["ref"]):
        assert torch.equal(a, b)
    for a, b in zip(outs["fused"], outs["ref"]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    ref_y, ref_dx, ref_dw = ref_fwd_bwd(x, w, dy, eps)
    for got, want in zip(outs["fused"], (ref_y, ref_dx, ref_dw)):
        assert rel_err(got, want) < TOL[torch.float32]


# ---------------------------------------------------------------------------------------------------------------------
# GPU: bfloat16 and training size


@pytest.mark.skipif(_CPU, reason="needs CUDA (the interpreter computes bfloat16 wrongly)")
@pytest.mark.parametrize("shape", [(4096, 2, 2048), (37, 3, 1000), (5, 80)])
def test_gpu_bf16(shape):
    x, w, dy = random_inputs(shape, torch.bfloat16, torch.bfloat16, seed=70)
    y, dx, dw = check_fwd_bwd(x, w, dy)
    again = check_fwd_bwd(x, w, dy)
    assert torch.equal(dx, again[1]) and torch.equal(dw, again[2])
    # torch.nn.RMSNorm in bfloat16 agrees to bfloat16 rounding
    ref = torch.nn.RMSNorm(shape[-1], eps=EPS, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        ref.weight.copy_(w)
    assert rel_err(y, ref(x).double()) < TOL[torch.bfloat16]


_ENV.restore()  # after this module's kernels are decorated: other modules see the environment as it was
