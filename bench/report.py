"""Shared output helpers of the benchmarks: the markdown table file and an optional matplotlib."""
from __future__ import annotations


def card_tag(card: str) -> str:
    """The GPU's name as a file-name part: ``NVIDIA H100 80GB HBM3`` -> ``H100_80GB_HBM3``."""
    return card.replace("NVIDIA ", "").replace(" ", "_")


def write_markdown(path: str, lines, echo: bool = True) -> None:
    """Write ``lines`` as a markdown file and (``echo``) print them."""
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    if echo:
        print("\n".join(lines))


def pyplot():
    """matplotlib.pyplot on the Agg backend, or None (with a note) where matplotlib is not installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(matplotlib not installed: no plot)")
        return None
    return plt
