"""What a sparsity layout is: the S2 local + vertical-stride pattern and arbitrary per-head block masks.

The pattern formula lives in exactly one place, :func:`s2_keep`; the block masks, the kernel metadata, the
reference attention and the docs all derive from it (see ``docs/S2_PATTERN.md``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import torch

BLOCK_SIZES = (16, 32, 64, 128)


def stripe_residue(g: int, step: int, sliding_offset: int, vert_stride: int) -> int:
    """Key block j is a vertical stripe of pattern head g iff ``j % vert_stride == stripe_residue(...)``
    (the vertical term of :func:`s2_keep` solved for j)."""
    return (-(g * step + sliding_offset)) % vert_stride


def s2_keep(g, i, j, *, local_blocks: int, vert_stride: int, step: int, sliding_offset: int, dense):
    """The S2 pattern: may query block ``i`` of pattern head ``g`` attend key block ``j``?

    All of ``g``, ``i``, ``j`` and ``dense`` are broadcastable integer/bool tensors (or Python ints):
    ``keep = j <= i and (dense or i - j < local_blocks or (j + g*step + sliding_offset) % vert_stride == 0)``.
    """
    vertical = torch.remainder(j + g * step + sliding_offset, vert_stride) == 0
    return (j <= i) & (dense | ((i - j) < local_blocks) | vertical)


@dataclass(frozen=True)
class HeadMap:
    """How the local query heads of one rank map to global pattern heads.

    ``pattern_heads[h]`` is the global pattern head of local query head h; ``num_pattern_heads`` is Ht
    (total query heads, or total kv heads with ``per_kv_head``)."""

    pattern_heads: tuple
    num_pattern_heads: int


def resolve_heads(num_heads: int, num_kv_heads: Optional[int], head_offset: int, total_heads: Optional[int],
                  total_kv_heads: Optional[int], per_kv_head: bool) -> HeadMap:
    """Validate head counts and map local query heads to global pattern heads (S2_PATTERN.md)."""
    if num_heads < 1:
        raise ValueError(f"num_heads must be >= 1, got {num_heads}")
    num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
    if num_kv_heads < 1 or num_heads % num_kv_heads:
        raise ValueError(f"num_heads ({num_heads}) must be a positive multiple of num_kv_heads ({num_kv_heads})")
    total_heads = num_heads if total_heads is None else total_heads
    if total_kv_heads is None:  # the local counts when unsharded; else keep the local group size
        total_kv_heads = total_heads // (num_heads // num_kv_heads)
    if total_kv_heads < 1 or total_heads % total_kv_heads:
        raise ValueError(f"total_heads ({total_heads}) must be a positive multiple of total_kv_heads ({total_kv_heads})")
    if head_offset < 0 or head_offset + num_heads > total_heads:
        raise ValueError(f"head_offset ({head_offset}) + num_heads ({num_heads}) must lie within total_heads "
                         f"({total_heads}); valid head_offset: 0..{total_heads - num_heads}")
    global_q = range(head_offset, head_offset + num_heads)
    if per_kv_head:
        group = total_heads // total_kv_heads
        return HeadMap(tuple(q // group for q in global_q), total_kv_heads)
    return HeadMap(tuple(global_q), total_heads)


def query_block_range(q_len: int, kv_len: int, block_size: int) -> tuple[int, int]:
    """Absolute query blocks ``[first, last]`` holding the last ``q_len`` of ``kv_len`` positions."""
    if q_len < 1 or kv_len < q_len:
        raise ValueError(f"need 1 <= q_len <= kv_len, got q_len={q_len}, kv_len={kv_len}")
    return (kv_len - q_len) // block_size, (kv_len - 1) // block_size


class Layout:
    """Common interface of sparsity layouts (block granularity, causal)."""

    block_size: int

    def head_patterns(self, heads: HeadMap, device=None) -> "PatternSet":  # pragma: no cover - interface
        raise NotImplementedError

    def resolve(self, num_heads, num_kv_heads=None, head_offset=0, total_heads=None, total_kv_heads=None) -> HeadMap:
        return resolve_heads(num_heads, num_kv_heads, head_offset, total_heads, total_kv_heads,
                             getattr(self, "per_kv_head", False))

    def block_mask(self, num_heads: int, q_len: int, kv_len: Optional[int] = None, *, num_kv_heads=None,
                   head_offset: int = 0, total_heads=None, total_kv_heads=None, device=None) -> torch.Tensor:
        """Bool ``[num_heads, NQ, ceil(kv_len / block_size)]``: which key blocks each local query head's
        query blocks keep. Rows are the absolute query blocks ``(kv_len-q_len)//B .. (kv_len-1)//B``.

        Raises ValueError for inconsistent head counts or lengths."""
        kv_len = q_len if kv_len is None else kv_len
        heads = self.resolve(num_heads, num_kv_heads, head_offset, total_heads, total_kv_heads)
        first, last = query_block_range(q_len, kv_len, self.block_size)
        return self.head_patterns(heads, device).dense(first, last, math.ceil(kv_len / self.block_size))

    @property
    def is_dense(self) -> bool:
        """Every head keeps every causal block (dense causal attention)."""
        return False

    def is_kv_cache_efficient(self) -> bool:
        """Every key block is attended by a contiguous run of query blocks starting at it."""
        raise NotImplementedError


def _check_int(name: str, value, minimum: int, valid: str):
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"S2Layout.{name}={value!r} is invalid; valid: {valid}")


@dataclass(frozen=True)
class S2Layout(Layout):
    """The S2 local + vertical-stride layout (S2_PATTERN.md).

    ``block_size`` tokens per block (16, 32, 64, 128); ``local_blocks`` >= 1 counts the diagonal block;
    ``vert_stride`` >= 1 (1 is dense causal); ``head_sliding`` makes heads heterogeneous; ``sliding_offset``
    shifts every head's stripes; the last ``num_dense_heads`` pattern heads are dense; ``per_kv_head`` makes
    all query heads of one kv group share a pattern.
    """

    block_size: int
    local_blocks: int
    vert_stride: int
    head_sliding: bool = True
    sliding_offset: int = 1
    num_dense_heads: int = 0
    per_kv_head: bool = False

    def __post_init__(self):
        if self.block_size not in BLOCK_SIZES:
            raise ValueError(f"S2Layout.block_size={self.block_size!r} is invalid; valid: one of {BLOCK_SIZES}")
        _check_int("local_blocks", self.local_blocks, 1, "an integer >= 1")
        _check_int("vert_stride", self.vert_stride, 1, "an integer >= 1")
        _check_int("sliding_offset", self.sliding_offset, 0, "an integer >= 0")
        _check_int("num_dense_heads", self.num_dense_heads, 0, "an integer >= 0")
        for name in ("head_sliding", "per_kv_head"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"S2Layout.{name}={getattr(self, name)!r} is invalid; valid: true or false")

    @property
    def name(self) -> str:
        return f"L{self.local_blocks}V{self.vert_stride}B{self.block_size}"

    @property
    def is_dense(self) -> bool:
        return self.vert_stride == 1

    def step(self, num_pattern_heads: int) -> int:
        return max(1, self.vert_stride // num_pattern_heads) if self.head_sliding else 0

    def head_patterns(self, heads: HeadMap, device=None) -> "PatternSet":
        if self.num_dense_heads > heads.num_pattern_heads:
            raise ValueError(f"S2Layout.num_dense_heads={self.num_dense_heads} exceeds the number of pattern heads "
                             f"({heads.num_pattern_heads}); valid: 0..{heads.num_pattern_heads}")
        step = self.step(heads.num_pattern_heads)
        dense_from = heads.num_pattern_heads - self.num_dense_heads
        # A pattern head is fully described by (residue of its stripes, dense): heads sharing both share a pattern.
        keys = [stripe_residue(g, step, self.sliding_offset, self.vert_stride) if g < dense_from else -1
                for g in heads.pattern_heads]
        uniq = sorted(set(keys))
        return StridePatterns(self, residues=tuple(uniq), head_to_pattern=tuple(uniq.index(k) for k in keys),
                              device=device)

    def is_kv_cache_efficient(self) -> bool:
        return True


@dataclass(frozen=True, eq=False)
class BlockMaskLayout(Layout):
    """An arbitrary causal per-head layout from a bool mask ``[H or 1, NBq, NBk]`` (True = keep).

    Head h of the mask is pattern head h (global query head, or global kv head with ``per_kv_head``);
    a single-head mask is shared by all heads. Entries above the diagonal are ignored (attention is causal).
    Lengths must fit inside the mask: ``ceil(kv_len / block_size) <= NBq, NBk``.
    """

    mask: torch.Tensor
    block_size: int
    per_kv_head: bool = False
    _key: tuple = field(init=False, repr=False)

    def __post_init__(self):
        if self.block_size not in BLOCK_SIZES:
            raise ValueError(f"BlockMaskLayout.block_size={self.block_size!r} is invalid; valid: one of {BLOCK_SIZES}")
        m = self.mask
        if not isinstance(m, torch.Tensor) or m.dtype != torch.bool or m.dim() != 3:
            raise ValueError("BlockMaskLayout.mask must be a bool tensor [H or 1, NBq, NBk], got "
                             f"{getattr(m, 'dtype', type(m))} with shape {tuple(getattr(m, 'shape', ()))}")
        nb = min(m.shape[1], m.shape[2])
        causal = torch.tril(torch.ones(nb, nb, dtype=torch.bool, device=m.device))
        m = m[:, :nb, :nb].detach() & causal
        object.__setattr__(self, "mask", m.cpu().contiguous())
        object.__setattr__(self, "_key", (self.block_size, self.per_kv_head, tuple(m.shape),
                                          hash(m.numpy().tobytes())))

    def __hash__(self):
        return hash(self._key)

    def __eq__(self, other):
        return isinstance(other, BlockMaskLayout) and self._key == other._key and torch.equal(self.mask, other.mask)

    @property
    def name(self) -> str:
        return f"custom{tuple(self.mask.shape)}B{self.block_size}"

    def head_patterns(self, heads: HeadMap, device=None) -> "PatternSet":
        h = self.mask.shape[0]
        if h != 1 and max(heads.pattern_heads) >= h:
            raise ValueError(f"BlockMaskLayout has {h} pattern heads but pattern head {max(heads.pattern_heads)} "
                             f"was asked for (total pattern heads {heads.num_pattern_heads}); give a mask with "
                             f"1 or {heads.num_pattern_heads} heads")
        idx = [0 if h == 1 else g for g in heads.pattern_heads]
        uniq = sorted(set(idx))
        return MaskPatterns(self, masks=self.mask[uniq], head_to_pattern=tuple(uniq.index(g) for g in idx),
                            device=device)

    def is_kv_cache_efficient(self) -> bool:
        m = self.mask
        nb = m.shape[1]
        i = torch.arange(nb)[:, None]
        j = torch.arange(nb)[None, :]
        # Column j must be kept from row j down to its last kept row, with no gap.
        last = torch.where(m, i.expand_as(m[0]), torch.full_like(i.expand_as(m[0]), -1)).amax(dim=1, keepdim=True)
        want = (i >= j) & (i <= last)
        return bool(torch.equal(m, want))


class PatternSet:
    """The distinct patterns of a rank's local heads plus a head -> pattern map (heads often share one)."""

    layout: Layout
    head_to_pattern: tuple

    @property
    def num_patterns(self) -> int:
        raise NotImplementedError

    def pattern_mask(self, first_row: int, last_row: int, num_cols: int) -> torch.Tensor:
        """Bool ``[P, last_row-first_row+1, num_cols]`` of the distinct patterns."""
        raise NotImplementedError

    def dense(self, first_row: int, last_row: int, num_cols: int) -> torch.Tensor:
        idx = torch.tensor(self.head_to_pattern, device=self.device)
        return self.pattern_mask(first_row, last_row, num_cols)[idx]


@dataclass(frozen=True)
class StridePatterns(PatternSet):
    layout: S2Layout
    residues: tuple  # per pattern: stripe residue r (key block j is a stripe iff j % V == r), or -1 for dense
    head_to_pattern: tuple
    device: object = None

    @property
    def num_patterns(self) -> int:
        return len(self.residues)

    def pattern_mask(self, first_row, last_row, num_cols):
        lay = self.layout
        r = torch.tensor(self.residues, device=self.device)[:, None, None]
        i = torch.arange(first_row, last_row + 1, device=self.device)[None, :, None]
        j = torch.arange(num_cols, device=self.device)[None, None, :]
        # residue r means (j + g*step + offset) % V == 0  <=>  j % V == r: same formula with g*step+offset = -r.
        return s2_keep(0, i, j, local_blocks=lay.local_blocks, vert_stride=lay.vert_stride, step=0,
                       sliding_offset=-r, dense=r < 0)


@dataclass(frozen=True, eq=False)
class MaskPatterns(PatternSet):
    layout: BlockMaskLayout
    masks: torch.Tensor
    head_to_pattern: tuple
    device: object = None

    @property
    def num_patterns(self) -> int:
        return self.masks.shape[0]

    def pattern_mask(self, first_row, last_row, num_cols):
        nb = self.masks.shape[1]
        if last_row >= nb or num_cols > nb:
            raise ValueError(f"BlockMaskLayout covers {nb} blocks ({nb * self.layout.block_size} tokens) but "
                             f"{max(last_row + 1, num_cols)} blocks were asked for; give a larger mask")
        return self.masks[:, first_row:last_row + 1, :num_cols].to(self.device)
