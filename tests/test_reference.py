"""The reference S2 attention against an independent float64 dense masked softmax (tests/pattern_oracle.py)."""

import pytest
import torch

from pattern_oracle import dense_attention
from s2megatron.ops import s2_attention
from s2megatron.sparsity import S2Layout, dense_layout


def _layout_kwargs(lay):
    return dict(block_size=lay.block_size, local_blocks=lay.local_blocks, vert_stride=lay.vert_stride,
                head_sliding=lay.head_sliding, sliding_offset=lay.sliding_offset, num_dense_heads=lay.num_dense_heads)


def _rand(*shape, dtype=torch.float64, grad=False):
    return torch.randn(*shape, dtype=dtype).requires_grad_(grad)


CASES = [
    # (layout, batch, q_len, kv_len, Hq, Hkv, D, head_offset, total_heads)
    (S2Layout(16, 2, 4), 2, 200, 200, 4, 4, 16, 0, None),          # well past L*B, not a multiple of B
    (S2Layout(16, 1, 3), 1, 173, 173, 6, 2, 24, 0, None),          # GQA, odd head dim
    (S2Layout(32, 2, 5, num_dense_heads=1), 1, 150, 331, 4, 1, 8, 0, None),  # KV prefix, MQA, a dense head
    (S2Layout(16, 2, 8, per_kv_head=True), 1, 260, 260, 4, 2, 16, 4, 8),     # per-kv-head + TP head offset
    (S2Layout(16, 3, 4, head_sliding=False, sliding_offset=0), 1, 97, 97, 2, 2, 12, 0, None),
    (dense_layout(16), 1, 70, 90, 2, 1, 8, 0, None),
]


@pytest.mark.parametrize("case", CASES)
def test_forward_and_lse_match_dense_oracle(case):
    lay, b, s, skv, hq, hkv, d, off, tot = case
    torch.manual_seed(hash(str(case)) % 2**31)
    q, k, v = _rand(b, s, hq, d), _rand(b, skv, hkv, d), _rand(b, skv, hkv, d)
    out, lse = s2_attention(q, k, v, lay, backend="reference", return_lse=True, head_offset=off, total_heads=tot)
    assert out.shape == q.shape and out.dtype == q.dtype and lse.shape == (b, hq, s) and lse.dtype == torch.float32
    for i in range(b):
        o_ref, l_ref = dense_attention(q[i], k[i], v[i], _layout_kwargs(lay), head_offset=off, total_heads=tot,
                                       per_kv_head=lay.per_kv_head)
        torch.testing.assert_close(out[i], o_ref, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(lse[i].double(), l_ref, rtol=1e-6, atol=1e-5)


def test_sparsity_matters_in_the_test():
    """At these lengths the S2 result differs from dense causal: the oracle comparison above can fail."""
    lay = S2Layout(16, 2, 4)
    torch.manual_seed(0)
    q, k, v = _rand(1, 200, 4, 16), _rand(1, 200, 4, 16), _rand(1, 200, 4, 16)
    sparse = s2_attention(q, k, v, lay, backend="reference")
    dense = s2_attention(q, k, v, dense_layout(16), backend="reference")
    assert (sparse - dense).abs().max() > 1e-2


def test_gradients_match_float64_autograd():
    lay = S2Layout(16, 2, 3)
    torch.manual_seed(1)
    q, k, v = _rand(1, 120, 4, 8, grad=True), _rand(1, 150, 2, 8, grad=True), _rand(1, 150, 2, 8, grad=True)
    do, dl = torch.randn(1, 120, 4, 8, dtype=torch.float64), torch.randn(1, 4, 120, dtype=torch.float64)
    out, lse = s2_attention(q, k, v, lay, backend="reference", return_lse=True)
    g = torch.autograd.grad((out * do).sum() + (lse.double() * dl).sum(), (q, k, v))
    q2, k2, v2 = (x.detach().clone().requires_grad_(True) for x in (q, k, v))
    o_ref, l_ref = dense_attention(q2[0], k2[0], v2[0], _layout_kwargs(lay))
    g_ref = torch.autograd.grad((o_ref * do[0]).sum() + (l_ref * dl[0]).sum(), (q2, k2, v2))
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_varlen_matches_per_sequence():
    lay = S2Layout(16, 2, 4)
    torch.manual_seed(2)
    lens = [70, 130, 16, 45]
    cu = torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), dtype=torch.int32)
    t = sum(lens)
    q, k, v = _rand(t, 4, 16), _rand(t, 2, 16), _rand(t, 2, 16)
    out, lse = s2_attention(q, k, v, lay, cu_seqlens=cu, backend="reference", return_lse=True)
    assert out.shape == (t, 4, 16) and lse.shape == (4, t)
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
        o_ref, l_ref = dense_attention(q[a:b], k[a:b], v[a:b], _layout_kwargs(lay))  # positions restart at 0
        torch.testing.assert_close(out[a:b], o_ref, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(lse[:, a:b].double(), l_ref, rtol=1e-6, atol=1e-5)


def test_low_precision_inputs_keep_dtype():
    lay = S2Layout(16, 2, 4)
    q = torch.randn(1, 100, 2, 16, dtype=torch.bfloat16)
    out = s2_attention(q, q, q, lay, backend="reference")
    assert out.dtype == torch.bfloat16
    ref, _ = dense_attention(q[0].double(), q[0].double(), q[0].double(), _layout_kwargs(lay))
    assert (out[0].double() - ref).abs().max() < 2e-2


def test_sdpa_backend_dense_only():
    q = torch.randn(1, 40, 2, 8)
    k = torch.randn(1, 50, 1, 8)
    out = s2_attention(q, k, k, dense_layout(16), backend="sdpa")
    ref = s2_attention(q, k, k, dense_layout(16), backend="reference")
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="dense causal attention only"):
        s2_attention(q, k, k, S2Layout(16, 1, 2), backend="sdpa")


@pytest.mark.parametrize("kwargs,msg", [
    (dict(q=(1, 8, 3, 4), k=(1, 8, 2, 4)), r"query heads \(3\) must be a multiple of kv heads \(2\)"),
    (dict(q=(1, 9, 2, 4), k=(1, 8, 2, 4)), "q_len=9, kv_len=8"),
    (dict(q=(1, 8, 2, 4), k=(2, 8, 2, 4)), "batch"),
    (dict(q=(1, 8, 2, 4), k=(1, 8, 2, 6)), "head dim"),
    (dict(q=(8, 2, 4), k=(8, 2, 4)), r"expected \[B, S, H, D\]"),
])
def test_bad_shapes(kwargs, msg):
    q, k = torch.randn(kwargs["q"]), torch.randn(kwargs["k"])
    with pytest.raises(ValueError, match=msg):
        s2_attention(q, k, k, S2Layout(16, 1, 2), backend="reference")


@pytest.mark.parametrize("cu,msg", [
    (torch.tensor([0, 5, 8], dtype=torch.int64), "int32"),
    (torch.tensor([1, 5, 8], dtype=torch.int32), "start at 0"),
    (torch.tensor([0, 5, 5, 8], dtype=torch.int32), r"strictly increasing: cu_seqlens\[1\]=5, cu_seqlens\[2\]=5"),
    (torch.tensor([0, 5, 7], dtype=torch.int32), r"cu_seqlens\[-1\]=7 must equal .* T=8"),
])
def test_bad_cu_seqlens(cu, msg):
    x = torch.randn(8, 2, 4)
    with pytest.raises(ValueError, match=msg):
        s2_attention(x, x, x, S2Layout(16, 1, 2), cu_seqlens=cu, backend="reference")


def test_bad_dtype_backend_and_layout():
    x = torch.randn(1, 8, 2, 4)
    with pytest.raises(ValueError, match="dtype=torch.int64"):
        s2_attention(x.long(), x.long(), x.long(), S2Layout(16, 1, 2))
    with pytest.raises(ValueError, match="backend='flash'"):
        s2_attention(x, x, x, S2Layout(16, 1, 2), backend="flash")
    with pytest.raises(ValueError, match="layout must be"):
        s2_attention(x, x, x, {"block_size": 16})
    with pytest.raises(ValueError, match="share a dtype"):
        s2_attention(x, x.double(), x, S2Layout(16, 1, 2))


def test_auto_backend_choice(monkeypatch):
    import s2megatron.ops as ops
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert ops.resolve_backend("auto", cpu, dense=True, sdpa_ok=True) == "reference"
    monkeypatch.setattr(ops, "triton_available", lambda: True)
    assert ops.resolve_backend("auto", cuda, dense=True, sdpa_ok=True) == "sdpa"       # dense layers: cuDNN/flash
    assert ops.resolve_backend("auto", cuda, dense=True, sdpa_ok=False) == "triton"    # lse or varlen: our kernel
    assert ops.resolve_backend("auto", cuda, dense=False, sdpa_ok=True) == "triton"
    assert ops.resolve_backend("triton", cuda, dense=True, sdpa_ok=True) == "triton"   # explicit choice wins
    monkeypatch.setattr(ops, "triton_available", lambda: False)
    assert ops.resolve_backend("auto", cuda, dense=False) == "reference"
