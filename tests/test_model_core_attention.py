"""S2CoreAttention in isolation (no process group): global head ids and layer numbers, the megatron tensor layouts
(sbhd and packed thd) against a float64 oracle built from the global pattern, and the errors it must raise."""
from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.transformer_block import get_num_layers_to_build
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

from s2megatron.model import S2CoreAttention
from s2megatron.sparsity import LayerSchedule

HEAD_DIM = 8
SCHEDULE = {"default": {"block_size": 16, "local_blocks": 2, "vert_stride": 4},
            "layers": {1: {"per_kv_head": True}, 2: {"vert_stride": 3, "sliding_offset": 2, "num_dense_heads": 1},
                       3: "dense", 5: {"local_blocks": 1, "vert_stride": 8, "per_kv_head": True}}}


class FakeGroup:
    """The two methods S2CoreAttention asks of a process group."""

    def __init__(self, rank, size):
        self._rank, self._size = rank, size

    def rank(self):
        return self._rank

    def size(self):
        return self._size


def make_config(num_layers, heads, groups, **extra):
    return TransformerConfig(num_layers=num_layers, hidden_size=heads * HEAD_DIM, num_attention_heads=heads,
                             num_query_groups=groups, kv_channels=HEAD_DIM, attention_dropout=0.0, **extra)


def build(heads, groups, tp, rank, layer_number, schedule, num_layers=None, **kwargs):
    """The module as megatron's Attention builds it on TP rank ``rank``: with num_query_groups < tp it receives a
    config whose num_query_groups was raised to tp, and the spec passes the real count."""
    num_layers = num_layers or schedule.num_layers
    config = make_config(num_layers, heads, max(groups, tp) if groups < tp else groups)
    return S2CoreAttention(config=config, layer_number=layer_number, attn_mask_type=AttnMaskType.causal,
                           attention_type="self", cp_comm_type=None, softmax_scale=None,
                           pg_collection=SimpleNamespace(tp=FakeGroup(rank, tp)), layer_schedule=schedule,
                           num_query_groups=groups, attention_backend="reference", **kwargs)


HEAD_SPLITS = [(4, 2, 1), (4, 2, 2), (4, 4, 4), (4, 1, 2), (4, 1, 4), (8, 2, 4), (8, 1, 4), (8, 8, 2), (8, 2, 8),
               (6, 3, 3), (6, 6, 3)]


@pytest.mark.parametrize("heads,groups,tp", HEAD_SPLITS)
def test_rank_pattern_is_its_slice_of_the_global_pattern(heads, groups, tp):
    schedule = LayerSchedule.from_config(SCHEDULE, 6)
    seq = 16 * 12  # 12 blocks: far past local_blocks, every stripe residue present
    per_rank = heads // tp
    ranks_differ = False  # some layer gives different ranks different patterns, so a wrong offset would fail
    for layer in range(6):
        layout = schedule.layout(layer)
        global_mask = layout.block_mask(heads, seq, num_kv_heads=groups)
        for rank in range(tp):
            module = build(heads, groups, tp, rank, layer + 1, schedule)
            assert module.layout == layout
            assert (module.head_offset, module.total_heads, module.total_kv_heads) == (rank * per_rank, heads, groups)
            mine = module.block_mask(seq)
            assert torch.equal(mine, global_mask[rank * per_rank:(rank + 1) * per_rank]), (layer, rank)
            ranks_differ |= not torch.equal(mine, global_mask[:per_rank])
    assert ranks_differ or tp == 1


PIPELINE_SPLITS = [dict(num_layers=8, pp=2), dict(num_layers=8, pp=4), dict(num_layers=8, pp=2, vpp=2),
                   dict(num_layers=12, pp=2, vpp=3), dict(num_layers=6, pp=2, first=2)]


@pytest.mark.parametrize("split", PIPELINE_SPLITS, ids=lambda s: "-".join(f"{k}{v}" for k, v in s.items()))
@pytest.mark.parametrize("heads,groups,tp", [(4, 2, 2), (8, 1, 4)])
def test_pipeline_stages_cover_every_global_layer_once(split, heads, groups, tp):
    """Megatron's layer offsets give each (pp_rank, vp_stage) its global layer numbers; the module built with
    ``offset + local`` (what TransformerLayer passes) picks that layer's layout and its TP head slice."""
    num_layers = split["num_layers"]
    extra = dict(pipeline_model_parallel_size=split["pp"], pipeline_dtype=torch.float32)
    if "vpp" in split:
        extra["virtual_pipeline_model_parallel_size"] = split["vpp"]
    if "first" in split:
        extra["num_layers_in_first_pipeline_stage"] = split["first"]
    config = make_config(num_layers, heads, groups, **extra)
    schedule = LayerSchedule.from_config(SCHEDULE, num_layers)
    seq, per_rank = 16 * 10, heads // tp
    seen = []
    for pp_rank in range(split["pp"]):
        for vp_stage in (range(split["vpp"]) if "vpp" in split else [None]):
            offset = get_transformer_layer_offset(config, vp_stage, pp_rank)
            for local in range(get_num_layers_to_build(config, vp_stage=vp_stage, pp_rank=pp_rank)):
                number = offset + local + 1
                seen.append(number)
                want = schedule.layout(number - 1).block_mask(heads, seq, num_kv_heads=groups)
                for rank in range(tp):
                    module = build(heads, groups, tp, rank, number, schedule)
                    assert module.layout == schedule.layout(number - 1)
                    assert torch.equal(module.block_mask(seq), want[rank * per_rank:(rank + 1) * per_rank])
    assert sorted(seen) == list(range(1, num_layers + 1))


def token_mask(layout, heads, groups, seq):
    """[H, seq, seq] bool keep-mask of the global model from the layout's block mask (the pattern definition)."""
    blocks = layout.block_mask(heads, seq, num_kv_heads=groups)
    pos = torch.arange(seq)
    b = layout.block_size
    return blocks[:, pos[:, None] // b, pos[None, :] // b] & (pos[None, :] <= pos[:, None])


def oracle(q, k, v, mask, scale):
    """float64 attention; q [S, H, D], k/v [S, G, D], mask [H, S, S] -> [S, H, D]."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    scores = torch.einsum("shd,thd->hst", q, k) * scale
    scores = scores.masked_fill(~mask, float("-inf"))
    return torch.einsum("hst,thd->shd", scores.softmax(-1), v)


@pytest.mark.parametrize("heads,groups,tp", [(4, 2, 2), (4, 1, 2), (8, 2, 4)])
def test_forward_sbhd_matches_global_oracle(heads, groups, tp):
    torch.manual_seed(0)
    seq, batch = 16 * 9 + 5, 2  # not a multiple of the block size
    schedule = LayerSchedule.from_config(SCHEDULE, 6)
    q = torch.randn(seq, batch, heads, HEAD_DIM, dtype=torch.float64)
    k = torch.randn(seq, batch, groups, HEAD_DIM, dtype=torch.float64)
    v = torch.randn(seq, batch, groups, HEAD_DIM, dtype=torch.float64)
    per_rank = heads // tp
    for layer in (0, 1, 2):
        layout = schedule.layout(layer)
        mask = token_mask(layout, heads, groups, seq)
        want = torch.stack([oracle(q[:, b], k[:, b], v[:, b], mask, 1 / math.sqrt(HEAD_DIM)) for b in range(batch)], 1)
        for rank in range(tp):
            module = build(heads, groups, tp, rank, layer + 1, schedule)
            heads_r = slice(rank * per_rank, (rank + 1) * per_rank)
            g0 = module.head_offset // (heads // groups)  # first global kv group of this rank
            kv = slice(g0, g0 + module.num_kv_heads)
            out = module(q[:, :, heads_r], k[:, :, kv], v[:, :, kv], None)
            assert out.shape == (seq, batch, per_rank * HEAD_DIM)
            torch.testing.assert_close(out, want[:, :, heads_r].reshape(seq, batch, -1), rtol=1e-10, atol=1e-10)


def test_forward_packed_thd_restarts_positions():
    torch.manual_seed(1)
    heads, groups, tp, rank = 4, 2, 2, 1
    lengths = [100, 37, 64]
    schedule = LayerSchedule.from_config(SCHEDULE, 6)
    module = build(heads, groups, tp, rank, 1, schedule)
    cu = torch.tensor([0, 100, 137, 201], dtype=torch.int32)
    total = sum(lengths)
    q = torch.randn(total, heads // tp, HEAD_DIM, dtype=torch.float64)
    k = torch.randn(total, 1, HEAD_DIM, dtype=torch.float64)
    v = torch.randn(total, 1, HEAD_DIM, dtype=torch.float64)
    params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=100, max_seqlen_kv=100)
    out = module(q, k, v, None, packed_seq_params=params)
    assert out.shape == (total, (heads // tp) * HEAD_DIM)
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
        alone = module(q[a:b, None], k[a:b, None], v[a:b, None], None)   # as its own sbhd batch of one
        torch.testing.assert_close(out[a:b], alone[:, 0], rtol=1e-12, atol=1e-12)


def test_causal_mask_accepted_and_deterministic_backward():
    torch.manual_seed(2)
    schedule = LayerSchedule.from_config(SCHEDULE, 6)
    module = build(4, 2, 1, 0, 1, schedule)
    seq = 80
    q, k, v = (torch.randn(seq, 2, n, HEAD_DIM, requires_grad=True) for n in (4, 2, 2))
    mask = torch.ones(seq, seq, dtype=torch.bool).triu(1)[None, None].expand(2, 1, seq, seq)
    runs = []
    for m in (None, mask, mask):
        out = module(q, k, v, m)
        grads = torch.autograd.grad(out.square().sum(), (q, k, v))
        runs.append((out.detach(), grads))
    for out, grads in runs[1:]:  # bitwise: selective recompute reruns the forward in backward
        assert torch.equal(out, runs[0][0]) and all(torch.equal(a, b) for a, b in zip(grads, runs[0][1]))
    # a verified mask is not trusted after an in-place change, nor is another mask of the same shape
    owned = mask.clone()
    module(q, k, v, owned)
    owned[:, :, 60:, :30] = True
    with pytest.raises(ValueError, match="not the causal mask"):
        module(q, k, v, owned)
    other = mask.clone()
    other[:, :, 70:, :10] = True
    with pytest.raises(ValueError, match="not the causal mask"):
        module(q, k, v, other)


def test_no_parameters_and_empty_checkpoint_state():
    module = build(4, 2, 2, 1, 1, LayerSchedule.from_config(SCHEDULE, 6))
    assert list(module.parameters()) == [] and list(module.buffers()) == []
    assert module.sharded_state_dict() == {}


def test_refuses_what_it_does_not_implement():
    schedule = LayerSchedule.from_config(SCHEDULE, 6)
    module = build(4, 2, 1, 0, 1, schedule)
    q, k, v = torch.randn(64, 1, 4, HEAD_DIM), torch.randn(64, 1, 2, HEAD_DIM), torch.randn(64, 1, 2, HEAD_DIM)
    doc_mask = torch.ones(64, 64, dtype=torch.bool).triu(1)
    doc_mask[32:, :32] = True  # two documents: not the causal mask
    with pytest.raises(ValueError, match="not the causal mask"):
        module(q, k, v, doc_mask[None, None])
    with pytest.raises(ValueError, match="bool"):
        module(q, k, v, torch.zeros(1, 1, 64, 64))
    with pytest.raises(ValueError, match="attention_bias"):
        module(q, k, v, None, attention_bias=torch.zeros(1))
    with pytest.raises(ValueError, match="causal attention only"):
        module(q, k, v, None, attn_mask_type=AttnMaskType.no_mask)
    with pytest.raises(ValueError, match="qkv_format"):
        module(q, k, v, None, packed_seq_params=PackedSeqParams(qkv_format="sbhd"))

    def make(config=None, **kw):
        args = dict(config=config or make_config(6, 4, 2), layer_number=1, attn_mask_type=AttnMaskType.causal,
                    attention_type="self", layer_schedule=schedule)
        args.update(kw)
        return S2CoreAttention(**args)

    with pytest.raises(ValueError, match="context parallelism"):
        make(config=make_config(6, 4, 2, context_parallel_size=2))
    with pytest.raises(ValueError, match="attention dropout"):
        make(attention_dropout=0.1)
    with pytest.raises(ValueError, match="self attention"):
        make(attention_type="cross")
    with pytest.raises(ValueError, match="causal attention only"):
        make(attn_mask_type=AttnMaskType.padding)
    with pytest.raises(ValueError, match="attention_backend"):
        make(attention_backend="flash")
    with pytest.raises(ValueError, match="covers 6 layers"):
        make(config=make_config(4, 4, 2))
    with pytest.raises(ValueError, match="layer_number=7"):
        make(layer_number=7)
    with pytest.raises(ValueError, match="exactly one"):
        make(layout=schedule.layout(0))
    with pytest.raises(ValueError, match="num_query_groups=1 disagrees"):
        make(num_query_groups=1)  # tp 1: megatron never raises the config's groups, so 1 vs 2 is a mistake
    with pytest.raises(ValueError, match="num_dense_heads"):
        make(layer_schedule=None, layout=schedule.layout(2).__class__(block_size=16, local_blocks=1, vert_stride=4,
                                                                    num_dense_heads=5))
