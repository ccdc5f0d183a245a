"""Sparsity layouts: what S2 attention keeps, per head and per layer."""
from .analysis import CoverageWarning, Density, density, kv_cache_efficient
from .layout import BLOCK_SIZES, BlockMaskLayout, Layout, S2Layout, s2_keep, stripe_residue
from .metadata import BlockMetadata, build_metadata, get_metadata
from .schedule import LayerSchedule, dense_layout, layout_from_dict

__all__ = ["BLOCK_SIZES", "BlockMaskLayout", "BlockMetadata", "CoverageWarning", "Density", "LayerSchedule", "Layout",
           "S2Layout", "build_metadata", "dense_layout", "density", "get_metadata", "kv_cache_efficient",
           "layout_from_dict", "s2_keep", "stripe_residue"]
