"""Stage 1 once per sweep, on any cluster: a Ray task with a trial's resources trains it, the trials get it by value.

The task runs where Ray places it (a GPU node on a cluster), opens the data set there from its
reference (that node's one decode), trains the auto-encoder and scores the baselines (k-means on
raw pixels, on the auto-encoder's codes and, when stage 1 starts from pretrained weights, on the
pretrained encoder's codes before any training). The driver keeps what it returns in the sweep's
store, STORAGE/NAME/autoencoders/, under the store's lock, so a resumed sweep (or a later one with
the same data, stage-1 settings and seed and the same --storage) loads it instead. Trials receive
the encoder's weights through Ray's object store and never read that folder: on a cluster without
a shared file system they could not.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from laray.data.dataset import DataRef, ListingDigest, open_dataset
from laray.scoring.holdout import NO_HOLDOUT
from laray.settings.config import AutoEncoderConfig
from laray.sweep.stage1_ddp import drop_run, read_checkpoint, train_stage1_ddp
from laray.training.epoch_progress import stage1_epoch_line
from laray.training.run import (
    Stage1,
    baseline_keys,
    baselines_path,
    compute_baselines,
    encoder_part,
    train_autoencoder,
    write_json,
)
from laray.training.store import get_or_train, read_baselines, store_key

_training: set = set()  # the stage-1 tasks this driver is waiting for (the confirmation waits for several)


def cancel_stage1_tasks() -> None:
    """Cancel the stage-1 tasks being waited for: after a stop signal, nothing would keep what they train."""
    import ray

    for ref in list(_training):
        ray.cancel(ref, force=True)


def _epoch_line(seed: int):
    """Each epoch's line: Ray forwards a task's stdout to the driver's console, prefixed with the task's name; the
    seed tells the confirmation's stage-1 tasks, several at once, apart."""

    def say(record: dict) -> None:
        print(stage1_epoch_line(f"stage 1 (seed {seed})", record), flush=True)

    return say


def _progress_line(seed: int):
    def say(progress) -> None:  # an epoch that runs long (laray.training.epoch_progress)
        print(f"stage 1 (seed {seed}): {progress}", flush=True)

    return say


def _stage1_task(
    ref: ListingDigest,
    ae_cfg: AutoEncoderConfig,
    key: str,
    mergers: list[str],
    seed: int,
    device: str,
    threads: int,
    cache_dir: str | None,
    encoder_state: dict | None,
    holdout: tuple[float, int],
    progress_s: float | None = None,
    trained_by_workers=None,
) -> Stage1:
    """Stage 1 as the trials receive it; trains only when no encoder_state is given (else scores it).

    progress_s: seconds between in-epoch lines (the driver's $LARAY_PROGRESS_S; this node may lack it).
    trained_by_workers: the Ray Train checkpoint of a data-parallel stage 1 (laray.sweep.stage1_ddp), read
    here from the sweep's storage, so that its weights reach the trials from this node, not the driver's.
    """
    import torch

    torch.set_num_threads(threads)
    dataset = open_dataset(ref, cache_dir)
    history = []
    if trained_by_workers is not None:
        ae_state, history = read_checkpoint(trained_by_workers)
        encoder_state = encoder_part(ae_state)
    elif encoder_state is None:
        with tempfile.TemporaryDirectory() as folder:
            ae_state, history = train_autoencoder(
                dataset,
                ae_cfg,
                seed,
                device,
                Path(folder) / "training.ckpt",
                callback=_epoch_line(seed),
                progress=False,
                on_progress=_progress_line(seed),
                progress_s=progress_s,
            )
        encoder_state = encoder_part(ae_state)  # the decoder is not needed after stage 1: it is not shipped
    baselines = {m: compute_baselines(dataset, encoder_state, ae_cfg, m, seed, device, holdout) for m in mergers}
    return Stage1(key, encoder_state, history, baselines, trained_in_this_run=False, source="object store")


def sweep_stage1(
    ref: DataRef,
    ae_cfg: AutoEncoderConfig,
    mergers: list[str],
    seed: int,
    store_dir: Path,
    resources: dict,
    device: str,
    threads: int,
    cache_dir: str | None,
    holdout: tuple[float, int] = NO_HOLDOUT,
    progress_s: float | None = None,
    workers: int = 1,
    run_storage: str | None = None,
):
    """(baselines per merger, ObjectRef of the Stage1 the trials receive): from the store, else one Ray task.

    holdout: (fraction, seed) of the sweep's held-out split, which the baselines are scored with too.
    progress_s: seconds between the task's in-epoch lines (laray.training.epoch_progress).
    workers: more than 1 trains stage 1 data-parallel on that many workers, each with `resources`
    (laray.sweep.stage1_ddp), then scores the baselines in one task; Ray Train keeps that run in
    run_storage/KEY (the sweep's storage, which every node can write; default: store_dir).

    The task's return value is what the trials get, so each node's object store holds one copy of
    the weights (the driver's too: it reads the same object to keep it in the store).
    """
    import ray

    task = ray.remote(_stage1_task).options(num_cpus=resources["cpu"], num_gpus=resources["gpu"])
    key = store_key(ref.key, ae_cfg, seed)
    shipped = None
    run_folder = f"{run_storage or store_dir}/{key}"

    def train(_checkpoint: Path) -> tuple[dict, list]:  # the task checkpoints on its own node
        nonlocal shipped
        if workers > 1 and ae_cfg.epochs > 0:
            checkpoint = train_stage1_ddp(
                ref.digest(), ae_cfg, seed, workers, resources, device, threads, cache_dir, run_folder, progress_s
            )
            # baselines scored, and the weights shipped, by a task that reads them where the workers left them
            shipped = task.remote(
                ref.digest(), ae_cfg, key, mergers, seed, device, threads, cache_dir, None, holdout, None, checkpoint
            )
            return read_checkpoint(checkpoint)
        shipped = task.remote(
            ref.digest(), ae_cfg, key, mergers, seed, device, threads, cache_dir, None, holdout, progress_s
        )
        _training.add(shipped)
        try:
            stage1 = ray.get(shipped)
        except KeyboardInterrupt:  # a stop signal (laray.interrupt): the task would train on, on its cluster
            cancel_stage1_tasks()
            raise
        finally:
            _training.discard(shipped)
        return {f"encoder.{k}": v for k, v in stage1.encoder_state.items()}, stage1.history

    ae_state, history, _ = get_or_train(store_dir, key, train)
    paths = {m: baselines_path(store_dir, key, m, ref.labels_key, holdout) for m in mergers}
    if shipped is not None:
        baselines = ray.get(shipped).baselines
    else:  # stored by an earlier run: scored for this label set and these mergers too?
        # an unreadable file, or one an earlier laray wrote without the pretrained encoder's baseline, is warned
        # about and removed: scored again below, and rewritten
        keys = baseline_keys(ae_cfg)
        baselines = {m: scores for m in mergers if (scores := read_baselines(paths[m], keys)) is not None}
        missing = [m for m in mergers if m not in baselines]
        if missing:
            baselines.update(
                ray.get(
                    task.remote(
                        ref.digest(),
                        ae_cfg,
                        key,
                        missing,
                        seed,
                        device,
                        threads,
                        cache_dir,
                        encoder_part(ae_state),
                        holdout,
                    )
                ).baselines
            )
        shipped = ray.put(Stage1(key, encoder_part(ae_state), history, baselines, False, "object store"))
    for merger, scores in baselines.items():
        if not paths[merger].exists():
            write_json(paths[merger], scores)
    drop_run(run_folder)  # after the task that read the workers' checkpoint has ended
    return baselines, shipped
