"""One checkpoint contract per stage, written atomically and loaded strictly.

Keys: model, optimizer, scheduler, epoch (epochs completed), config, history,
rng (torch CPU/CUDA, numpy, python), and for stage 2 the LA state (memory bank,
cluster labels, reclustering count).

Each save keeps the checkpoint it replaces as NAME.prev (so a checkpoint takes twice
its size on disk); resuming falls back to it when the latest cannot be read.
"""

from __future__ import annotations

import logging
import os
import random
import uuid
from pathlib import Path
from typing import BinaryIO, Callable

import numpy as np
import torch

from laray.errors import CheckpointError, naming_full_disk

log = logging.getLogger("laray.checkpoint")

REQUIRED_KEYS = ("model", "optimizer", "scheduler", "epoch", "config", "history", "rng")


def rng_state() -> dict:
    """Global RNG states as tensors and plain values, so the checkpoint loads with weights_only=True."""
    _, keys, pos, has_gauss, cached = np.random.get_state()
    version, py_state, gauss_next = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": pos,
            "has_gauss": has_gauss,
            "cached_gaussian": cached,
        },
        "python": {"version": version, "state": list(py_state), "gauss_next": gauss_next},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    npy = state["numpy"]
    np.random.set_state(
        ("MT19937", npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"], npy["cached_gaussian"])
    )
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss_next"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def previous_path(path: str | os.PathLike) -> Path:
    """Where save_atomic keeps the checkpoint it replaced."""
    path = Path(path)
    return path.with_name(path.name + ".prev")


def checkpoint_exists(path: str | os.PathLike) -> bool:
    """True when there is something to resume from: a kill between save_atomic's two renames leaves only .prev."""
    return Path(path).exists() or previous_path(path).exists()


class _KeepsWriteError:
    """A file whose write() remembers the OSError it raised: torch's writer turns it into a RuntimeError
    ("unexpected pos") and numpy's into an OSError without errno, and a full disk must still be told apart."""

    def __init__(self, file: BinaryIO):
        self.file, self.error = file, None

    def write(self, data) -> int:
        try:
            return self.file.write(data)
        except OSError as exc:
            self.error = exc
            raise

    def __getattr__(self, name):
        return getattr(self.file, name)


def write_atomic(path: str | os.PathLike, write: Callable[[BinaryIO], None], keep_previous: bool = False) -> None:
    """write(file) into a temporary file beside `path`, flushed to disk, then renamed over `path`.

    A kill at any moment leaves `path` whole, the old or the new one (keep_previous: the old one becomes
    .prev first, and a kill between the two renames leaves only .prev, which load_with_fallback takes);
    a full disk raises DiskFullError naming the folder and leaves `path` and its .prev as they were.
    """
    path = Path(path)
    # A name of its own (writers of one store may share it across nodes); open() not mkstemp: the usual mode.
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")
    with naming_full_disk(path.parent, path.name):
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(tmp, "wb") as file:
                watched = _KeepsWriteError(file)
                try:
                    write(watched)
                except Exception as exc:
                    if watched.error is not None and watched.error is not exc:
                        raise watched.error from exc  # what the disk said, not what the library made of it
                    raise
                file.flush()
                os.fsync(file.fileno())  # a full disk shows by here (network file systems), before the rename
            if keep_previous and path.exists():
                os.replace(path, previous_path(path))
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)


def save_atomic(obj, path: str | os.PathLike) -> None:
    """torch.save through write_atomic, keeping the checkpoint it replaces as .prev."""
    path = Path(path)
    # One process writes a given checkpoint: temporary files beside it were left by a killed earlier write.
    for stale in path.parent.glob(f".{path.name}.*.tmp"):
        stale.unlink(missing_ok=True)
    # Into write_atomic's file, not to a file name: torch's own file writer loses a full disk's errno.
    write_atomic(path, lambda file: torch.save(obj, file), keep_previous=True)


def _check_keys(state: dict, path, required) -> dict:
    missing = [k for k in required if k not in state]
    if missing:
        raise CheckpointError(f"checkpoint {path} lacks {missing}: not a laray checkpoint of this stage")
    return state


def load_checkpoint(path: str | os.PathLike, required=REQUIRED_KEYS) -> dict:
    """Load strictly: weights_only, and every key of the contract present."""
    return _check_keys(torch.load(path, map_location="cpu", weights_only=True), path, required)


def _read(path: Path):
    """(what the checkpoint at `path` holds, None), or (None, why it cannot be read)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True), None
    except MemoryError:
        raise
    except Exception as exc:  # a torn or corrupt file fails in many ways inside torch's reader
        lines = str(exc).strip().splitlines()
        return None, f"unreadable ({type(exc).__name__}: {lines[0][:120] if lines else ''})"


def checkpoint_problem(path: str | os.PathLike, required=REQUIRED_KEYS) -> str | None:
    """None when the checkpoint at `path` loads and holds `required`; else what is wrong with it, for a message.

    It loads the whole file: for the stage-1 store, which removes what could not be resumed from before training.
    """
    state, problem = _read(Path(path))
    if problem is None and not (isinstance(state, dict) and all(k in state for k in required)):
        problem = "not a laray checkpoint of this stage"
    return problem


def load_with_fallback(path: str | os.PathLike, required=REQUIRED_KEYS) -> dict:
    """The checkpoint at `path`, else its .prev with a warning naming both; CheckpointError when neither reads."""
    path = Path(path)
    prev = previous_path(path)
    problems = {}
    for candidate in (path, prev):
        if not candidate.exists():
            problems[candidate] = "missing"
            continue
        state, problems[candidate] = _read(candidate)
        if problems[candidate] is not None:
            continue
        if candidate == prev:
            log.warning("checkpoint %s is %s; resuming from the previous one, %s", path, problems[path], prev)
        return _check_keys(state, candidate, required)
    delete = " and ".join(str(p) for p in (path, prev) if p.exists())
    todo = f"delete {delete} to start afresh, or run without --resume" if delete else "run without --resume"
    raise CheckpointError(
        f"cannot resume: checkpoint {path} is {problems[path]} and {prev.name} is {problems[prev]}; " + todo
    )
