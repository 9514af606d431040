"""Reuse of trained auto-encoders: one per (data fingerprint, stage-1 config, seed), trained once.

A sweep's trials share their stage-1 settings, so the first trial to ask trains the
auto-encoder and every later one (or a concurrent one, which waits on a file lock)
loads it. The store is a folder, local or on storage shared by a cluster's nodes.
Each training appends a line to KEY/trainings.log, so "trained once" can be checked.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import socket
import time
from pathlib import Path
from typing import Callable

import torch

from laray.checkpoint import save_atomic
from laray.config import AutoEncoderConfig
from laray.filelock import exclusive


def store_key(data_fingerprint: str, cfg: AutoEncoderConfig, seed: int) -> str:
    payload = json.dumps({"data": data_fingerprint, "config": dataclasses.asdict(cfg), "seed": seed}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:24]


def get_or_train(store_dir: str | os.PathLike, key: str, train: Callable[[Path], tuple[dict, list]]) -> tuple[dict, list, bool]:
    """(auto-encoder state_dict, stage-1 history, whether this call trained it).

    `train(checkpoint_path)` trains stage 1, checkpointing (and resuming) at checkpoint_path,
    and returns (state_dict, history). Only one process trains a key; the others wait and load.
    """
    folder = Path(store_dir) / key
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / "autoencoder.pt"
    if not final.exists():
        with exclusive(folder / "lock"):
            if not final.exists():  # nobody finished it while we waited
                state, history = train(folder / "training.ckpt")
                save_atomic({"model": state, "history": history}, final)
                with open(folder / "trainings.log", "a") as log:
                    log.write(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} {socket.gethostname()} pid {os.getpid()}\n")
                return state, history, True
    saved = torch.load(final, map_location="cpu", weights_only=True)
    return saved["model"], saved["history"], False


def trainings(store_dir: str | os.PathLike, key: str) -> int:
    """How many times stage 1 was trained for this key (1 when reuse worked)."""
    log = Path(store_dir) / key / "trainings.log"
    return len(log.read_text().splitlines()) if log.exists() else 0
