"""Layer schedule: which layout each transformer layer uses, from a plain dict (what the Hydra configs feed).

Config form (all keys optional except ``default``)::

    default: {block_size: 64, local_blocks: 16, vert_stride: 16, ...}   # or the string "dense"
    dense_every_n_layers: 2        # 0-based layer idx is dense iff (idx + 1) % n == 0 (Phi-3-small); 0 = never
    layers: {5: dense, 7: {vert_stride: 8}}   # per-layer overrides (0-based idx): "dense", or fields merged
                                              # onto the default layout

Layer indices here are 0-based; Megatron's ``layer_number`` is 1-based and global (use :meth:`for_layer_number`).
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Mapping

from .layout import Layout, S2Layout

DENSE = "dense"
_FIELDS = tuple(f.name for f in fields(S2Layout))


def dense_layout(block_size: int = 64) -> S2Layout:
    """Dense causal attention as a layout (vert_stride 1): dense layers run through the same kernels."""
    return S2Layout(block_size=block_size, local_blocks=1, vert_stride=1)


def layout_from_dict(spec: Any, base: S2Layout | None = None, where: str = "layout") -> S2Layout:
    """An S2Layout from ``"dense"`` or a dict of S2Layout fields (missing fields taken from ``base``)."""
    if isinstance(spec, S2Layout):
        return spec
    block_size = base.block_size if base is not None else 64
    if isinstance(spec, str):
        if spec.lower() != DENSE:
            raise ValueError(f"{where}={spec!r} is invalid; valid: 'dense' or a mapping of {list(_FIELDS)}")
        return dense_layout(block_size)
    if not isinstance(spec, Mapping):
        raise ValueError(f"{where}={spec!r} is invalid; valid: 'dense' or a mapping of {list(_FIELDS)}")
    unknown = sorted(set(map(str, spec)) - set(_FIELDS))
    if unknown:
        raise ValueError(f"{where} has unknown field(s) {unknown}; valid fields: {list(_FIELDS)}")
    merged = {f: getattr(base, f) for f in _FIELDS} if base is not None else {}
    merged.update({str(key): val for key, val in spec.items()})
    missing = [f for f in ("block_size", "local_blocks", "vert_stride") if f not in merged]
    if missing:
        raise ValueError(f"{where} is missing required field(s) {missing}")
    try:
        return S2Layout(**merged)
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from None


@dataclass(frozen=True)
class LayerSchedule:
    """Layout of each of ``num_layers`` layers (0-based idx)."""

    num_layers: int
    layouts: tuple

    @classmethod
    def from_config(cls, cfg: Mapping, num_layers: int) -> "LayerSchedule":
        """Build from the sparsity config dict (see module docstring). Raises ValueError naming bad entries."""
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        if "default" not in cfg:
            raise ValueError("sparsity config needs a 'default' layout ('dense' or a mapping of S2Layout fields)")
        known = {"default", "dense_every_n_layers", "layers", "name", "description"}
        unknown = sorted(set(map(str, cfg)) - known)
        if unknown:
            raise ValueError(f"sparsity config has unknown key(s) {unknown}; valid: {sorted(known)}")
        default = layout_from_dict(cfg["default"], where="sparsity.default")
        every = cfg.get("dense_every_n_layers", 0) or 0
        if isinstance(every, bool) or not isinstance(every, int) or every < 0:
            raise ValueError(f"sparsity.dense_every_n_layers={every!r} is invalid; valid: an integer >= 0 (0 = never)")
        layouts = [dense_layout(default.block_size) if every and (i + 1) % every == 0 else default
                   for i in range(num_layers)]
        for key, spec in dict(cfg.get("layers") or {}).items():
            try:
                idx = int(key)
            except (TypeError, ValueError):
                raise ValueError(f"sparsity.layers key {key!r} is not a layer index; valid: 0..{num_layers - 1}") from None
            if not 0 <= idx < num_layers:
                raise ValueError(f"sparsity.layers.{key} is out of range; valid layer indices: 0..{num_layers - 1}")
            layouts[idx] = layout_from_dict(spec, base=default, where=f"sparsity.layers.{key}")
        return cls(num_layers, tuple(layouts))

    def layout(self, layer_idx: int) -> Layout:
        """Layout of 0-based layer ``layer_idx``."""
        if not 0 <= layer_idx < self.num_layers:
            raise ValueError(f"layer index {layer_idx} out of range 0..{self.num_layers - 1}")
        return self.layouts[layer_idx]

    def for_layer_number(self, layer_number: int) -> Layout:
        """Layout of Megatron's global, 1-based ``layer_number``."""
        return self.layout(layer_number - 1)

    def describe(self) -> str:
        """One line per run of equal layouts, e.g. ``layers 0-22 even: L16V8B64``."""
        parts, start = [], 0
        for i in range(1, self.num_layers + 1):
            if i == self.num_layers or self.layouts[i] != self.layouts[start]:
                name = "dense" if self.layouts[start].is_dense else self.layouts[start].name
                parts.append(f"{start}-{i - 1}: {name}" if i - 1 > start else f"{start}: {name}")
                start = i
        return ", ".join(parts)
