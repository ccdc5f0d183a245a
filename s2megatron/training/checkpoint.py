"""Crash-safe, verifiable checkpoints on top of megatron-core's dist_checkpointing (``torch_dist`` format).

Layout of ``<out_dir>/ckpt/``::

    iter_0000200/              a complete checkpoint
        .metadata, __*_*.distcp, common.pt, metadata.json    model + optimizer (dist_checkpointing; reshardable
                                                             across tensor/pipeline splits)
        train_state.json       iteration, consumed samples, LR schedule, parallel layout at save time
        rank_state/rank_00000.json   per-rank RNG states
        manifest.json          size and sha256 of every other file; written last
    iter_0000300.tmp/          a save in progress (or one killed midway): never loaded, removed by the next save
    latest                     name of the newest complete checkpoint ("iter_0000300")

A save writes everything into ``iter_XXXXXXX.tmp``, fsyncs it, renames it to ``iter_XXXXXXX`` and only then
replaces ``latest`` atomically (temp file + ``os.replace``), so a crash or Ctrl-C at any point leaves the
previous checkpoint complete and ``latest``. Loading first checks each file against the manifest, so a
truncated or corrupted file is reported by name; and no file is ever unpickled beyond tensors and plain
containers (``torch.load`` is forced to ``weights_only=True`` while dist_checkpointing reads).

All functions that take no ``rank`` argument are collective: every rank calls them, in the same order.
"""
from __future__ import annotations

import base64
import contextlib
import json
import logging
import os
import re
import shutil
from typing import Dict, List, Optional, Tuple

import torch
import torch.distributed as dist

from ..fileio import file_sha256

log = logging.getLogger("s2megatron")

MANIFEST = "manifest.json"
TRAIN_STATE = "train_state.json"
RANK_STATE_DIR = "rank_state"
LATEST = "latest"
_NAME = re.compile(r"^iter_(\d{7,})$")


class CheckpointCorruptError(RuntimeError):
    """A checkpoint failed verification against its manifest (message names the file and the problem)."""


# ----------------------------------------------------------------------------------------------- helpers
def checkpoint_name(iteration: int) -> str:
    return f"iter_{iteration:07d}"


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def _barrier():
    if dist.is_initialized():
        dist.barrier()


def _all_gather(obj) -> list:
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _broadcast(obj):
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _fsync_dir(path: str):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json_atomic(path: str, obj) -> None:
    """Write JSON to ``path`` via a temp file, fsync, ``os.replace``: readers see the old or the new file."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _list_files(root: str) -> List[str]:
    files = []
    for dirpath, _, names in os.walk(root):
        for name in names:
            files.append(os.path.relpath(os.path.join(dirpath, name), root))
    return sorted(f for f in files if f != MANIFEST)


@contextlib.contextmanager
def weights_only_torch_load():
    """Force ``torch.load(..., weights_only=True)`` inside the block.

    dist_checkpointing reads ``common.pt`` with torch's default and ShardedObjects through torch DCP's planner
    with ``weights_only=False``; forcing True means a tampered file can hold only tensors and plain containers
    (an UnpicklingError otherwise), never code run at load time.
    """
    original = torch.load

    def safe_load(*args, **kwargs):
        kwargs["weights_only"] = True
        return original(*args, **kwargs)

    torch.load = safe_load
    try:
        yield
    finally:
        torch.load = original


# ----------------------------------------------------------------------------------------------- RNG state
def _tensor_b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.cpu().contiguous().numpy().tobytes()).decode()


def _b64_tensor(s: str) -> torch.Tensor:
    import numpy as np
    return torch.from_numpy(np.frombuffer(base64.b64decode(s), dtype=np.uint8).copy())


def capture_rng_state() -> Dict:
    """This process's RNG states (Python, NumPy, torch CPU/CUDA, Megatron's tracker) as JSON-able data."""
    import random

    import numpy as np
    np_state = np.random.get_state()
    state = {
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "torch_cpu": _tensor_b64(torch.get_rng_state()),
        "torch_cuda": _tensor_b64(torch.cuda.get_rng_state()) if torch.cuda.is_available() else None,
        "tracker": {},
    }
    try:
        from megatron.core import tensor_parallel
        for name, t in tensor_parallel.get_cuda_rng_tracker().get_states().items():
            if isinstance(t, torch.Tensor):
                state["tracker"][name] = _tensor_b64(t)
    except Exception:  # noqa: BLE001 - a tracker without states (CPU) has nothing to save
        pass
    return state


def restore_rng_state(state: Dict) -> None:
    """Inverse of :func:`capture_rng_state`."""
    import random

    import numpy as np
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(_b64_tensor(state["torch_cpu"]))
    if state.get("torch_cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state(_b64_tensor(state["torch_cuda"]))
    if state.get("tracker"):
        from megatron.core import tensor_parallel
        tracker = tensor_parallel.get_cuda_rng_tracker()
        current = tracker.get_states()
        device = next(iter(current.values())).device if current else "cpu"
        tracker.set_states({k: _b64_tensor(v).to(device) for k, v in state["tracker"].items()})


# ----------------------------------------------------------------------------------------------- manager
class CheckpointManager:
    """Saves, finds, verifies and loads the checkpoints under ``root`` (``<out_dir>/ckpt``).

    ``keep``: complete checkpoints kept (oldest deleted after each save). ``verify_sha256``: hash every file at
    load (sizes are always checked).
    """

    def __init__(self, root: str, *, keep: int = 2, verify_sha256: bool = True):
        self.root = os.path.abspath(root)
        self.keep = keep
        self.verify_sha256 = verify_sha256

    # ---- discovery (read-only, any rank)
    def complete(self) -> List[str]:
        """Names of the complete checkpoints, oldest first."""
        if not os.path.isdir(self.root):
            return []
        names = [n for n in os.listdir(self.root) if _NAME.match(n)
                 and os.path.isfile(os.path.join(self.root, n, MANIFEST))]
        return sorted(names, key=lambda n: int(_NAME.match(n).group(1)))

    def latest(self) -> Optional[str]:
        """The checkpoint ``latest`` points to; the newest complete one when the pointer is missing or stale."""
        pointer = os.path.join(self.root, LATEST)
        if os.path.isfile(pointer):
            with open(pointer) as f:
                name = f.read().strip()
            if _NAME.match(name) and os.path.isdir(os.path.join(self.root, name)):
                return name
            log.warning(f"checkpoint pointer {pointer} names {name!r}, which is not a checkpoint; "
                        "using the newest complete checkpoint instead")
        names = self.complete()
        return names[-1] if names else None

    def resolve(self, name_or_path: str) -> str:
        """A checkpoint directory from an absolute/relative path or a name inside ``root``."""
        for candidate in (name_or_path, os.path.join(self.root, name_or_path)):
            if os.path.isdir(candidate) and os.path.isfile(os.path.join(candidate, MANIFEST)):
                return os.path.abspath(candidate)
        raise FileNotFoundError(f"train.resume_from={name_or_path!r} is not a complete checkpoint (a directory with "
                                f"{MANIFEST}); complete checkpoints in {self.root}: {self.complete() or 'none'}")

    # ---- verification (collective)
    def verify(self, path: str) -> Optional[str]:
        """None if ``path`` matches its manifest, else the first problem found (names the file). Collective:
        the files are split over the ranks."""
        problem = None
        manifest_path = os.path.join(path, MANIFEST)
        try:
            with open(manifest_path) as f:
                manifest = json.load(f)
            files = manifest["files"]
            if not isinstance(files, dict) or not files:
                raise ValueError("no files listed")
        except (OSError, ValueError, KeyError, TypeError) as e:
            problem = f"{manifest_path}: unreadable manifest ({e})"
            files = {}
        names = sorted(files)
        mine = names[_rank()::_world()]
        for name in mine:
            if problem:
                break
            entry, fpath = files[name], os.path.join(path, name)
            if not (isinstance(entry, dict) and isinstance(entry.get("size"), int) and "sha256" in entry):
                problem = f"{manifest_path}: malformed entry for {name}"
            elif not os.path.isfile(fpath):
                problem = f"{fpath}: missing"
            elif os.path.getsize(fpath) != entry["size"]:
                problem = f"{fpath}: size {os.path.getsize(fpath)} bytes, manifest says {entry['size']} (truncated?)"
            elif self.verify_sha256 and file_sha256(fpath) != entry["sha256"]:
                problem = f"{fpath}: sha256 differs from the manifest (corrupted)"
        problems = [p for p in _all_gather(problem) if p]
        return problems[0] if problems else None

    def find_resume(self, resume_from: Optional[str] = None, fallback: bool = False) -> Optional[str]:
        """The checkpoint to resume from, verified; None when there is none (a fresh run). Collective.

        ``resume_from`` picks one explicitly. Otherwise ``latest``; if that is corrupt, the previous complete
        checkpoint is used when ``fallback`` is set, else :class:`CheckpointCorruptError` names both.
        """
        if resume_from:
            path = self.resolve(resume_from)
            problem = self.verify(path)
            if problem:
                raise CheckpointCorruptError(f"checkpoint {path} is corrupt ({problem})")
            return path
        name = self.latest()
        if name is None:
            return None
        path = os.path.join(self.root, name)
        problem = self.verify(path)
        if problem is None:
            return path
        previous = None
        for older in reversed([n for n in self.complete() if int(n[5:]) < int(name[5:])]):
            if self.verify(os.path.join(self.root, older)) is None:
                previous = os.path.join(self.root, older)
                break
        if previous and fallback:
            log.warning(f"checkpoint {path} is corrupt ({problem}); resuming from the previous complete "
                        f"checkpoint {previous} (train.resume_fallback=true)")
            return previous
        if previous:
            raise CheckpointCorruptError(
                f"checkpoint {path} is corrupt ({problem}); the previous complete checkpoint is {previous}: resume "
                f"from it with train.resume_from={previous} (or set train.resume_fallback=true)")
        raise CheckpointCorruptError(f"checkpoint {path} is corrupt ({problem}) and there is no previous complete "
                                     f"checkpoint in {self.root}; start afresh with another train.out_dir")

    # ---- save (collective)
    def save(self, iteration: int, sharded_state_dict: Dict, *, train_state: Dict, rank_state: Dict,
             extra_files: Optional[Dict[str, str]] = None, sharded_strategy=None) -> str:
        """Write checkpoint ``iteration`` (see the module docstring for the protocol); returns its path.

        ``train_state`` (JSON, rank 0's), ``rank_state`` (JSON, this rank's) and ``extra_files`` (name -> text,
        rank 0's; e.g. the resolved config) are stored beside the tensors and covered by the manifest."""
        from megatron.core import dist_checkpointing

        name = checkpoint_name(iteration)
        final = os.path.join(self.root, name)
        tmp = final + ".tmp"
        if _rank() == 0:
            os.makedirs(self.root, exist_ok=True)
            for stale in os.listdir(self.root):   # earlier saves killed midway
                if stale.endswith(".tmp") and os.path.isdir(os.path.join(self.root, stale)):
                    shutil.rmtree(os.path.join(self.root, stale), ignore_errors=True)
            os.makedirs(tmp)
        _barrier()
        dist_checkpointing.save(sharded_state_dict, tmp, sharded_strategy=sharded_strategy)
        os.makedirs(os.path.join(tmp, RANK_STATE_DIR), exist_ok=True)
        write_json_atomic(os.path.join(tmp, RANK_STATE_DIR, f"rank_{_rank():05d}.json"), rank_state)
        if _rank() == 0:
            write_json_atomic(os.path.join(tmp, TRAIN_STATE), train_state)
            for fname, text in (extra_files or {}).items():
                with open(os.path.join(tmp, fname), "w") as f:
                    f.write(text)
        _barrier()
        files = _broadcast(_list_files(tmp) if _rank() == 0 else None)
        mine = files[_rank()::_world()]
        entries = {}
        for part in _all_gather({f: {"size": os.path.getsize(os.path.join(tmp, f)),
                                     "sha256": file_sha256(os.path.join(tmp, f))} for f in mine}):
            entries.update(part)
        if _rank() == 0:
            self._finalize(tmp, final, name, {"iteration": iteration, "files": entries})
        _barrier()
        return final

    def _finalize(self, tmp: str, final: str, name: str, manifest: Dict):
        for dirpath, _, names in os.walk(tmp):     # data files: make them durable before they count
            for n in names:
                with open(os.path.join(dirpath, n), "rb") as f:
                    os.fsync(f.fileno())
            _fsync_dir(dirpath)
        write_json_atomic(os.path.join(tmp, MANIFEST), manifest)
        _fsync_dir(tmp)
        if os.path.isdir(final):   # re-saving an iteration (e.g. after train.resume=false): swap in the new copy
            os.rename(final, final + ".old.tmp")
        os.rename(tmp, final)
        _fsync_dir(self.root)
        with open(os.path.join(self.root, LATEST + ".tmp"), "w") as f:
            f.write(name + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(os.path.join(self.root, LATEST + ".tmp"), os.path.join(self.root, LATEST))
        _fsync_dir(self.root)
        shutil.rmtree(final + ".old.tmp", ignore_errors=True)
        for old in self.complete()[:-self.keep]:
            if old != name:
                shutil.rmtree(os.path.join(self.root, old), ignore_errors=True)

    @staticmethod
    def read_train_state(path: str) -> Dict:
        """The ``train_state.json`` of checkpoint ``path`` (iteration, data position, layout at save time)."""
        with open(os.path.join(path, TRAIN_STATE)) as f:
            return json.load(f)

    # ---- load (collective)
    def load(self, path: str, sharded_state_dict: Dict) -> Tuple[Dict, Dict, Optional[Dict]]:
        """Load ``sharded_state_dict`` (the model/optimizer template) from ``path`` (already verified).

        Returns ``(state_dict, train_state, rank_state)``; ``rank_state`` is this rank's saved RNG state, or None
        when the checkpoint was written by a different number of ranks (RNG streams do not map across layouts).
        """
        from megatron.core import dist_checkpointing

        with weights_only_torch_load():
            state = dist_checkpointing.load(sharded_state_dict, path)
        train_state = self.read_train_state(path)
        rank_state = None
        rank_file = os.path.join(path, RANK_STATE_DIR, f"rank_{_rank():05d}.json")
        if train_state.get("world_size") == _world() and os.path.isfile(rank_file):
            with open(rank_file) as f:
                rank_state = json.load(f)
        return state, train_state, rank_state
