"""GPU tests of the Triton S2 kernels: a seeded random sweep against the float64 reference, determinism, CUDA graph
capture, and one test per defect the research notes list for the reference library (docs/research/s2_anchor.md).

Run: ``python -m pytest -q tests/gpu``; the memcheck pass runs the short sweep:
``compute-sanitizer --tool memcheck python -m pytest -q tests/gpu -k short``.
"""
import dataclasses
import math
import random

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

from numerics import rel_err  # noqa: E402
from s2megatron.ops.reference import reference_attention  # noqa: E402
from s2megatron.sparsity import BlockMaskLayout, S2Layout, get_metadata  # noqa: E402

if torch.cuda.is_available():
    from s2megatron.ops.triton_s2 import triton_s2_attention

DEV = "cuda"
REL_TOL = 1e-2  # bf16/fp16: max abs err / max abs ref, for out, dq, dk, dv


def _randn(shape, dtype, gen):
    return torch.randn(*shape, generator=gen, device=DEV, dtype=torch.float32).to(dtype)


def check_case(layout, q, k, v, *, cu_seqlens=None, heads=None, tol=REL_TOL, seed=0):
    """Triton forward/backward (through out and lse) vs float64 reference; returns the errors."""
    heads = heads or {}
    sm_scale = 1.0 / math.sqrt(q.shape[-1])
    qt, kt, vt = (x.detach().clone().requires_grad_() for x in (q, k, v))
    out, lse = triton_s2_attention(qt, kt, vt, layout, sm_scale=sm_scale, cu_seqlens=cu_seqlens, return_lse=True,
                                   **heads)
    q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
    ref_out, ref_lse = reference_attention(q64, k64, v64, layout, sm_scale=sm_scale, cu_seqlens=cu_seqlens, **heads)
    gen = torch.Generator(device=DEV).manual_seed(seed + 7)
    dout = _randn(out.shape, out.dtype, gen)
    dlse = _randn(lse.shape, torch.float32, gen) * 0.3
    grads = torch.autograd.grad((out.float() * dout.float()).sum() + (lse * dlse).sum(), (qt, kt, vt))
    ref_grads = torch.autograd.grad((ref_out * dout.double()).sum() + (ref_lse * dlse.double()).sum(),
                                    (q64, k64, v64))
    errs = {}
    for name, got, ref in (("out", out, ref_out), *zip(("dq", "dk", "dv"), grads, ref_grads)):
        assert not torch.isnan(got).any(), f"{name} has NaN"
        errs[name] = rel_err(got, ref.detach())
    errs["lse_abs"] = (lse.double() - ref_lse).abs().max().item()
    bad = {n: e for n, e in errs.items() if e >= (tol if n != "lse_abs" else 0.05)}
    assert not bad, f"errors over tolerance: {bad} (all: {errs})"
    return errs


def _sweep_cases(n, seed, max_len):
    rng = random.Random(seed)
    cases = []
    for i in range(n):
        bs = rng.choice([16, 32, 64, 128])
        d = rng.choice([64, 80, 96, 128, 256])
        hkv = rng.choice([1, 2])
        group = rng.choice([1, 2, 4, 8])
        local = rng.randint(1, 4)
        stride = rng.randint(2, 6)
        mode = ("batch", "varlen", "prefix")[i % 3]
        dtype = torch.float16 if i % 5 == 4 else torch.bfloat16
        length = rng.randint(max(2 * local * bs + 1, 200), max_len)
        if length % 64 == 0:
            length += 17
        lay = S2Layout(bs, local, stride, head_sliding=rng.random() < 0.8, sliding_offset=rng.randint(0, 2),
                       num_dense_heads=rng.choice([0, 0, 1]), per_kv_head=rng.random() < 0.25)
        cases.append(dict(id=f"{mode}-B{bs}-L{local}V{stride}-d{d}-h{hkv * group}x{hkv}-S{length}-{str(dtype)[6:]}",
                          layout=lay, d=d, hq=hkv * group, hkv=hkv, mode=mode, dtype=dtype, length=length, seed=i))
    return cases


SWEEP = _sweep_cases(15, 2026, 1500)
SHORT = _sweep_cases(4, 7, 400)  # the memcheck pass


def _run_sweep_case(c):
    gen = torch.Generator(device=DEV).manual_seed(c["seed"])
    s, d, hq, hkv, dt = c["length"], c["d"], c["hq"], c["hkv"], c["dtype"]
    cu = None
    if c["mode"] == "varlen":
        cuts = sorted(random.Random(c["seed"]).sample(range(1, s), 2))
        cu = torch.tensor([0, *cuts, s], dtype=torch.int32, device=DEV)
        q, k, v = _randn((s, hq, d), dt, gen), _randn((s, hkv, d), dt, gen), _randn((s, hkv, d), dt, gen)
    elif c["mode"] == "prefix":
        q_len = max(1, s // 3 + 5)
        q = _randn((2, q_len, hq, d), dt, gen)
        k, v = _randn((2, s, hkv, d), dt, gen), _randn((2, s, hkv, d), dt, gen)
    else:
        q, k, v = _randn((2, s, hq, d), dt, gen), _randn((2, s, hkv, d), dt, gen), _randn((2, s, hkv, d), dt, gen)
    return check_case(c["layout"], q, k, v, cu_seqlens=cu, seed=c["seed"])


@pytest.mark.parametrize("case", SWEEP, ids=[c["id"] for c in SWEEP])
def test_sweep(case):
    _run_sweep_case(case)


def _sm90():
    return torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)


# the layouts and head dims the Hopper forward takes (block 64/128, head dim 64/128), at lengths up to 3000
HOPPER = [c for c in _sweep_cases(60, 11, 3000) if c["layout"].block_size in (64, 128) and c["d"] in (64, 128)][:12]
HOPPER += [dict(id=f"{mode}-B64-L4V8-d128-h8x2-S{length}-bfloat16", layout=S2Layout(64, 4, 8, num_dense_heads=1),
                d=128, hq=8, hkv=2, mode=mode, dtype=torch.bfloat16, length=length, seed=100 + i)
           for i, (mode, length) in enumerate((("batch", 3001), ("varlen", 2600), ("prefix", 2900)))]


def _hopper_grid(ctas, monkeypatch):
    """The Hopper forward's grid: persistent with one CTA per SM (``ctas`` "sms"), persistent with 3 CTAs (as if the
    GPU had 3 SMs: every CTA takes many query tiles one after the other, so the ring's and the barriers' phases carry
    over between them), or one CTA per query tile ("items")."""
    from s2megatron.ops.triton_s2 import hopper_fwd
    monkeypatch.setattr(hopper_fwd, "PERSISTENT_ROW_SHARE", 0.0 if ctas == "items" else 2.0)
    if ctas == 3:
        monkeypatch.setattr(hopper_fwd, "_sm_count", lambda index: 3)


@pytest.mark.skipif(not _sm90(), reason="the Hopper forward runs on sm_90")
@pytest.mark.parametrize("ctas", ["sms", 3, "items"], ids=["grid-sms", "grid-3", "grid-items"])
@pytest.mark.parametrize("case", HOPPER, ids=["hopper-" + c["id"] for c in HOPPER])
def test_hopper_forward_sweep(case, ctas, monkeypatch):
    """The warp-specialised forward at every length (S2MEGATRON_HOPPER_FWD=1), forward and the backward through its
    out and lse, against the float64 reference; the test fails unless that kernel actually ran. With each grid
    (:func:`_hopper_grid`)."""
    from s2megatron.ops.triton_s2 import op as _op
    _hopper_grid(ctas, monkeypatch)
    launched = []
    real = _op._hopper.hopper_forward
    monkeypatch.setattr(_op._hopper, "hopper_forward", lambda *a: launched.append(real(*a)) or launched[-1])
    monkeypatch.setenv("S2MEGATRON_HOPPER_FWD", "1")
    monkeypatch.setenv("S2MEGATRON_HOPPER_BWD", "0")  # the Triton dK/dV (the dK/dV sweep below has the other)
    _run_sweep_case(case)
    assert launched and all(launched), launched


@pytest.mark.skipif(not _sm90(), reason="the Hopper forward runs on sm_90")
@pytest.mark.parametrize("d", [64, 128])
def test_hopper_forward_where_the_running_maximum_moves(d, monkeypatch):
    """Scores that grow along the keys for some query rows, by about 8.5 (base 2) per 128-key tile, and shrink for the
    others, in alternate groups of 8 rows (so that the two rows of a thread differ): the running maximum of the
    first kind moves past ``RESCALE_SLACK`` at every key tile (O rescaled), that of the second never after the first
    tile (the products skipped). Forward and backward through out and lse against the float64 reference, with the
    Hopper forward launched. The ramp's magnitude is on q (q = +-8 sqrt(d) u); the keys' component along u is the
    ramp and the rest of each key is orthogonal to u: keys with a large common component would make dQ = dS K
    cancel it, and the bf16 rounding of dS would then swamp dQ (about 5 % in a float64 model of the rounding)."""
    from s2megatron.ops.triton_s2 import hopper_fwd
    from s2megatron.ops.triton_s2 import op as _op
    launched = []
    real = _op._hopper.hopper_forward
    monkeypatch.setattr(_op._hopper, "hopper_forward", lambda *a: launched.append(real(*a)) or launched[-1])
    monkeypatch.setenv("S2MEGATRON_HOPPER_FWD", "1")
    monkeypatch.setattr(hopper_fwd, "PERSISTENT_ROW_SHARE", 2.0)
    gen = torch.Generator(device=DEV).manual_seed(d)
    s, h = 3000, 4
    u = torch.nn.functional.normalize(torch.randn(d, generator=gen, device=DEV), dim=0)
    sign = 1.0 - 2.0 * ((torch.arange(s, device=DEV) // 8) % 2)  # +1 / -1 in alternate groups of 8 rows
    q = sign[:, None, None] * 8 * math.sqrt(d) * u + 0.3 * torch.randn(1, s, h, d, generator=gen, device=DEV)
    ramp = 8.5 / 128 / math.log2(math.e) * torch.arange(s, device=DEV)  # scores, natural-log units, +8.5 per tile
    noise = torch.randn(1, s, h, d, generator=gen, device=DEV)
    k = (ramp / 8)[:, None, None] * u + noise - (noise @ u)[..., None] * u
    v = torch.randn(1, s, h, d, generator=gen, device=DEV)
    check_case(S2Layout(64, 16, 16), *(x.to(torch.bfloat16) for x in (q, k, v)), seed=d)
    assert launched and all(launched), launched


@pytest.mark.skipif(not _sm90(), reason="the Hopper dK/dV runs on sm_90")
@pytest.mark.parametrize("stripes_first_from", [1 << 40, 0], ids=["heads-fastest", "stripes-first"])
@pytest.mark.parametrize("descending", [True, False], ids=["walk-down", "walk-up"])
@pytest.mark.parametrize("case", HOPPER, ids=["hopper-dkdv-" + c["id"] for c in HOPPER])
def test_hopper_dkdv_sweep(case, descending, stripes_first_from, monkeypatch):
    """The warp-specialised dK/dV at every length (S2MEGATRON_HOPPER_BWD=1; with the Triton forward, so that only
    this kernel differs from the sweep) against the float64 reference, walking each query head's chunks from the
    last one down (the default) and from the first one up, in both program orders (``hopper_bwd.program_order``);
    the test fails unless that kernel ran."""
    from s2megatron.ops.triton_s2 import op as _op
    policy = _op._hopper_bwd.hopper_dkdv_tiles
    monkeypatch.setattr(_op._hopper_bwd, "hopper_dkdv_tiles",
                        lambda plan, q: policy(plan, q) and dataclasses.replace(
                            policy(plan, q), descending=descending, stripes_first_from=stripes_first_from))
    launched = []
    real = _op._hopper_bwd.hopper_dkdv
    monkeypatch.setattr(_op._hopper_bwd, "hopper_dkdv", lambda *a: launched.append(real(*a)) or launched[-1])
    monkeypatch.setenv("S2MEGATRON_HOPPER_FWD", "0")
    monkeypatch.setenv("S2MEGATRON_HOPPER_BWD", "1")
    _run_sweep_case(case)
    assert launched and all(launched), launched


@pytest.mark.skipif(not _sm90(), reason="the Hopper dQ runs on sm_90")
@pytest.mark.parametrize("ctas", ["sms", 3, "items"], ids=["grid-sms", "grid-3", "grid-items"])
@pytest.mark.parametrize("bwd", ["0", "1"], ids=["triton-dkdv", "hopper-dkdv"])
@pytest.mark.parametrize("case", HOPPER, ids=["hopper-dq-" + c["id"] for c in HOPPER])
def test_hopper_dq_sweep(case, bwd, ctas, monkeypatch):
    """The warp-specialised dQ at every length (S2MEGATRON_HOPPER_DQ=1; with the Triton forward) against the float64
    reference, through out and lse, with either dK/dV kernel reading the Delta it writes, on each grid (the forward's
    policy decides it: :func:`_hopper_grid`); the test fails unless that kernel ran."""
    from s2megatron.ops.triton_s2 import op as _op
    _hopper_grid(ctas, monkeypatch)
    launched = []
    real = _op._hopper_dq.hopper_dq
    monkeypatch.setattr(_op._hopper_dq, "hopper_dq", lambda *a: launched.append(real(*a)) or launched[-1])
    monkeypatch.setenv("S2MEGATRON_HOPPER_FWD", "0")
    monkeypatch.setenv("S2MEGATRON_HOPPER_BWD", bwd)
    monkeypatch.setenv("S2MEGATRON_HOPPER_DQ", "1")
    _run_sweep_case(case)
    assert launched and all(launched), launched


# the Hopper dK/dV pairs a kv head's key tiles by their walks (stripes with stripes, other blocks with others, the
# halves of a 128-block): residues before, at and past the end of the sequence, V = 1 (dense), V > L and V < L,
# dense heads, per-kv-head patterns, odd block counts; every tile of every head must be stored once
PAIRING = [(S2Layout(64, 1, 1), 4, 1, 1000), (S2Layout(64, 2, 2), 4, 2, 1300), (S2Layout(64, 3, 5), 6, 3, 1999),
           (S2Layout(64, 16, 16), 4, 4, 1600), (S2Layout(64, 4, 16, head_sliding=False), 3, 1, 2500),
           (S2Layout(64, 2, 7, num_dense_heads=1), 4, 2, 1100), (S2Layout(64, 5, 3, per_kv_head=True), 8, 2, 1237),
           (S2Layout(128, 2, 3), 4, 1, 1500), (S2Layout(128, 1, 1), 2, 2, 700), (S2Layout(64, 8, 40), 4, 2, 3000)]


@pytest.mark.skipif(not _sm90(), reason="the Hopper dK/dV runs on sm_90")
@pytest.mark.parametrize("layout,hq,hkv,length", PAIRING, ids=[f"{lay.block_size}-L{lay.local_blocks}V{lay.vert_stride}"
                                                               f"-h{hq}x{hkv}-S{n}" for lay, hq, hkv, n in PAIRING])
@pytest.mark.parametrize("stripes_first_from", [1 << 40, 0], ids=["heads-fastest", "stripes-first"])
def test_hopper_dkdv_pairing(layout, hq, hkv, length, stripes_first_from, monkeypatch):
    """dK and dV of the Hopper kernel at head dim 64 against the float64 reference, for layouts whose key tiles pair
    differently, in both program orders; the test fails unless that kernel ran."""
    from s2megatron.ops.triton_s2 import op as _op
    policy = _op._hopper_bwd.hopper_dkdv_tiles
    monkeypatch.setattr(_op._hopper_bwd, "hopper_dkdv_tiles", lambda plan, q: policy(plan, q) and dataclasses.replace(
        policy(plan, q), stripes_first_from=stripes_first_from))
    launched = []
    real = _op._hopper_bwd.hopper_dkdv
    monkeypatch.setattr(_op._hopper_bwd, "hopper_dkdv", lambda *a: launched.append(real(*a)) or launched[-1])
    monkeypatch.setenv("S2MEGATRON_HOPPER_BWD", "1")
    gen = torch.Generator(device=DEV).manual_seed(length)
    q = _randn((1, length, hq, 64), torch.bfloat16, gen)
    k, v = (_randn((1, length, hkv, 64), torch.bfloat16, gen) for _ in range(2))
    check_case(layout, q, k, v, seed=length)
    assert launched and all(launched), launched


@pytest.mark.parametrize("case", SHORT, ids=["short-" + c["id"] for c in SHORT])
def test_short_sweep(case):
    _run_sweep_case(case)


@pytest.mark.parametrize("kernels", ["default", "hopper"])
def test_determinism_bitwise(kernels, monkeypatch):
    """Two backward passes on the same inputs give bitwise-identical gradients (GQA 32/8, no atomics), with the
    default kernels and with the warp-specialised Hopper kernels."""
    launched = _force_hopper(kernels, monkeypatch)
    gen = torch.Generator(device=DEV).manual_seed(1)
    lay = S2Layout(64, 16, 16)
    q = _randn((1, 4096, 32, 128), torch.bfloat16, gen).requires_grad_()
    k = _randn((1, 4096, 8, 128), torch.bfloat16, gen).requires_grad_()
    v = _randn((1, 4096, 8, 128), torch.bfloat16, gen).requires_grad_()
    dout = _randn((1, 4096, 32, 128), torch.bfloat16, gen)
    g1 = torch.autograd.grad(triton_s2_attention(q, k, v, lay, sm_scale=0.088), (q, k, v), dout)
    g2 = torch.autograd.grad(triton_s2_attention(q, k, v, lay, sm_scale=0.088), (q, k, v), dout)
    for a, b in zip(g1, g2):
        assert torch.equal(a, b)
    _assert_hopper_ran(kernels, launched)


def _force_hopper(kernels, monkeypatch):
    """With ``kernels == "hopper"`` on sm_90: the warp-specialised forward, dQ and dK/dV at any length, counted;
    returns the list their launchers append to (empty otherwise)."""
    launched = []
    if kernels == "hopper":
        if not _sm90():
            pytest.skip("the Hopper kernels run on sm_90")
        from s2megatron.ops.triton_s2 import op as _op
        for mod, name in ((_op._hopper, "hopper_forward"), (_op._hopper_dq, "hopper_dq"),
                          (_op._hopper_bwd, "hopper_dkdv")):
            real = getattr(mod, name)
            monkeypatch.setattr(mod, name, lambda *a, real=real, name=name: launched.append((name, real(*a)))
                                or launched[-1][1])
        monkeypatch.setenv("S2MEGATRON_HOPPER_FWD", "1")
        monkeypatch.setenv("S2MEGATRON_HOPPER_BWD", "1")
        monkeypatch.setenv("S2MEGATRON_HOPPER_DQ", "1")
    return launched


def _assert_hopper_ran(kernels, launched):
    if kernels == "hopper":
        assert {name for name, ok in launched if ok} == {"hopper_forward", "hopper_dq", "hopper_dkdv"}, launched


@pytest.mark.parametrize("kernels", ["default", "hopper"])
def test_cuda_graph_capture(kernels, monkeypatch):
    """Forward + backward capture in a CUDA graph (no host-device synchronisation once metadata is cached), with
    the default kernels and with the warp-specialised Hopper kernels."""
    launched = _force_hopper(kernels, monkeypatch)
    gen = torch.Generator(device=DEV).manual_seed(2)
    lay = S2Layout(64, 4, 8)
    q, k, v = (_randn((1, 2048, 4, 128), torch.bfloat16, gen) for _ in range(3))
    dout = _randn((1, 2048, 4, 128), torch.bfloat16, gen)

    def step():
        # fresh leaves per call, so no autograd node outlives the stream it was made on
        qi, ki, vi = (x.detach().requires_grad_() for x in (q, k, v))
        out = triton_s2_attention(qi, ki, vi, lay, sm_scale=0.088)
        return (out, *torch.autograd.grad(out, (qi, ki, vi), dout))

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        eager = step()  # builds and caches the metadata
        step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        static = step()
    graph.replay()
    torch.cuda.synchronize()
    for a, b in zip(static, eager):
        assert torch.equal(a, b)
    _assert_hopper_ran(kernels, launched)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
@pytest.mark.parametrize("kernels", ["default", "hopper"])
def test_tensors_on_a_device_that_is_not_current(kernels, monkeypatch):
    """Triton launches on the current device: tensors on cuda:1 while cuda:0 is current still get the reference
    result, forward and backward, with the default kernels and with the warp-specialised Hopper kernels."""
    launched = _force_hopper(kernels, monkeypatch)
    lay = S2Layout(64, 2, 3)
    gen = torch.Generator().manual_seed(5)
    q, k, v, dout = (torch.randn(1, 700, 4, 128, generator=gen).to(torch.bfloat16) for _ in range(4))
    with torch.cuda.device(0):
        qt, kt, vt = (x.to("cuda:1").requires_grad_() for x in (q, k, v))
        out = triton_s2_attention(qt, kt, vt, lay, sm_scale=0.088)
        grads = torch.autograd.grad(out, (qt, kt, vt), dout.to("cuda:1"))
    q64, k64, v64 = (x.double().requires_grad_() for x in (q, k, v))
    ref, _ = reference_attention(q64, k64, v64, lay, sm_scale=0.088)
    ref_grads = torch.autograd.grad(ref, (q64, k64, v64), dout.double())
    assert out.device == torch.device("cuda", 1)
    for got, want in zip((out, *grads), (ref, *ref_grads)):
        assert rel_err(got.cpu(), want.detach()) < REL_TOL
    _assert_hopper_ran(kernels, launched)


# --------------------------------------------------------------------- reference-library defects (s2_anchor.md)

def _guarded(shape, d_pad, dt, gen, extra_heads=1):
    """A tensor [.., H, d] that is a slice of a NaN-filled [.., H + extra, d_pad] buffer: any read past the head
    dim or into another head turns the result into NaN."""
    *lead, h, d = shape
    buf = torch.full((*lead, h + extra_heads, d_pad), float("nan"), device=DEV, dtype=dt)
    buf[..., :h, :d] = _randn(shape, dt, gen)
    return buf[..., :h, :d]


@pytest.mark.parametrize("head_dim", [80, 96, 112, 65, 129])
@pytest.mark.parametrize("mode", ["varlen", "prefix"])
def test_defect_head_dims_inference_paths(head_dim, mode):
    """D1 (non-power-of-two head dims read wrong halves on the padded/varlen paths) and D2 (2^k+1 drops dims)."""
    gen = torch.Generator(device=DEV).manual_seed(head_dim)
    pad = 256 if head_dim > 128 else 128
    lay = S2Layout(32, 2, 4)
    if mode == "varlen":
        cu = torch.tensor([0, 300, 701, 900], dtype=torch.int32, device=DEV)
        q, k, v = (_guarded((900, 4, head_dim), pad, torch.bfloat16, gen) for _ in range(3))
        check_case(lay, q, k, v, cu_seqlens=cu)
    else:
        q = _guarded((1, 1, 4, head_dim), pad, torch.bfloat16, gen)  # decode after a 700-token prefix
        k, v = (_guarded((1, 701, 4, head_dim), pad, torch.bfloat16, gen) for _ in range(2))
        check_case(lay, q, k, v)


def test_defect_gqa_training_no_out_of_bounds():
    """D3: GQA/MQA training addressed K/V with the query head. K/V here are slices of NaN-guarded buffers."""
    gen = torch.Generator(device=DEV).manual_seed(3)
    for hkv in (1, 2):
        q = _guarded((2, 777, 8, 128), 128, torch.bfloat16, gen)
        k, v = (_guarded((2, 777, hkv, 128), 128, torch.bfloat16, gen, extra_heads=3) for _ in range(2))
        check_case(S2Layout(64, 2, 5), q, k, v)


@pytest.mark.parametrize("block", [16, 32])
def test_defect_custom_layout_small_blocks(block):
    """D4: a custom layout that is not KV-cache efficient with block < 64: forward and backward use its exact mask."""
    nb = 1000 // block + 1
    g = torch.Generator().manual_seed(block)
    mask = (torch.rand(4, nb, nb, generator=g) < 0.3) | torch.eye(nb, dtype=torch.bool)
    lay = BlockMaskLayout(mask, block_size=block)
    assert not lay.is_kv_cache_efficient()
    gen = torch.Generator(device=DEV).manual_seed(4)
    q, k, v = (_randn((1, 1000, 4, 64), torch.bfloat16, gen) for _ in range(3))
    check_case(lay, q, k, v)


@pytest.mark.parametrize("block", [16, 32])
def test_defect_decode_inside_merged_tile(block):
    """D5: decode / short chunks whose queries sit at sub-rows > 0 of a merged query tile."""
    gen = torch.Generator(device=DEV).manual_seed(5)
    lay = S2Layout(block, 2, 3)
    for past in (64 * 50 + 12, 64 * 50 + 20, 64 * 50 + 45):
        q = _randn((1, 1, 4, 128), torch.bfloat16, gen)
        k, v = (_randn((1, past + 1, 4, 128), torch.bfloat16, gen) for _ in range(2))
        check_case(lay, q, k, v)
    q = _randn((1, 90, 4, 128), torch.bfloat16, gen)
    k, v = (_randn((1, 64 * 50 + 90, 4, 128), torch.bfloat16, gen) for _ in range(2))
    check_case(lay, q, k, v)


def test_defect_chunked_prefill_matches_full():
    """D6: chunked prefill reads the right pattern rows: chunks with their KV prefix reproduce the full pass."""
    gen = torch.Generator(device=DEV).manual_seed(6)
    lay = S2Layout(64, 4, 3)
    s = 3000
    q = _randn((1, s, 8, 128), torch.bfloat16, gen)
    k, v = (_randn((1, s, 2, 128), torch.bfloat16, gen) for _ in range(2))
    full = triton_s2_attention(q, k, v, lay, sm_scale=0.088)
    parts, start = [], 0
    for stop in (700, 1333, 2100, s):
        parts.append(triton_s2_attention(q[:, start:stop], k[:, :stop], v[:, :stop], lay, sm_scale=0.088))
        start = stop
    chunked = torch.cat(parts, dim=1)
    assert rel_err(chunked, full.double()) < REL_TOL
    check_case(lay, q[:, 1333:2100], k[:, :2100], v[:, :2100])


def test_defect_cached_layouts_do_not_alias():
    """D7: equal layouts share cached metadata, different layouts never do, and each call uses its own."""
    a, b = S2Layout(64, 2, 4), S2Layout(64, 2, 5)
    assert get_metadata(a, 4, 2048, device=DEV) is not get_metadata(b, 4, 2048, device=DEV)
    gen = torch.Generator(device=DEV).manual_seed(7)
    q, k, v = (_randn((1, 2048, 4, 64), torch.bfloat16, gen) for _ in range(3))
    oa = triton_s2_attention(q, k, v, a, sm_scale=0.125)
    ob = triton_s2_attention(q, k, v, b, sm_scale=0.125)
    ra, _ = reference_attention(q.double(), k.double(), v.double(), a, sm_scale=0.125)
    rb, _ = reference_attention(q.double(), k.double(), v.double(), b, sm_scale=0.125)
    assert rel_err(oa, ra) < REL_TOL and rel_err(ob, rb) < REL_TOL and rel_err(oa, rb) > 0.05


def test_defect_packed_qkv_gradients():
    """D8: q/k/v as views of one packed qkv buffer: the packed gradient is the reference gradient."""
    gen = torch.Generator(device=DEV).manual_seed(8)
    qkv = _randn((2, 1500, 3, 4, 64), torch.bfloat16, gen).requires_grad_()
    lay = S2Layout(64, 2, 4)
    out = triton_s2_attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], lay, sm_scale=0.125)
    dout = _randn(out.shape, torch.bfloat16, gen)
    (grad,) = torch.autograd.grad(out, qkv, dout)
    ref_in = qkv.detach().double().requires_grad_()
    ref, _ = reference_attention(ref_in[:, :, 0], ref_in[:, :, 1], ref_in[:, :, 2], lay, sm_scale=0.125)
    (ref_grad,) = torch.autograd.grad(ref, ref_in, dout.double())
    assert rel_err(grad, ref_grad) < REL_TOL


def test_defect_single_pattern_custom_layout():
    """D9 (1-D / broadcast layouts): a one-head custom mask shared by every head, KV-cache efficient, block 128."""
    nb = 12
    m = torch.tril(torch.ones(nb, nb, dtype=torch.bool))
    m &= (torch.arange(nb)[:, None] - torch.arange(nb)[None, :] < 3) | (torch.arange(nb)[None, :] % 4 == 0)
    lay = BlockMaskLayout(m[None], block_size=128)
    gen = torch.Generator(device=DEV).manual_seed(9)
    q, k, v = (_randn((1, 1500, 4, 128), torch.bfloat16, gen) for _ in range(3))
    check_case(lay, q, k, v)
