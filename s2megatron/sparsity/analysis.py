"""Layout analysis: density, union coverage of the context across heads, KV-cache efficiency."""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Optional

from .layout import Layout, S2Layout
from .metadata import get_metadata


class CoverageWarning(UserWarning):
    """The heads of a layout together do not cover the whole causal context."""


@dataclass(frozen=True)
class Density:
    kept_blocks: int          # kept (query block, key block) pairs summed over heads
    causal_blocks: int        # causal pairs summed over heads
    union_complete: bool      # every causal block is kept by at least one head

    @property
    def fraction(self) -> float:
        """Kept fraction of the causal blocks (1.0 = dense causal)."""
        return self.kept_blocks / self.causal_blocks


def density(layout: Layout, num_heads: int, seq_len: int, *, num_kv_heads: Optional[int] = None,
            head_offset: int = 0, total_heads: Optional[int] = None, total_kv_heads: Optional[int] = None,
            warn: bool = True) -> Density:
    """Kept fraction of the causal blocks at ``seq_len`` and whether the heads' union covers the context.

    With ``warn`` a :class:`CoverageWarning` names the uncovered share (e.g. H < V with head sliding)."""
    meta = get_metadata(layout, num_heads, seq_len, num_kv_heads=num_kv_heads, head_offset=head_offset,
                        total_heads=total_heads, total_kv_heads=total_kv_heads)
    nb = math.ceil(seq_len / layout.block_size)
    causal = num_heads * nb * (nb + 1) // 2
    kept = meta.kept_blocks()
    # union over the patterns (every pattern in the metadata belongs to some local head)
    union = meta.row_dense().any(0)
    complete = bool(union.sum() == nb * (nb + 1) // 2)
    if warn and not complete:
        missing = 1 - int(union.sum()) / (nb * (nb + 1) // 2)
        hint = ""
        if isinstance(layout, S2Layout) and layout.head_sliding:
            heads_total = total_kv_heads if layout.per_kv_head else total_heads
            hint = (f" (pattern heads {heads_total or num_heads} < vert_stride {layout.vert_stride} covers only "
                    "that many stripe residues)") if (heads_total or num_heads) < layout.vert_stride else ""
        warnings.warn(f"layout {getattr(layout, 'name', layout)} leaves {missing:.1%} of the causal context at "
                      f"{seq_len} tokens unattended by every head{hint}", CoverageWarning, stacklevel=2)
    return Density(kept, causal, complete)


def kv_cache_efficient(layout: Layout) -> bool:
    """Whether each key block is attended by a contiguous run of query blocks starting at it (S2_PATTERN.md)."""
    return layout.is_kv_cache_efficient()
