"""Passkey retrieval over a (context length x needle depth) grid, scored by likelihood.

For each prompt (a 5-digit passkey hidden at a depth in filler text, see :mod:`s2megatron.data.passkey`), the
model's log-likelihood of the true answer is compared with that of ``num_distractors`` random other passkeys in
the same prompt. The prompt counts as retrieved when the true passkey ranks first (ties count as failures);
chance accuracy is ``1 / (num_distractors + 1)``. Cell accuracy and mean rank go to a markdown table, a JSON file
and (with matplotlib installed) a heatmap PNG.

Run on a checkpoint (its own ``config.yaml`` rebuilds the model; overrides as ``key=value``)::

    python -m s2megatron.eval.passkey ckpt_dir=outputs/default/ckpt/iter_0000300 \
        [out_dir=...] [eval.passkey.depths=[0,0.5,1]] [eval.passkey.samples_per_cell=4] [parallel.tp=2 ...]

``ckpt_dir`` may also be a run's ``train.out_dir`` (its latest checkpoint is used). Under torchrun the model may
be split with ``parallel.tp``/``parallel.pp`` independently of how it was trained (checkpoints reshard).
"""
from __future__ import annotations

import json
import logging
import os
import random
import sys
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

import torch

log = logging.getLogger("s2megatron")

ScoreFn = Callable[[Dict[str, torch.Tensor]], torch.Tensor]


@dataclass
class PasskeyCell:
    context_tokens: int
    depth: float
    num_samples: int
    num_correct: int
    mean_rank: float                      # 1 = always first
    ranks: List[int] = field(default_factory=list)

    @property
    def accuracy(self) -> float:
        return self.num_correct / self.num_samples


@dataclass
class PasskeyResult:
    cells: List[PasskeyCell]
    num_distractors: int

    @property
    def accuracy(self) -> float:
        total = sum(c.num_samples for c in self.cells)
        return sum(c.num_correct for c in self.cells) / total

    @property
    def chance(self) -> float:
        return 1.0 / (self.num_distractors + 1)

    def lengths(self) -> List[int]:
        return sorted({c.context_tokens for c in self.cells})

    def depths(self) -> List[float]:
        return sorted({c.depth for c in self.cells})

    def cell(self, length: int, depth: float) -> PasskeyCell:
        return next(c for c in self.cells if c.context_tokens == length and c.depth == depth)

    def to_json(self) -> Dict:
        return {"accuracy": self.accuracy, "chance": self.chance, "num_distractors": self.num_distractors,
                "context_lengths": self.lengths(), "depths": self.depths(),
                "cells": [dict(asdict(c), accuracy=c.accuracy) for c in self.cells]}

    def to_markdown(self, title: str = "Passkey retrieval") -> str:
        depths = self.depths()
        lines = [f"## {title}", "",
                 f"Accuracy (true passkey ranked first among {self.num_distractors + 1} candidates; chance "
                 f"{self.chance:.0%}). Overall: **{self.accuracy:.1%}**.", "",
                 "| context tokens \\ depth | " + " | ".join(f"{d:g}" for d in depths) + " | mean |",
                 "|---|" + "---|" * (len(depths) + 1)]
        for length in self.lengths():
            row = [self.cell(length, d) for d in depths]
            mean = sum(c.num_correct for c in row) / sum(c.num_samples for c in row)
            lines.append(f"| {length} | " + " | ".join(f"{c.accuracy:.0%} (r{c.mean_rank:.1f})" for c in row)
                         + f" | {mean:.0%} |")
        lines += ["", "Cells: accuracy (mean rank of the true passkey, 1 = best)."]
        return "\n".join(lines) + "\n"


def check_context_lengths(tokenizer, context_lengths: Sequence[int]) -> None:
    """Raise ValueError (naming ``eval.passkey.context_lengths``) if the shortest length cannot hold a prompt with
    this tokenizer; run before training so a bad grid fails early."""
    from s2megatron.data.passkey import make_passkey_sample

    try:
        make_passkey_sample(tokenizer, int(min(context_lengths)), 0.0, passkey=99999)
    except ValueError as err:
        raise ValueError(f"eval.passkey.context_lengths={list(context_lengths)} is invalid: {err}; raise the lengths "
                         "(and train.seq_len) or set eval.passkey.enabled=false") from None


def build_candidates(sample, distractor_keys: Sequence[int], tokenizer, *, pad_id: int,
                     pad_to_multiple: int = 1, max_len: Optional[int] = None) -> Dict[str, torch.Tensor]:
    """The true answer and each distractor appended to the prompt, as one batch.

    Row 0 is the true passkey. ``tokens``/``labels``/``loss_mask``/``position_ids`` are ``[1 + D, L]``: inputs
    are the sequence without its last token, labels the sequence shifted by one, and the mask selects the answer
    tokens; L is padded to a multiple of ``pad_to_multiple`` (pads sit after the answer, so causal attention
    never sees them). Raises ValueError if a sequence exceeds ``max_len``."""
    from s2megatron.data.passkey import ANSWER

    answers = [list(sample.answer_ids)] + [tokenizer.tokenize(ANSWER.format(key=k)) for k in distractor_keys]
    prompt = list(sample.prompt_ids)
    length = max(len(prompt) + len(a) - 1 for a in answers)
    length = -(-length // pad_to_multiple) * pad_to_multiple
    if max_len is not None and length > max_len:
        raise ValueError(f"passkey sequence of {length} tokens exceeds the model's {max_len}; use shorter "
                         "eval.passkey.context_lengths")
    rows = len(answers)
    tokens = torch.full((rows, length), pad_id, dtype=torch.long)
    labels = torch.full((rows, length), pad_id, dtype=torch.long)
    mask = torch.zeros((rows, length), dtype=torch.float32)
    for r, answer in enumerate(answers):
        seq = prompt + answer
        tokens[r, :len(seq) - 1] = torch.tensor(seq[:-1])
        labels[r, :len(seq) - 1] = torch.tensor(seq[1:])
        mask[r, len(prompt) - 1:len(seq) - 1] = 1.0
    positions = torch.arange(length).expand(rows, length).contiguous()
    return {"tokens": tokens, "labels": labels, "loss_mask": mask, "position_ids": positions}


def evaluate_passkey(score_fn: ScoreFn, tokenizer, *, context_lengths: Sequence[int], depths: Sequence[float],
                     samples_per_cell: int = 2, num_distractors: int = 9, seed: int = 1234, pad_to_multiple: int = 1,
                     max_len: Optional[int] = None) -> PasskeyResult:
    """Score the grid. ``score_fn(batch) -> [B]`` log-likelihoods of each row's masked tokens (see
    :func:`s2megatron.training.step.score_sequences`). Deterministic in ``seed``."""
    from s2megatron.data.passkey import PASSKEY_MAX, PASSKEY_MIN, make_passkey_sample

    rng = random.Random(seed)
    cells = []
    for length in context_lengths:
        for depth in depths:
            ranks = []
            for _ in range(samples_per_cell):
                sample = make_passkey_sample(tokenizer, int(length), float(depth), rng=rng)
                keys = set()
                while len(keys) < num_distractors:
                    k = rng.randint(PASSKEY_MIN, PASSKEY_MAX)
                    if k != sample.passkey:
                        keys.add(k)
                batch = build_candidates(sample, sorted(keys), tokenizer, pad_id=tokenizer.pad,
                                         pad_to_multiple=pad_to_multiple, max_len=max_len)
                ll = score_fn(batch)
                ranks.append(1 + int((ll[1:] >= ll[0]).sum()))
            cells.append(PasskeyCell(int(length), float(depth), len(ranks), sum(r == 1 for r in ranks),
                                     sum(ranks) / len(ranks), ranks))
    return PasskeyResult(cells, num_distractors)


def write_report(result: PasskeyResult, out_dir: str, *, title: str = "Passkey retrieval") -> Dict[str, str]:
    """Write ``passkey.md``, ``passkey.json`` and ``passkey.png`` (heatmap; needs matplotlib) to ``out_dir``.
    Returns the paths written by kind."""
    os.makedirs(out_dir, exist_ok=True)
    paths = {"markdown": os.path.join(out_dir, "passkey.md"), "json": os.path.join(out_dir, "passkey.json")}
    with open(paths["markdown"], "w") as f:
        f.write(result.to_markdown(title))
    with open(paths["json"], "w") as f:
        json.dump(result.to_json(), f, indent=1)
    png = os.path.join(out_dir, "passkey.png")
    if _write_heatmap(result, png, title):
        paths["heatmap"] = png
    else:
        log.info("passkey heatmap skipped: it needs matplotlib (pip install matplotlib); the table is in "
                 f"{paths['markdown']}")
    return paths


def _write_heatmap(result: PasskeyResult, path: str, title: str) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    lengths, depths = result.lengths(), result.depths()
    acc = [[result.cell(n, d).accuracy for n in lengths] for d in depths]
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(lengths), 1.0 + 0.6 * len(depths)))
    im = ax.imshow(acc, vmin=0.0, vmax=1.0, cmap="RdYlGn", aspect="auto", origin="upper")
    ax.set_xticks(range(len(lengths)), [str(n) for n in lengths])
    ax.set_yticks(range(len(depths)), [f"{d:g}" for d in depths])
    ax.set_xlabel("context tokens")
    ax.set_ylabel("needle depth")
    ax.set_title(f"{title} (overall {result.accuracy:.0%}, chance {result.chance:.0%})", fontsize=9)
    for i, row in enumerate(acc):
        for j, a in enumerate(row):
            ax.text(j, i, f"{a:.0%}", ha="center", va="center", fontsize=8)
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


# ------------------------------------------------------------------------------------------------ CLI
def main(argv: Optional[Sequence[str]] = None) -> Dict:
    """``python -m s2megatron.eval.passkey ckpt_dir=... [out_dir=...] [key=value ...]``; returns the JSON."""
    from omegaconf import OmegaConf

    from s2megatron.training.trainer import load_for_eval, quiet_import_warnings

    quiet_import_warnings()
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or any(a in ("-h", "--help") for a in args):
        print(__doc__)
        return {}
    overrides = OmegaConf.from_dotlist(args)
    ckpt_dir = overrides.pop("ckpt_dir", None)
    out_dir = overrides.pop("out_dir", None)
    if not ckpt_dir:
        raise SystemExit("ckpt_dir=... is required (a checkpoint directory or a run's train.out_dir)")
    with load_for_eval(str(ckpt_dir), overrides) as session:
        result = session.passkey()
        paths = {}
        if session.is_main:
            out_dir = str(out_dir or os.path.join(session.checkpoint, "passkey"))
            paths = write_report(result, out_dir, title=f"Passkey retrieval, {os.path.basename(session.checkpoint)}")
            print(result.to_markdown(f"Passkey retrieval, {session.checkpoint}"))
            print("wrote " + ", ".join(paths.values()))
    return dict(result.to_json(), paths=paths)


if __name__ == "__main__":
    main()
