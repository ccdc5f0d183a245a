import math
import random
import warnings

import pytest
import torch

from pattern_oracle import pattern_head, token_keep
from s2megatron.sparsity import (BlockMaskLayout, CoverageWarning, LayerSchedule, S2Layout, build_metadata, density,
                                 dense_layout, get_metadata)


def test_worked_example():
    # S2_PATTERN.md: 10 blocks, L=2, V=4, 4 heads, offset 1: kept blocks of the last query block.
    mask = S2Layout(block_size=64, local_blocks=2, vert_stride=4).block_mask(4, 640)
    got = [mask[h, 9].nonzero().flatten().tolist() for h in range(4)]
    assert got == [[3, 7, 8, 9], [2, 6, 8, 9], [1, 5, 8, 9], [0, 4, 8, 9]]
    assert mask.any(0)[9].all()  # union completeness


def _block_oracle(kw, num_heads, q_len, kv_len, head_offset, total_heads, total_kv_heads, per_kv_head):
    """Block mask from the token-level oracle: block (i, j) kept iff its first query row keeps any key of j...
    evaluated on the block's first token pair (the pattern is constant on blocks apart from causality)."""
    b = kw["block_size"]
    first, last = (kv_len - q_len) // b, (kv_len - 1) // b
    nk = math.ceil(kv_len / b)
    rows = torch.arange(first, last + 1) * b + (b - 1)  # last token of each query block sees the whole diagonal
    cols = torch.arange(nk) * b
    out = []
    for h in range(num_heads):
        g, ht = pattern_head(head_offset + h, total_heads, total_kv_heads, per_kv_head)
        out.append(token_keep(rows, cols, g, ht, **kw))
    return torch.stack(out)


CASES = [
    dict(block_size=16, local_blocks=2, vert_stride=4, heads=4, kv_heads=4, q=200, kv=200, off=0, tot=None),
    dict(block_size=32, local_blocks=3, vert_stride=5, heads=3, kv_heads=1, q=150, kv=410, off=3, tot=12),
    dict(block_size=64, local_blocks=1, vert_stride=3, heads=6, kv_heads=2, q=1000, kv=1000, off=0, tot=None,
         dense=2),
    dict(block_size=16, local_blocks=4, vert_stride=16, heads=4, kv_heads=2, q=37, kv=1111, off=4, tot=8,
         per_kv=True),
    dict(block_size=128, local_blocks=2, vert_stride=2, heads=8, kv_heads=8, q=3000, kv=3000, off=0, tot=None,
         sliding=False, offset=0),
    dict(block_size=16, local_blocks=2, vert_stride=8, heads=2, kv_heads=2, q=300, kv=300, off=0, tot=None,
         offset=5),
]


@pytest.mark.parametrize("case", CASES)
def test_block_mask_matches_token_oracle(case):
    kw = dict(block_size=case["block_size"], local_blocks=case["local_blocks"], vert_stride=case["vert_stride"],
              head_sliding=case.get("sliding", True), sliding_offset=case.get("offset", 1),
              num_dense_heads=case.get("dense", 0))
    per_kv = case.get("per_kv", False)
    lay = S2Layout(**kw, per_kv_head=per_kv)
    tot = case["tot"] or case["heads"]
    tot_kv = tot // (case["heads"] // case["kv_heads"])
    got = lay.block_mask(case["heads"], case["q"], case["kv"], num_kv_heads=case["kv_heads"],
                         head_offset=case["off"], total_heads=case["tot"])
    want = _block_oracle(kw, case["heads"], case["q"], case["kv"], case["off"], tot, tot_kv, per_kv)
    assert got.shape == want.shape
    assert torch.equal(got, want)


def test_tensor_parallel_slices_equal_global_pattern():
    lay = S2Layout(block_size=16, local_blocks=2, vert_stride=8)
    total = lay.block_mask(8, 512)
    for tp in (2, 4, 8):
        per = 8 // tp
        for r in range(tp):
            local = lay.block_mask(per, 512, head_offset=r * per, total_heads=8)
            assert torch.equal(local, total[r * per:(r + 1) * per])
    # local ids with the local count would be a different model: make sure the test can tell
    assert not torch.equal(lay.block_mask(4, 512), total[4:])


def _dense_rows(meta, mask, m):
    h, nq, nk = mask.shape
    t = meta.num_tiles
    padded = torch.nn.functional.pad(mask, (0, 0, 0, t * m - nq)).view(h, t, m, nk)
    sub = torch.arange(m)[None, None, :, None]
    return padded.any(2), torch.where(padded, sub, torch.full_like(sub, -1)).amax(2)


@pytest.mark.parametrize("rows_per_tile", [1, 2, 4])
@pytest.mark.parametrize("case", CASES)
def test_metadata_rows_and_columns(case, rows_per_tile):
    lay = S2Layout(case["block_size"], case["local_blocks"], case["vert_stride"],
                   head_sliding=case.get("sliding", True), sliding_offset=case.get("offset", 1),
                   num_dense_heads=case.get("dense", 0), per_kv_head=case.get("per_kv", False))
    args = (case["heads"], case["q"], case["kv"])
    kw = dict(num_kv_heads=case["kv_heads"], head_offset=case["off"], total_heads=case["tot"])
    mask = lay.block_mask(*args, **kw)
    meta = build_metadata(lay, *args, rows_per_tile=rows_per_tile, **kw)
    union, last = _dense_rows(meta, mask, rows_per_tile)
    h2p = meta.head_to_pattern.long()
    assert torch.equal(meta.row_dense()[h2p], union)
    assert meta.kept_blocks() == int(mask.sum())
    for h in range(case["heads"]):
        p = int(h2p[h])
        for t in range(meta.num_tiles):
            a, b = int(meta.row_ptr[p, t]), int(meta.row_ptr[p, t + 1])
            cols = meta.row_cols[a:b].long()
            assert cols.tolist() == sorted(cols.tolist())
            assert torch.equal(meta.row_last[a:b].long(), last[h, t, cols])
        for j in range(meta.num_key_blocks):
            a, b = int(meta.col_ptr[p, j]), int(meta.col_ptr[p, j + 1])
            assert meta.col_rows[a:b].tolist() == mask[h, :, j].nonzero().flatten().tolist()


def test_custom_layout_metadata_and_merge_refusal():
    torch.manual_seed(0)
    raw = torch.rand(3, 12, 12) < 0.4
    lay = BlockMaskLayout(raw, block_size=32)
    mask = lay.block_mask(3, 12 * 32)
    assert torch.equal(mask, raw & torch.tril(torch.ones(12, 12, dtype=torch.bool)))
    meta = build_metadata(lay, 3, 12 * 32)
    assert torch.equal(meta.row_dense()[meta.head_to_pattern.long()], mask)
    assert not lay.is_kv_cache_efficient()
    with pytest.raises(ValueError, match="not KV-cache efficient"):
        build_metadata(lay, 3, 12 * 32, rows_per_tile=2)
    # an S2 pattern given as a custom mask is KV-cache efficient and may be merged
    s2 = S2Layout(32, 2, 3)
    as_custom = BlockMaskLayout(s2.block_mask(4, 12 * 32), block_size=32)
    assert as_custom.is_kv_cache_efficient()
    a = build_metadata(as_custom, 4, 300, 380, rows_per_tile=2)
    b = build_metadata(s2, 4, 300, 380, rows_per_tile=2)
    assert torch.equal(a.row_dense()[a.head_to_pattern.long()], b.row_dense()[b.head_to_pattern.long()])
    with pytest.raises(ValueError, match="covers 12 blocks"):
        lay.block_mask(3, 13 * 32)


def test_metadata_is_cached_and_int32():
    lay = S2Layout(64, 4, 4)
    m1 = get_metadata(lay, 8, 4096)
    assert get_metadata(S2Layout(64, 4, 4), 8, 4096) is m1
    assert m1.row_ptr.dtype == m1.row_cols.dtype == m1.col_rows.dtype == torch.int32


def test_metadata_memory_is_proportional_to_kept_blocks():
    lay = S2Layout(64, 16, 16)
    meta = build_metadata(lay, 32, 65536)
    kept = meta.kept_blocks()
    stored = meta.row_cols.numel() * meta.head_to_pattern.numel() / meta.num_patterns
    assert stored == kept  # one int32 per kept block and head (patterns shared across heads store fewer)
    nb = 65536 // 64
    assert meta.row_cols.numel() < 0.2 * 32 * nb * nb / 2


@pytest.mark.parametrize("field,value,msg", [
    ("block_size", 48, "block_size=48"), ("local_blocks", 0, "local_blocks=0"), ("vert_stride", 0, "vert_stride=0"),
    ("num_dense_heads", -1, "num_dense_heads=-1"), ("sliding_offset", -2, "sliding_offset=-2"),
    ("head_sliding", "yes", "head_sliding='yes'"), ("local_blocks", 2.5, "local_blocks=2.5")])
def test_layout_validation_names_the_field(field, value, msg):
    kw = dict(block_size=64, local_blocks=2, vert_stride=4)
    kw[field] = value
    with pytest.raises(ValueError, match=msg.replace("(", r"\(")):
        S2Layout(**kw)


def test_head_count_errors():
    lay = S2Layout(64, 2, 4)
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        lay.block_mask(6, 256, num_kv_heads=4)
    with pytest.raises(ValueError, match="head_offset"):
        lay.block_mask(4, 256, head_offset=6, total_heads=8)
    with pytest.raises(ValueError, match="num_dense_heads=9"):
        S2Layout(64, 2, 4, num_dense_heads=9).block_mask(8, 256)
    with pytest.raises(ValueError, match="q_len"):
        lay.block_mask(4, 300, 200)


def test_schedule_from_config():
    cfg = {"default": {"block_size": 64, "local_blocks": 16, "vert_stride": 8}, "dense_every_n_layers": 2,
           "layers": {"0": "dense", 4: {"vert_stride": 4}}}
    s = LayerSchedule.from_config(cfg, 6)
    assert [lay.is_dense for lay in s.layouts] == [True, True, False, True, False, True]
    assert s.layout(4) == S2Layout(64, 16, 4)
    assert s.for_layer_number(3) == S2Layout(64, 16, 8)
    assert s.layout(1) == dense_layout(64)


@pytest.mark.parametrize("cfg,msg", [
    ({}, "needs a 'default'"),
    ({"default": "sparse"}, "sparsity.default='sparse'"),
    ({"default": {"block_size": 64, "local_blocks": 2, "vert_strid": 4}}, "unknown field"),
    ({"default": {"block_size": 64, "local_blocks": 2, "vert_stride": 4}, "layers": {"9": "dense"}}, "sparsity.layers.9"),
    ({"default": {"block_size": 64, "local_blocks": 2, "vert_stride": 4}, "layers": {"1": {"block_size": 3}}},
     "sparsity.layers.1: S2Layout.block_size=3"),
    ({"default": "dense", "dense_every_n_layers": -1}, "dense_every_n_layers=-1"),
    ({"default": "dense", "bogus": 1}, "unknown key"),
])
def test_schedule_errors(cfg, msg):
    with pytest.raises(ValueError, match=msg):
        LayerSchedule.from_config(cfg, 4)


def test_density_and_union_warning():
    d = density(S2Layout(64, 16, 16), 32, 32768)
    assert d.union_complete and abs(d.fraction - 0.120) < 0.002  # GPU_BASELINES.md density at 32k
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        d = density(S2Layout(64, 2, 16), 4, 8192)
    assert not d.union_complete
    assert any(issubclass(x.category, CoverageWarning) and "vert_stride 16" in str(x.message) for x in w)
    assert density(dense_layout(64), 4, 1000, warn=False).fraction == 1.0


def test_random_layouts_against_oracle():
    rng = random.Random(1234)
    for _ in range(15):
        b = rng.choice([16, 32, 64])
        kw = dict(block_size=b, local_blocks=rng.randint(1, 4), vert_stride=rng.randint(1, 9),
                  head_sliding=rng.random() < 0.8, sliding_offset=rng.randint(0, 3), num_dense_heads=rng.randint(0, 1))
        heads = rng.choice([2, 4, 6])
        kv = rng.randint(1, 20 * b)
        q = rng.randint(1, kv)
        mask = S2Layout(**kw).block_mask(heads, q, kv)
        assert torch.equal(mask, _block_oracle(kw, heads, q, kv, 0, heads, heads, False)), kw
