"""Fused RoPE (s2megatron.model.rope) against a float64 reference written here, and its Megatron-Core hook.

Without CUDA the Triton kernel runs under the interpreter (TRITON_INTERPRET=1, set only when CUDA is absent and
before the kernel is decorated); the PyTorch fallback (CPU without the interpreter) is checked by the same tests.
"""
import types

import pytest
import torch

from triton_interpret import DEVICE, InterpreterEnv, backend_fixture, interpreted  # noqa: E402
from numerics import gen, rel_err  # noqa: E402

_ENV = InterpreterEnv()  # before triton and the kernel are imported

from megatron.core.models.common.embeddings import rope_utils  # noqa: E402
from megatron.core.transformer.transformer_config import TransformerConfig  # noqa: E402

from s2megatron.model import rope  # noqa: E402

rope = interpreted(rope, "_rope_row_kernel")

TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}


_interpreter_env = _ENV.fixture()


backend = backend_fixture(rope)  # each test runs on the Triton kernels and on the PyTorch fallback


# ---------------------------------------------------------------------------------------------------------------------
# float64 reference: t * cos(f) + rotate_half(t) * sin(f) on the first rot_dim channels, the rest passed through


def ref_rope(t64: torch.Tensor, angles64: torch.Tensor) -> torch.Tensor:
    """t64 [rows, ..., d]; angles64 [rows, rot_dim] (the angle of every row) -> [rows, ..., d] float64."""
    rot_dim = angles64.shape[-1]
    a = angles64.reshape(angles64.shape[0], *([1] * (t64.dim() - 2)), rot_dim)
    x, rest = t64[..., :rot_dim], t64[..., rot_dim:]
    x1, x2 = x[..., : rot_dim // 2], x[..., rot_dim // 2:]
    return torch.cat((x * a.cos() + torch.cat((-x2, x1), dim=-1) * a.sin(), rest), dim=-1)


def random_freqs(rows, rot_dim, seed, scale=20.0):
    """[rows, 1, 1, rot_dim] float32 angles whose two halves differ (the kernel must not assume duplicated halves)."""
    return ((torch.rand(rows, 1, 1, rot_dim, generator=gen(seed)) * 2 - 1) * scale).to(DEVICE)


def megatron_freqs(rows, rot_dim, base=10000.0):
    """Angles laid out as Megatron's RotaryEmbedding makes them: [pos * inv_freq, pos * inv_freq]."""
    inv_freq = 1.0 / (base ** (torch.arange(0, rot_dim, 2, dtype=torch.float32) / rot_dim))
    f = torch.outer(torch.arange(rows, dtype=torch.float32), inv_freq)
    return torch.cat((f, f), dim=-1)[:, None, None, :].to(DEVICE)


def check_fwd_bwd(fn, t, angles_per_row, seed, *, leaf=None):
    """Forward and backward of fn(t) vs the float64 reference; t may be a view of ``leaf`` (which gets the grad)."""
    leaf = t if leaf is None else leaf
    tol = TOL[t.dtype]
    out = fn(t)
    assert out.shape == t.shape and out.dtype == t.dtype and out.is_contiguous()
    t64 = t.detach().double().requires_grad_()
    ref = ref_rope(t64, angles_per_row.double())
    assert torch.isfinite(out).all()
    assert rel_err(out, ref.detach()) < tol, f"forward: {rel_err(out, ref.detach()):.2e}"
    dout = torch.randn(out.shape, generator=gen(seed + 1)).to(DEVICE, out.dtype)
    (grad,) = torch.autograd.grad(out, leaf, dout)
    (ref_grad,) = torch.autograd.grad(ref, t64, dout.double())
    grad_t = grad if leaf is t else grad[tuple(_view_index(leaf, t))]
    assert rel_err(grad_t, ref_grad) < tol, f"backward: {rel_err(grad_t, ref_grad):.2e}"
    if leaf is not t:  # channels of the leaf outside the view get no gradient
        mask = torch.ones_like(grad, dtype=torch.bool)
        mask[tuple(_view_index(leaf, t))] = False
        assert (grad[mask] == 0).all()
    return out


def _view_index(leaf, view):
    """Index of ``leaf`` that ``view`` (a slice of its last dim) covers."""
    start = view.storage_offset() - leaf.storage_offset()
    return [slice(None)] * (leaf.dim() - 1) + [slice(start, start + view.shape[-1])]


# ---------------------------------------------------------------------------------------------------------------------
# sbhd


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rot_dim", [80, 48])
def test_sbhd_strided_qkv_slice(backend, dtype, rot_dim):
    """t is the k slice of a fused [s, b, h, 3d] projection (non-contiguous), 3 heads of dim 80; rot_dim < d passes
    the rest through; freqs has more rows than s."""
    s, b, h, d = 5, 2, 3, 80
    qkv = torch.randn(s, b, h, 3 * d, generator=gen(1)).to(DEVICE, dtype).requires_grad_()
    t = qkv[..., d:2 * d]
    assert not t.is_contiguous()
    freqs = random_freqs(s + 3, rot_dim, seed=2)
    out = check_fwd_bwd(lambda x: rope.fused_apply_rotary_pos_emb(x, freqs), t, freqs[:s, 0, 0], seed=3, leaf=qkv)
    assert torch.equal(out[..., rot_dim:], t[..., rot_dim:])  # pass-through channels are copied exactly


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_sbhd_head_chunks_and_megatron_freqs(backend, dtype, monkeypatch):
    """Heads processed in several masked chunks per row (small tile) give the same result; Megatron-style angles."""
    monkeypatch.setattr(rope, "_TILE_ELEMS", 64)  # 32-channel halves -> 2 heads per chunk, 5 heads -> 3 chunks
    s, b, h, d = 7, 1, 5, 64
    t = torch.randn(s, b, h, d, generator=gen(4)).to(DEVICE, dtype).requires_grad_()
    freqs = megatron_freqs(s, d)
    check_fwd_bwd(lambda x: rope.fused_apply_rotary_pos_emb(x, freqs), t, freqs[:s, 0, 0], seed=5)


def test_sbhd_transpose_output_memory(backend):
    s, b, h, d = 4, 3, 2, 16
    t = torch.randn(s, b, h, d, generator=gen(6)).to(DEVICE).requires_grad_()
    freqs = random_freqs(s, d, seed=7)
    out = rope.fused_apply_rotary_pos_emb(t, freqs, transpose_output_memory=True)
    assert out.shape == t.shape and out.transpose(0, 1).is_contiguous()
    ref = ref_rope(t.detach().double(), freqs[:, 0, 0].double())
    assert rel_err(out, ref) < TOL[torch.float32]
    dout = torch.randn(out.shape, generator=gen(8)).to(DEVICE)
    (grad,) = torch.autograd.grad(out, t, dout)
    t64 = t.detach().double().requires_grad_()
    (ref_grad,) = torch.autograd.grad(ref_rope(t64, freqs[:, 0, 0].double()), t64, dout.double())
    assert rel_err(grad, ref_grad) < TOL[torch.float32]


# ---------------------------------------------------------------------------------------------------------------------
# thd


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_thd_unequal_sequences(backend, dtype):
    """3 packed sequences of lengths 5, 1, 9: positions restart at 0 at each sequence start."""
    lens = [5, 1, 9]
    total, h, d, rot_dim = sum(lens), 3, 80, 64
    cu = torch.tensor([0, 5, 6, 15], dtype=torch.int32, device=DEVICE)
    freqs = random_freqs(max(lens) + 2, rot_dim, seed=8)
    positions = torch.cat([torch.arange(n) for n in lens]).to(DEVICE)
    big = torch.randn(total, h, 2 * d, generator=gen(9)).to(DEVICE, dtype).requires_grad_()
    t = big[..., :d]  # strided packed input
    check_fwd_bwd(lambda x: rope.fused_apply_rotary_pos_emb_thd(x, cu, freqs), t, freqs[positions, 0, 0], seed=10,
                  leaf=big)


# ---------------------------------------------------------------------------------------------------------------------
# Megatron-Core integration


def _config(fused: bool, heads: int = 3, head_dim: int = 80) -> TransformerConfig:
    return TransformerConfig(num_layers=1, hidden_size=heads * head_dim, num_attention_heads=heads,
                             apply_rope_fusion=fused)


_NO_CP = types.SimpleNamespace(size=lambda: 1, rank=lambda: 0)  # a context-parallel group of one


@pytest.fixture
def restore_rope_utils(monkeypatch):
    """Whatever install_rope_fusion sets in rope_utils is undone after the test."""
    for name in ("fused_apply_rotary_pos_emb", "fused_apply_rotary_pos_emb_thd"):
        monkeypatch.setattr(rope_utils, name, getattr(rope_utils, name))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_megatron_unfused_and_install_routes(restore_rope_utils, dtype):
    s, b, h, d, rot_dim = 6, 2, 3, 80, 64
    freqs = megatron_freqs(s, rot_dim)
    t = torch.randn(s, b, h, d, generator=gen(11)).to(DEVICE, dtype)
    unfused = rope_utils.apply_rotary_pos_emb(t, freqs, _config(False), cp_group=_NO_CP)
    ours = rope.fused_apply_rotary_pos_emb(t, freqs)
    ref = ref_rope(t.double(), freqs[:, 0, 0].double())
    # Megatron rounds cos/sin and every product to t's dtype; ours rounds once, so compare at the dtype's tolerance
    assert rel_err(unfused, ref) < 2 * TOL[dtype] and rel_err(ours, ref) < TOL[dtype]
    assert rel_err(ours, unfused.double()) < 2 * TOL[dtype]

    if rope_utils.fused_apply_rotary_pos_emb is not None:  # Transformer Engine present: it stays
        pytest.skip("Transformer Engine's fused RoPE is installed")
    assert rope.install_rope_fusion() is True
    assert rope.install_rope_fusion() is True  # idempotent
    assert rope_utils.fused_apply_rotary_pos_emb is rope.fused_apply_rotary_pos_emb
    assert rope_utils.fused_apply_rotary_pos_emb_thd is rope.fused_apply_rotary_pos_emb_thd
    config = _config(True)  # validation accepts apply_rope_fusion once a fused function is installed
    routed = rope_utils.apply_rotary_pos_emb(t, freqs, config, cp_group=_NO_CP)
    assert torch.equal(routed, ours)

    lens, max_len = [4, 7, 2], 9  # max_len != total tokens: Megatron's unfused thd then restarts positions too
    cu = torch.tensor([0, 4, 11, 13], dtype=torch.int32, device=DEVICE)
    packed = torch.randn(sum(lens), h, d, generator=gen(12)).to(DEVICE, dtype)
    freqs_thd = megatron_freqs(max_len, rot_dim)
    routed_thd = rope_utils.apply_rotary_pos_emb(packed, freqs_thd, config, cu_seqlens=cu, cp_group=_NO_CP)
    assert torch.equal(routed_thd, rope.fused_apply_rotary_pos_emb_thd(packed, cu, freqs_thd))
    unfused_thd = rope_utils.apply_rotary_pos_emb(packed, freqs_thd, _config(False), cu_seqlens=cu, cp_group=_NO_CP)
    assert rel_err(routed_thd, unfused_thd.double()) < 2 * TOL[dtype]


def test_install_keeps_existing(restore_rope_utils):
    """A function already in rope_utils (Transformer Engine's) is left in place; install then reports False."""
    sentinel = lambda *a, **k: None  # noqa: E731
    rope_utils.fused_apply_rotary_pos_emb = sentinel
    rope_utils.fused_apply_rotary_pos_emb_thd = None
    assert rope.install_rope_fusion() is False
    assert rope_utils.fused_apply_rotary_pos_emb is sentinel
    assert rope_utils.fused_apply_rotary_pos_emb_thd is rope.fused_apply_rotary_pos_emb_thd


# ---------------------------------------------------------------------------------------------------------------------
# bad input


def test_cos_sin_tables_once_per_frequency_tensor():
    """The cos/sin tables are built once per frequency tensor (Megatron reuses it across layers and steps), and
    rebuilt when that tensor changes in place or another one is passed."""
    freqs = megatron_freqs(16, 8).to(DEVICE)
    t = torch.randn(16, 1, 2, 8, generator=gen(31)).to(DEVICE)
    first = rope._cos_sin_tables(freqs, freqs[:, 0, 0, :])
    assert rope._cos_sin_tables(freqs, freqs[:, 0, 0, :])[0] is first[0]
    before = rope.fused_apply_rotary_pos_emb(t, freqs)
    freqs.mul_(2.0)  # in place: a new version of the same tensor
    again = rope._cos_sin_tables(freqs, freqs[:, 0, 0, :])
    assert again[0] is not first[0] and torch.allclose(again[0], torch.cos(freqs[:, 0, 0, :]))
    after = rope.fused_apply_rotary_pos_emb(t, freqs)
    assert not torch.allclose(before, after)
    other = freqs.clone()
    assert rope._cos_sin_tables(other, other[:, 0, 0, :])[0] is not again[0]


def test_value_errors():
    t = torch.randn(4, 1, 2, 16, device=DEVICE)
    f = random_freqs(4, 16, seed=13)
    cu = torch.tensor([0, 4], dtype=torch.int32, device=DEVICE)
    cases = [
        (lambda: rope.fused_apply_rotary_pos_emb(t, f, interleaved=True), "interleaved=True"),
        (lambda: rope.fused_apply_rotary_pos_emb(t, f[:3]), "3 rows"),
        (lambda: rope.fused_apply_rotary_pos_emb(t, random_freqs(4, 15, seed=0)), "rot_dim 15"),
        (lambda: rope.fused_apply_rotary_pos_emb(t, random_freqs(4, 18, seed=0)), "rot_dim 18"),
        (lambda: rope.fused_apply_rotary_pos_emb(t[0], f), "(1, 2, 16)"),
        (lambda: rope.fused_apply_rotary_pos_emb(t, f[:, 0]), "(4, 1, 16)"),
        (lambda: rope.fused_apply_rotary_pos_emb(t.double(), f), "torch.float64"),
        (lambda: rope.fused_apply_rotary_pos_emb_thd(t[:, 0], cu, f, cp_size=2, cp_rank=1), "cp_size=2"),
        (lambda: rope.fused_apply_rotary_pos_emb_thd(t[:, 0], cu, f, interleaved=True), "interleaved=True"),
        (lambda: rope.fused_apply_rotary_pos_emb_thd(t, cu, f), "(4, 1, 2, 16)"),
        (lambda: rope.fused_apply_rotary_pos_emb_thd(t[:, 0], cu[:1], f), "shape (1,)"),
        (lambda: rope.fused_apply_rotary_pos_emb_thd(t[:, 0], cu.float(), f), "torch.float32"),
    ]
    for call, needle in cases:
        with pytest.raises(ValueError) as info:
            call()
        assert needle in str(info.value), (needle, str(info.value))


# ---------------------------------------------------------------------------------------------------------------------
# GPU at training size


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gpu_training_size(dtype):
    """s=4096, b=2, h=16, d=128 with Megatron's angles (up to ~4096 rad: checks cos/sin accuracy at large angles)."""
    s, b, h, d = 4096, 2, 16, 128
    qkv = torch.randn(s, b, h, 3 * d, generator=gen(14)).to("cuda", dtype).requires_grad_()
    t = qkv[..., :d]
    freqs = megatron_freqs(s, d).cuda()
    check_fwd_bwd(lambda x: rope.fused_apply_rotary_pos_emb(x, freqs), t, freqs[:, 0, 0], seed=15, leaf=qkv)


_ENV.restore()  # after this module's kernel is decorated: other modules see the environment as it was
