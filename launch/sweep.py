#!/usr/bin/env python
"""Sparsity sweeps: expand Hydra sweep overrides into points and run each point as its own torchrun job.

    python launch/sweep.py [--dry-run] [--slurm] [--sweep-dir DIR] [--sbatch-arg ARG ...] OVERRIDE ...

Example: ``python launch/sweep.py --dry-run sparsity.default.vert_stride=8,16,32 model=125m``.

Overrides are parsed with Hydra's own override grammar, so ``a=1,2``, ``range()``, ``choice()`` and
``sort()`` expand exactly as under ``python train.py --multirun``, in the same order (the cartesian
product, first key slowest). Hydra's in-process multirun is not used because torchrun/NCCL process
groups need a fresh set of processes per run. Each point gets its own ``train.out_dir`` below the
sweep directory. Locally the points run one after another through ``launch/run_single.sh``; with
``--slurm`` each point is one ``sbatch launch/slurm.sbatch`` job.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import os
import re
import shlex
import subprocess
import sys
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException

LAUNCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = LAUNCH_DIR.parent
OUT_DIR_KEY = "train.out_dir"
# Characters that need no quoting in a Hydra override value or a shell word.
_SAFE_PATH = re.compile(r"^[A-Za-z0-9._/+@-]+$")
_UNSAFE_NAME_CHARS = re.compile(r"[^A-Za-z0-9._-]+")
_MAX_NAME_CHARS = 120


@dataclass(frozen=True)
class SweepPoint:
    """One run of a sweep.

    overrides: every override of the run, in command-line order (``key=value`` strings).
    swept: the ``key=value`` of the swept keys only, which name the run's directory.
    """

    overrides: tuple[str, ...]
    swept: tuple[str, ...]


def expand_sweep(overrides: Sequence[str]) -> list[SweepPoint]:
    """Expand Hydra overrides (e.g. ``["a=1,2", "b=x,y"]``) into sweep points.

    The order is Hydra's BasicSweeper order: the cartesian product over keys in order of first
    appearance, the first key varying slowest; a repeated key keeps its first position and its last
    value. Non-sweep overrides are passed on verbatim.

    Raises ValueError for an override Hydra cannot parse, for sweeps that need a config (``glob()``)
    or are continuous (``interval()``), and for ``train.out_dir``, which the sweep sets per point.
    """
    parser = OverridesParser.create()
    choices: OrderedDict[str, list[str]] = OrderedDict()
    swept_keys: set[str] = set()
    for text in overrides:
        try:
            (override,) = parser.parse_overrides([text])
        except HydraException as exc:
            raise ValueError(
                f"invalid Hydra override {text!r}: {_one_line(exc)}; expected key=value, key=v1,v2, "
                "key=range(start,stop[,step]) or key=choice(v1,v2)"
            ) from None
        key = override.get_key_element()
        if override.key_or_group == OUT_DIR_KEY:
            raise ValueError(
                f"{text!r}: the sweep sets {OUT_DIR_KEY} for each point; use --sweep-dir instead"
            )
        if override.is_sweep_override():
            if not override.is_discrete_sweep():
                raise ValueError(
                    f"{text!r} is an {_sweep_kind(override)}, which has no finite list of points; "
                    "use a list (a=1,2), range() or choice()"
                )
            try:
                values = list(override.sweep_string_iterator())
            except HydraException as exc:
                raise ValueError(
                    f"{text!r} cannot be expanded without the training config ({_one_line(exc)}); "
                    "list the values instead (a=1,2), or use range() or choice()"
                ) from None
            choices[key] = [f"{key}={value}" for value in values]
            swept_keys.add(key)
        else:
            choices[key] = [text.strip()]
            swept_keys.discard(key)
    keys = list(choices)
    points = []
    for combination in itertools.product(*(choices[key] for key in keys)):
        swept = tuple(item for key, item in zip(keys, combination) if key in swept_keys)
        points.append(SweepPoint(overrides=tuple(combination), swept=swept))
    return points


def _one_line(exc: Exception) -> str:
    return "; ".join(line.strip() for line in str(exc).splitlines() if line.strip())


def _sweep_kind(override) -> str:
    return override.value_type.name.lower().replace("_", " ")


def point_dir_name(index: int, point: SweepPoint) -> str:
    """Filesystem-safe directory name for a point: ``003_vert_stride-16_model-125m``.

    The index keeps names unique; each swept ``key=value`` adds ``<last key component>-<value>``
    with characters outside ``[A-Za-z0-9._-]`` replaced by ``_``, cut to 120 characters.
    """
    parts = [f"{index:03d}"]
    for item in point.swept:
        key, _, value = item.partition("=")
        name = key.lstrip("+~").rsplit(".", 1)[-1]
        parts.append(_UNSAFE_NAME_CHARS.sub("_", f"{name}-{value}").strip("_") or "_")
    return "_".join(parts)[:_MAX_NAME_CHARS]


def build_commands(
    points: Sequence[SweepPoint],
    sweep_dir: Path,
    slurm: bool = False,
    sbatch_args: Sequence[str] = (),
) -> list[tuple[Path, list[str]]]:
    """The (out_dir, argv) of each point: ``bash launch/run_single.sh ...`` locally, or
    ``sbatch ... launch/slurm.sbatch ...`` with ``slurm``. ``sweep_dir`` must be absolute.

    Raises ValueError if ``sweep_dir`` is relative or holds characters outside ``[A-Za-z0-9._/+@-]``
    (they would need quoting inside a Hydra override).
    """
    if not sweep_dir.is_absolute() or not _SAFE_PATH.match(str(sweep_dir)):
        raise ValueError(
            f"sweep dir {str(sweep_dir)!r} must be an absolute path made of [A-Za-z0-9._/+@-]"
        )
    commands = []
    for index, point in enumerate(points):
        out_dir = sweep_dir / point_dir_name(index, point)
        train_args = [*point.overrides, f"{OUT_DIR_KEY}={out_dir}"]
        if slurm:
            argv = [
                "sbatch",
                f"--job-name=s2-sweep-{index:03d}",
                f"--chdir={REPO_ROOT}",
                f"--output={out_dir}/slurm-%j.out",
                *sbatch_args,
                str(LAUNCH_DIR / "slurm.sbatch"),
                *train_args,
            ]
        else:
            argv = ["bash", str(LAUNCH_DIR / "run_single.sh"), *train_args]
        commands.append((out_dir, argv))
    return commands


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="launch/sweep.py",
        description="Run a Hydra sweep of train.py, one torchrun job per point.",
        epilog="example: python launch/sweep.py --dry-run sparsity.default.vert_stride=8,16,32 model=125m",
    )
    parser.add_argument("overrides", nargs="*", metavar="OVERRIDE", help="Hydra overrides; a=1,2 sweeps")
    parser.add_argument("--dry-run", action="store_true", help="print one command per point and exit")
    parser.add_argument("--slurm", action="store_true", help="submit one sbatch job per point")
    parser.add_argument(
        "--sweep-dir",
        type=Path,
        help="parent of the points' train.out_dir (default: outputs/sweeps/<date>_<time>)",
    )
    parser.add_argument(
        "--sbatch-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="extra sbatch option, repeatable, e.g. --sbatch-arg=--nodes=2",
    )
    parser.add_argument(
        "--keep-going", action="store_true", help="locally, run the remaining points after a failure"
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(argv)
    sweep_dir = args.sweep_dir or Path(
        "outputs", "sweeps", datetime.datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    )
    try:
        points = expand_sweep(args.overrides)
        commands = build_commands(points, Path(os.path.abspath(sweep_dir)), args.slurm, args.sbatch_arg)
    except ValueError as exc:
        print(f"launch/sweep.py: error: {exc}", file=sys.stderr)
        return 2

    lines = [shlex.join(argv) for _, argv in commands]
    if args.dry_run:
        print("\n".join(lines))
        return 0

    sweep_dir = commands[0][0].parent
    sweep_dir.mkdir(parents=True, exist_ok=True)
    (sweep_dir / "commands.txt").write_text("\n".join(lines) + "\n")
    failed = 0
    for index, ((out_dir, argv), line) in enumerate(zip(commands, lines)):
        # sbatch needs the --output directory to exist before the job starts.
        out_dir.mkdir(parents=True, exist_ok=True)
        print(f"[sweep {index + 1}/{len(commands)}] {line}", file=sys.stderr, flush=True)
        returncode = subprocess.run(argv, check=False).returncode
        if returncode != 0:
            failed += 1
            print(f"[sweep] point {index} exited with {returncode}", file=sys.stderr)
            if args.slurm or not args.keep_going:
                return returncode
    if failed:
        print(f"[sweep] {failed} of {len(commands)} points failed", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
