"""The function trainable: one trial is one training run (laray.training.run) with the trial's LA settings.

A trial opens the data set by reference on its own node, receives stage 1 through Ray's object store,
reports every evaluated LA epoch with `ray.tune.report(metrics, checkpoint=...)` and resumes from
`tune.get_checkpoint()` after its worker dies. A trial whose loss goes non-finite ends as errored with
that reason (NONFINITE_MARKER in its folder keeps a restart from diverging again).

A space that searches stage-1 settings (laray.settings.stage1_search) gives trials other stage-1
configurations than the one shipped: such a trial gets its own from the sweep's store (`store_dir`),
trained there by the first trial that asks, under the store's lock, while the others with the same
configuration wait and load it. Tune still sees LA epochs only.

With `TuneConfig(reuse_actors=True)` one worker runs trial after trial: its imports are paid once, and
the data set it opened for one trial serves the next (`_opened`). Nothing else is carried over:
every trial sets its thread count, seeds its own training, runs in a fresh thread (Tune's) and writes
its own folder; benchmarks/sweep_overhead.py measures what that saves.
"""

from __future__ import annotations

import logging
import os
import resource
import shutil
import socket
import sys
import tempfile
import time
from pathlib import Path

import torch

from laray.checkpoint import write_atomic
from laray.data.cache import default_cache_dir
from laray.data.dataset import ListingDigest, open_dataset
from laray.errors import naming_full_disk
from laray.score_names import HELDOUT_SCORES, SCORE_NAMES
from laray.settings.config import AutoEncoderConfig, LAConfig, replace
from laray.settings.space import SIZE_LIMITS, SearchSpace
from laray.settings.stage1_search import ae_config_of, la_part
from laray.training.epoch_progress import stage1_epoch_line
from laray.training.run import Stage1, write_json
from laray.training.stages import STAGE_LA, NonFiniteLossError
from laray.training.store import store_key

log = logging.getLogger("laray.sweep.trainable")

NONFINITE_MARKER = "nonfinite_loss.txt"
REPORTED = (*SCORE_NAMES, *HELDOUT_SCORES, "loss", "images_per_s", "lr", "epoch")  # what a trial reports to Tune


def ignore_exit_in_callbacks() -> None:
    """Stop printing a SystemExit that Python cannot raise, in a trial's worker; print the others.

    Ray stops a finished trial's worker by raising SystemExit in it. When that lands in a
    garbage-collection callback (a WeakSet's, say), Python prints it with a traceback as an
    ignored exception, which reads like a failure but is the exit itself (it showed in 2 of 14
    runs of the console test in tests/sweep/test_sweep.py). Other ignored exceptions still go to the
    hook that was there.
    """
    previous = sys.unraisablehook
    if getattr(previous, "laray_ignores_exit", False):  # Ray reuses workers: install once
        return

    def hook(unraisable) -> None:
        if not isinstance(unraisable.exc_value, SystemExit):
            previous(unraisable)

    hook.laray_ignores_exit = True
    sys.unraisablehook = hook


def _trial_dir() -> Path:
    from ray import tune

    return Path(tune.get_context().get_trial_dir())


def _stored_folder() -> Path | None:
    """The trial's folder under the sweep's storage, where that is a folder (local or mounted); None for cloud
    storage."""
    import pyarrow.fs
    from ray import tune

    storage = tune.get_context().get_storage()
    if storage is None or not isinstance(storage.storage_filesystem, pyarrow.fs.LocalFileSystem):
        return None
    return Path(storage.trial_fs_path)


def _output_dir() -> Path:
    """Where a trial writes its outputs (metrics.json, assignments.csv, codes.npy, worker.json, la.ckpt).

    With a folder for storage: straight into the trial's folder there, each file atomically. Tune would copy
    them there from the trial's working folder in place, file by file, and two such copies at once (the driver's
    of its staging folder, a killed driver's trial still running beside the resumed one) left a torn file. With
    cloud storage: the working folder, which Tune uploads (SyncConfig(sync_artifacts=True)).
    """
    folder = _stored_folder()
    if folder is None:
        return _trial_dir()
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _stored(name: str) -> Path | None:
    """The file `name` in the trial's folder under the sweep's storage, where that is a folder: what an earlier
    attempt of the trial wrote (a restarted trial gets a fresh working folder)."""
    folder = _stored_folder()
    return None if folder is None else folder / name


def _fit_to_data(config: dict, n_images: int) -> dict:
    """Ranges were resolved against the files listed; a few may have failed to decode on the node."""
    fitted = dict(config)
    for name, limits in SIZE_LIMITS.items():
        if name in fitted:
            low, high = limits(n_images)
            fitted[name] = min(max(fitted[name], low), high)
            if fitted[name] != config[name]:
                log.warning("%s %s clipped to %s: %d images decoded", name, config[name], fitted[name], n_images)
    return fitted


# Kept by the worker process across the trials it runs (reuse_actors): the last data set opened, by its
# reference and cache folder. One only: a worker holds one mapping of the decoded images at a time.
_opened: dict = {}
_trials_here = 0  # trials this worker process has started


def _open_data(data: ListingDigest, cache_dir: str | None):
    """(the data set, whether an earlier trial of this worker opened it): relisted and mapped once per worker.

    Reopening would list the node's files again and map the same cache entry (laray.data.cache never
    rewrites an entry in place), seconds at 276,000 files.
    """
    key = (data, cache_dir)
    if key in _opened:
        return _opened[key], True
    _opened.clear()
    _opened[key] = open_dataset(data, cache_dir)
    return _opened[key], False


def stage1_label(ae: AutoEncoderConfig) -> str:
    """How a trial's console lines name its own stage 1: the settings a space may search."""
    pretrained = "" if ae.pretrained is None else f", pretrained {ae.pretrained}"
    return f"stage 1 (epochs {ae.epochs}, lr {ae.lr:g}{pretrained})"


def _own_stage1(
    dataset, ae: AutoEncoderConfig, la: LAConfig, seed: int, device: str, store_dir: str | None, say, progress_s
) -> Stage1:
    """The trial's stage 1 from the sweep's store, trained there first when no trial has (one at a time, by lock).

    store_dir None: the node's own store (laray.training.run.store_folder), shared by nothing but this node.
    """
    from laray.training.run import store_folder, stored_stage1

    label = stage1_label(ae)

    def epoch_line(record: dict) -> None:
        say(stage1_epoch_line(label, record))

    stage1 = stored_stage1(
        dataset,
        ae,
        [la.merger],
        seed,
        device,
        store_folder(store_dir),
        callback=epoch_line,
        progress=False,
        holdout=(la.holdout, la.holdout_seed),
        on_progress=lambda progress: say(f"{label}: {progress}"),
        progress_s=progress_s,
    )
    if not stage1.trained_in_this_run:
        say(f"{label}: from the store")
    return stage1


def _write_worker_record(path: Path, record: dict) -> None:
    record["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    # Atomically: a trial of a killed driver may still be writing it while the resumed trial does
    write_json(path, record)


def train_trial(
    config: dict,
    data: ListingDigest,
    stage1: Stage1,
    space: SearchSpace,
    seed: int,
    device: str,
    threads: int,
    cache_dir: str | None = None,
    quiet: bool = False,
    progress_s: float | None = None,
    store_dir: str | None = None,
) -> None:
    """The function trainable: one trial = one `train_run` with the trial's hyperparameters.

    It opens `data` on its node (from the node's cache folder, decoding once per node) and
    starts stage 2 from `stage1` when the trial's stage-1 settings (the space's, with its stage1_* values)
    are the ones `stage1` was trained with; else from its own, from the sweep's store `store_dir`
    (`_own_stage1`). worker.json in the trial folder says where it ran, whether it
    decoded the data, its start-up time, where its stage 1 came from and its peak resident memory.
    quiet: Ray Train's "Checkpoint successfully created at ..." line, once per epoch, not logged.
    progress_s: seconds between the trial's in-epoch lines (laray.training.epoch_progress), printed on its
    worker, which Ray forwards to the driver's console; Tune and ASHA never see them.
    """
    import ray
    from ray import tune

    if quiet:
        logging.getLogger("ray.train").setLevel(logging.WARNING)

    from laray.training.run import train_run
    from laray.training.stages import RunOptions

    global _trials_here
    began, started_at = time.perf_counter(), time.time()
    _trials_here += 1
    ignore_exit_in_callbacks()
    torch.set_num_threads(threads)  # every trial: the worker may have run another trial before
    out = _output_dir()
    dataset, reused = _open_data(data, cache_dir)
    worker = {
        "node_id": ray.get_runtime_context().get_node_id(),
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "trial_in_worker": _trials_here,  # 1: a fresh worker; more: reused (reuse_actors)
        "started_at": started_at,  # when the trial's function began (benchmarks/sweep_overhead.py)
        "cache_dir": str(Path(cache_dir) if cache_dir else default_cache_dir()),
        "decoded_here": dataset.decoded_here and not reused,
        "data_reused": reused,
        "open_data_s": time.perf_counter() - began,
    }
    _write_worker_record(out / "worker.json", worker)
    marker = out / NONFINITE_MARKER
    for earlier in (marker, _stored(NONFINITE_MARKER)):
        if earlier is not None and earlier.exists():  # restarted after a non-finite loss: it would only diverge again
            raise NonFiniteLossError(earlier.read_text())
    la_ckpt = out / "checkpoints" / "la.ckpt"
    # The folder handed to Tune with each report: beside la.ckpt when that is in the storage folder (on its file
    # system, so that la.ckpt is linked, not copied); else the system's temporary folder, as Tune uploads `out`
    scratch = la_ckpt.parent if out != _trial_dir() else None
    if scratch is not None:  # one left by an attempt killed mid-report holds a link to an old la.ckpt's blocks
        for stale in scratch.glob(".report-*"):
            shutil.rmtree(stale, ignore_errors=True)
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:  # a restart: continue from the last reported epoch
        with checkpoint.as_directory() as folder:  # atomic: a kill or a full disk mid-copy leaves no torn la.ckpt
            copy = (Path(folder) / "la.ckpt").read_bytes()  # tens of MB
            write_atomic(la_ckpt, lambda f: f.write(copy))

    def report(record: dict) -> None:
        if record["stage"] != STAGE_LA:
            return  # ASHA compares LA epochs only (a trial's own stage 1 reports through _own_stage1's lines)
        if "startup_s" not in worker:  # trial start to its first LA step, its own stage 1 aside: before the first
            worker["startup_s"] = (  # epoch's steps began
                time.perf_counter() - began - record["epoch_s"] - record.get("eval_s", 0) - worker["stage1_s"]
            )
        if "eval_s" not in record:
            return  # not evaluated (eval_every): nothing for ASHA to compare
        metrics = {k: record[k] for k in REPORTED if k in record}
        _write_worker_record(out / "worker.json", worker)
        with (
            naming_full_disk(scratch or tempfile.gettempdir(), "the trial's checkpoint for Tune"),
            tempfile.TemporaryDirectory(dir=scratch, prefix=".report-") as folder,
        ):
            try:  # a link, not a copy (hundreds of MB at 276,000 images): la.ckpt is replaced by a rename, never
                os.link(la_ckpt, Path(folder) / "la.ckpt")  # rewritten in place, and Tune copies it before returning
            except OSError:  # another file system
                shutil.copy2(la_ckpt, Path(folder) / "la.ckpt")
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(folder))

    trial_id = tune.get_context().get_trial_id()

    def say(line) -> None:  # named: lines of several trials at once interleave on the console
        print(f"trial {trial_id}: {line}", flush=True)

    la_cfg = replace(space.la, **_fit_to_data(la_part(config), len(dataset)))
    trial_ae = ae_config_of(space.ae, config)
    asked = time.perf_counter()
    try:
        if store_key(dataset.fingerprint, trial_ae, seed) != stage1.key:  # fingerprint: the DataRef's key, as shipped
            stage1 = _own_stage1(dataset, trial_ae, la_cfg, seed, device, store_dir, say, progress_s)
        worker.update(stage1=stage1.source, stage1_key=stage1.key, stage1_s=time.perf_counter() - asked)
        train_run(
            dataset,
            out,
            trial_ae,
            la_cfg,
            stage1=stage1,
            run=RunOptions(
                seed=seed,
                device=device,
                resume=checkpoint is not None,
                callback=report,
                progress=False,
                on_progress=say,
                progress_s=progress_s,
            ),
        )
    except NonFiniteLossError as exc:
        marker.write_text(str(exc))
        raise


def confirm_trial(config: dict, stage1s: dict, **kwargs) -> None:
    """One confirmation run: a search trial's settings (config["la"], stage1_* ones included) with a fresh seed
    (config["seed"]); stage1s: the seeds' shipped stage 1, which a searched stage 1 replaces as in a search trial."""
    import ray

    from laray.scoring.confirm import without_mark

    seed = config["seed"]
    train_trial(without_mark(config["la"]), stage1=ray.get(stage1s[seed]), seed=seed, **kwargs)
