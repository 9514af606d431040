"""Reuse of trained auto-encoders: one per (data fingerprint, stage-1 config, seed), trained once.

A sweep's trials share their stage-1 settings, so the first trial to ask trains the
auto-encoder and every later one (or a concurrent one, which waits on a file lock)
loads it. The store is a folder, local or on storage shared by a cluster's nodes.
Each training appends a line to KEY/trainings.log, so "trained once" can be checked.

KEY/autoencoder.pt is written whole or not at all (a temporary file, then a rename), and
KEY/autoencoder.sha256 records its hash (in `sha256sum` format). A load checks both the hash and
that the file loads; an entry that fails is removed and trained again, under the lock, with one
warning naming the file. A file without a recorded hash (stored before laray recorded one, or a
writer killed between the two renames) is kept when it loads, and its hash recorded then.
`read_baselines` checks the stored baselines beside it: unreadable ones, and ones without a baseline this
stage 1 has (the pretrained encoder's, stored by an earlier laray), are removed and scored again.

KEY/training.ckpt (and its .prev) is stage 1's checkpoint while it trains: a stage 1 interrupted
resumes from it. One that does not load is removed with a warning naming it, and stage 1 resumes
from the other or starts afresh: no user asked to resume it, so it is no error of theirs. Both go
once autoencoder.pt is written (they are twice its size), and so do those an older laray left.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import os
import socket
import time
from pathlib import Path
from typing import Callable

import torch

from laray.checkpoint import checkpoint_problem, previous_path, write_atomic
from laray.errors import BadEntry, naming_full_disk
from laray.filelock import exclusive
from laray.settings.config import AutoEncoderConfig

WEIGHTS, DIGEST, CHECKPOINT = "autoencoder.pt", "autoencoder.sha256", "training.ckpt"

log = logging.getLogger("laray.store")


def store_key(data_fingerprint: str, cfg: AutoEncoderConfig, seed: int) -> str:
    config = dataclasses.asdict(cfg)
    if config["precision"] == "auto":  # the key every auto-encoder stored before the setting existed had
        del config["precision"]
    payload = json.dumps({"data": data_fingerprint, "config": config, "seed": seed}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:24]


def _write_atomic(path: Path, data: bytes) -> None:
    """`data` into `path` through laray.checkpoint.write_atomic: a writer killed at any point leaves no partial file."""
    write_atomic(path, lambda handle: handle.write(data))


def _verified(folder: Path) -> tuple[dict, str, bool] | None:
    """(what autoencoder.pt holds, its sha256, whether that hash was recorded); None when there is no file.

    Raises BadEntry when the file's hash differs from the recorded one or the file does not load.
    """
    final, digest = folder / WEIGHTS, folder / DIGEST
    try:
        data = final.read_bytes()
    except FileNotFoundError:
        return None
    actual = hashlib.sha256(data).hexdigest()
    try:
        recorded = digest.read_text().split()[0]
    except FileNotFoundError:
        recorded = None
    except (OSError, ValueError, IndexError):  # unreadable or empty: no hash to trust
        recorded = ""
    if recorded is not None and recorded != actual:
        raise BadEntry(final, f"its sha256 {actual[:16]}... differs from the one in {digest}")
    try:
        saved = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # torch reports a torn file many ways (RuntimeError, EOFError, pickle's errors...)
        raise BadEntry(final, f"does not load ({(str(exc) or type(exc).__name__).splitlines()[0]})") from None
    if not isinstance(saved, dict) or not {"model", "history"} <= saved.keys():
        raise BadEntry(final, "holds no auto-encoder (model and history)")
    return saved, actual, recorded is not None


def _drop_checkpoints(folder: Path) -> None:
    """Stage 1's checkpoints, of no use once autoencoder.pt is in place."""
    for path in (folder / CHECKPOINT, previous_path(folder / CHECKPOINT)):
        path.unlink(missing_ok=True)


def _drop_unreadable_checkpoints(folder: Path) -> None:
    """Remove stage 1's checkpoints that cannot be resumed from (a warning naming each): the trainer then resumes
    from what is left, or starts afresh, instead of stopping as a torn checkpoint stops `--resume`."""
    latest = folder / CHECKPOINT
    previous = previous_path(latest)
    problems = {path: checkpoint_problem(path) for path in (latest, previous) if path.exists()}
    kept = [path.name for path, problem in problems.items() if problem is None]
    for path, problem in problems.items():
        if problem is not None:
            path.unlink()
            log.warning(
                "stage-1 checkpoint %s is %s; removed it, %s",
                path,
                problem,
                f"resuming from {kept[0]}" if kept else "training stage 1 from the start",
            )
    if previous.exists() and not latest.exists():
        os.replace(previous, latest)  # so that the trainer does not warn again that training.ckpt is missing


def get_or_train(
    store_dir: str | os.PathLike, key: str, train: Callable[[Path], tuple[dict, list]]
) -> tuple[dict, list, bool]:
    """(auto-encoder state_dict, stage-1 history, whether this call trained it).

    `train(checkpoint_path)` trains stage 1, checkpointing (and resuming) at checkpoint_path,
    and returns (state_dict, history). Only one process trains a key; the others wait and load.
    A stored auto-encoder that fails verification is trained again, and a training checkpoint that
    does not load is removed before training (one warning naming each file).
    """
    folder = Path(store_dir) / key
    folder.mkdir(parents=True, exist_ok=True)
    try:
        stored = _verified(folder)
        if stored is not None and stored[2]:
            _drop_checkpoints(folder)  # left by an older laray; a trainer writes none while this file is valid
            return stored[0]["model"], stored[0]["history"], False
    except BadEntry:
        pass  # judged again under the lock, where removing it is safe
    with naming_full_disk(folder, "the auto-encoder"), exclusive(folder / "lock"):
        for leftover in folder.glob(".*.tmp"):  # of a writer killed while it held the lock: only its holder writes
            leftover.unlink(missing_ok=True)
        try:
            stored = _verified(folder)
        except BadEntry as bad:
            log.warning("stored auto-encoder %s; removed it, training again", bad)
            stored = None
        if stored is not None:  # somebody finished it while we waited, or it only lacked its recorded hash
            saved, sha, recorded = stored
            if not recorded:
                _write_atomic(folder / DIGEST, f"{sha}  {WEIGHTS}\n".encode())
            _drop_checkpoints(folder)
            return saved["model"], saved["history"], False
        # training.ckpt stays when it loads (the trainer resumes from it); baselines left beside a
        # removed auto-encoder go: they scored that one
        for leftover in [folder / WEIGHTS, folder / DIGEST, *folder.glob("baselines_*.json")]:
            leftover.unlink(missing_ok=True)
        _drop_unreadable_checkpoints(folder)
        state, history = train(folder / CHECKPOINT)
        buffer = io.BytesIO()
        torch.save({"model": state, "history": history}, buffer)
        data = buffer.getvalue()
        _write_atomic(folder / WEIGHTS, data)
        _write_atomic(folder / DIGEST, f"{hashlib.sha256(data).hexdigest()}  {WEIGHTS}\n".encode())
        _drop_checkpoints(folder)
        with open(folder / "trainings.log", "a") as log_file:
            log_file.write(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} {socket.gethostname()} pid {os.getpid()}\n")
        return state, history, True


def read_baselines(path: str | os.PathLike, names=("raw_pixels", "autoencoder")) -> dict | None:
    """The baselines stored at `path`; None when absent, or unreadable or without one of `names` (then removed,
    with a warning naming it): a caller scores them again rather than go on without a baseline.

    names: the baselines this stage 1 has (laray.training.run.baseline_keys): files an earlier laray wrote
    for a stage 1 from pretrained weights lack "pretrained".
    """
    path = Path(path)
    try:
        scores = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:  # ValueError: not JSON, or not UTF-8
        problem = f"unreadable ({exc})"
    else:
        missing = [k for k in names if not isinstance(scores, dict) or not isinstance(scores.get(k), dict)]
        if not missing:
            return scores
        problem = f"without the scores of {' and '.join(missing)}"
    log.warning("stored baselines %s: %s; removed them, scoring again", path, problem)
    path.unlink(missing_ok=True)
    return None


def trainings(store_dir: str | os.PathLike, key: str) -> int:
    """How many times stage 1 was trained for this key (1 when reuse worked)."""
    log_path = Path(store_dir) / key / "trainings.log"
    return len(log_path.read_text().splitlines()) if log_path.exists() else 0
