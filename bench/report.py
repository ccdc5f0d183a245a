"""Shared output helpers of the benchmarks: the run's environment, the raw JSON and markdown table files, and an
optional matplotlib."""
from __future__ import annotations

import json
import os


def card_tag(card: str) -> str:
    """The GPU's name as a file-name part: ``NVIDIA H100 80GB HBM3`` -> ``H100_80GB_HBM3``."""
    return card.replace("NVIDIA ", "").replace(" ", "_")


def run_env() -> dict:
    """The card, torch and triton of this run, printed as the log's first line (a JSON object)."""
    import torch
    import triton
    env = dict(card=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__)
    print(json.dumps(env), flush=True)
    return env


def write_rows(out_dir: str, name: str, env: dict, rows) -> str:
    """Write ``{"env": env, "rows": rows}`` to ``out_dir/<name>_<card>.json`` (making the folder); the path without
    its extension, for the markdown table beside it."""
    os.makedirs(out_dir, exist_ok=True)
    base = os.path.join(out_dir, f"{name}_{card_tag(env['card'])}")
    with open(base + ".json", "w") as f:
        json.dump(dict(env=env, rows=rows), f, indent=1)
    return base


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
