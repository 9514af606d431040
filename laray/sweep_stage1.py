"""Stage 1 once per sweep, on any cluster: a Ray task with a trial's resources trains it, the trials get it by value.

The task runs where Ray places it (a GPU node on a cluster), opens the data set there from its
reference (that node's one decode), trains the auto-encoder and scores the baselines (k-means on
raw pixels and on the auto-encoder's codes). The driver keeps what it returns in the sweep's
store, STORAGE/NAME/autoencoders/, under the store's lock, so a resumed sweep (or a later one with
the same data, stage-1 settings and seed and the same --storage) loads it instead. Trials receive
the encoder's weights through Ray's object store and never read that folder: on a cluster without
a shared file system they could not.
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

from laray.ae_store import get_or_train, store_key
from laray.config import AutoEncoderConfig
from laray.data import DataRef, open_dataset
from laray.run import Stage1, baselines_path, compute_baselines, encoder_part, train_autoencoder, write_json


def _print_epoch(record: dict) -> None:
    # Ray forwards a task's stdout to the driver's console, prefixed with the task's name.
    print(f"stage 1: epoch {record['epoch']} loss {record['loss']:.4f} {record['images_per_s']:.0f} img/s", flush=True)


def _stage1_task(ref: DataRef, ae_cfg: AutoEncoderConfig, mergers: list[str], seed: int, device: str, threads: int,
                 cache_dir: str | None, ae_state: dict | None) -> tuple[dict, list, dict]:
    """(auto-encoder state_dict, history, {merger: baselines}); trains only when no ae_state is given."""
    import torch

    torch.set_num_threads(threads)
    dataset = open_dataset(ref, cache_dir)
    history = []
    if ae_state is None:
        with tempfile.TemporaryDirectory() as folder:
            ae_state, history = train_autoencoder(dataset, ae_cfg, seed, device, Path(folder) / "training.ckpt",
                                                  callback=_print_epoch, progress=False)
    encoder = encoder_part(ae_state)
    return ae_state, history, {m: compute_baselines(dataset, encoder, ae_cfg, m, seed, device) for m in mergers}


def sweep_stage1(ref: DataRef, ae_cfg: AutoEncoderConfig, mergers: list[str], seed: int, store_dir: Path,
                 resources: dict, device: str, threads: int, cache_dir: str | None) -> Stage1:
    """Stage 1 and its baselines for a sweep: from the store, else computed once by a Ray task and stored."""
    import ray

    task = ray.remote(_stage1_task).options(num_cpus=resources["cpu"], num_gpus=resources["gpu"])
    key = store_key(ref.key, ae_cfg, seed)
    computed = {}

    def train(_checkpoint: Path) -> tuple[dict, list]:  # the task checkpoints on its own node
        ae_state, history, baselines = ray.get(task.remote(ref, ae_cfg, mergers, seed, device, threads, cache_dir,
                                                           None))
        computed.update(baselines)
        return ae_state, history

    ae_state, history, trained = get_or_train(store_dir, key, train)
    paths = {m: baselines_path(store_dir, key, m, ref.labels_key) for m in mergers}
    missing = [m for m in mergers if m not in computed and not paths[m].exists()]
    if missing:  # stage 1 stored before, scored for another label set or merger: score it once more, remotely
        computed.update(ray.get(task.remote(ref, ae_cfg, missing, seed, device, threads, cache_dir, ae_state))[2])
    for merger, scores in computed.items():
        write_json(paths[merger], scores)
    baselines = {m: computed[m] if m in computed else json.loads(paths[m].read_text()) for m in mergers}
    return Stage1(key, encoder_part(ae_state), history, baselines, trained, "trained" if trained else "store")
