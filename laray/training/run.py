"""One run of both stages with one set of hyperparameters, and what it leaves in its folder.

    OUT/metrics.json      final purity, nmi, ari, acc; the baselines; the per-epoch history; the settings
    OUT/assignments.csv   idx, path, label (species name), cluster (, heldout): one row per image
    OUT/codes.npy         final unit codes (N, d), float32, in idx order
    OUT/checkpoints/      the LA stage's checkpoint la.ckpt and the one before it, la.ckpt.prev
                          (the auto-encoder lives in the reuse store)

Every file is written to a temporary file and renamed: a kill or a full disk leaves the previous one.

`laray train` calls `train_run`; the sweep's trainable calls it too.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from laray.checkpoint import write_atomic
from laray.data.cache import default_cache_dir, preallocate
from laray.data.dataset import ImageDataset
from laray.errors import ConfigError, naming_full_disk
from laray.method.models import EncoderVGGMerged
from laray.scoring.evaluate import encode_all, score_codes
from laray.scoring.holdout import NO_HOLDOUT, PREFIX, holdout_mask, split_tag
from laray.scoring.metrics import SCORE_NAMES
from laray.settings.config import AutoEncoderConfig, LAConfig
from laray.training.epoch_progress import ProgressSink
from laray.training.stages import STAGE_LA, Callback, RunOptions, finetune_la, pretrain_autoencoder, resolve_device
from laray.training.store import get_or_train, read_baselines, store_key

RAW_BASELINE_SIDE = 32  # raw-pixel baseline on images downsampled to at most this side: N x 3,072 floats


def raw_pixel_codes(dataset: ImageDataset) -> torch.Tensor:
    """Flattened pixels in [0, 1], downsampled (area) to at most RAW_BASELINE_SIDE px: the baseline's features."""
    chunks = []
    for start in range(0, len(dataset), 1024):
        x = dataset.uint8_batch(np.arange(start, min(start + 1024, len(dataset)))).float().div_(255)
        if x.shape[-1] > RAW_BASELINE_SIDE:
            x = F.adaptive_avg_pool2d(x, RAW_BASELINE_SIDE)
        chunks.append(x.flatten(1))
    return torch.cat(chunks)


def write_assignments(
    path: Path, dataset: ImageDataset, clusters: np.ndarray, heldout: np.ndarray | None = None
) -> None:
    """One row per image; with a held-out split, a `heldout` column says which part scores it."""
    names = np.array(dataset.class_names + [""], dtype=object)  # label -1 -> ""
    frame = pd.DataFrame(
        {"idx": np.arange(len(dataset)), "path": dataset.paths, "label": names[dataset.labels], "cluster": clusters}
    )
    if heldout is not None:
        frame["heldout"] = heldout
    write_atomic(path, lambda file: frame.to_csv(file, index=False))


def write_json(path: Path, obj) -> None:
    text = json.dumps(obj, indent=2, default=float)
    write_atomic(path, lambda file: file.write(text.encode()))


def write_codes(path: Path, codes: torch.Tensor) -> None:
    array = codes.numpy().astype(np.float32, copy=False)  # no copy: float32 already
    write_atomic(path, lambda file: np.save(file, array))


class CodesFile:
    """An evaluation's codes written straight into a memory-mapped .npy beside `path`, then renamed over it.

    At Danish Fungi size the codes are one more N x d array beside the memory bank (141 MB at
    N = 276,000, d = 128). Mapped from the file that is written anyway, they are pages the kernel
    can write back and drop, not private memory (benchmarks/sweep_scale.py measures the worker).
    A kill before `publish` leaves the previous codes.npy whole, as write_atomic does.
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        self.partial = self.path.with_name(f".{self.path.name}.partial")
        self._map, self._pending = None, False

    def new(self, n: int, d: int) -> torch.Tensor:
        self._map = None  # the previous evaluation's map: its file was renamed into place or is overwritten
        with naming_full_disk(self.path.parent, self.path.name):
            self._map = np.lib.format.open_memmap(self.partial, mode="w+", dtype=np.float32, shape=(n, d))
            preallocate(self.partial)  # a full disk fails here, not as SIGBUS while the map is written
        self._pending = True
        return torch.from_numpy(self._map)

    def holds(self, codes: torch.Tensor) -> bool:
        return self._map is not None and codes.data_ptr() == self._map.ctypes.data

    def publish(self) -> None:
        """The codes of the last `new` to disk, renamed over `path` (once: a second call finds them there)."""
        if not self._pending:
            return
        self._pending = False
        with naming_full_disk(self.path.parent, self.path.name):
            self._map.flush()  # msync: written back before the rename makes them the run's codes
            os.replace(self.partial, self.path)

    def discard(self) -> None:
        """Remove codes never published (a run stopped by an error): the folder keeps only whole files."""
        if self._pending:
            self._map, self._pending = None, False
            self.partial.unlink(missing_ok=True)


@dataclasses.dataclass
class Stage1:
    """What stage 2 starts from: the auto-encoder's encoder weights, stage 1's history and the baselines.

    A sweep trains it once (a Ray task) and hands it to every trial through Ray's object store.
    """

    key: str  # the store key: data fingerprint, stage-1 settings and seed
    encoder_state: dict
    history: list
    # merger -> {"raw_pixels": scores, "autoencoder": scores[, "pretrained": scores]}, k-means with K = species
    baselines: dict
    trained_in_this_run: bool = False
    source: str = "store"  # "store", "trained" (by this process), or "object store" (a sweep's trial)


def encoder_part(ae_state: dict) -> dict:
    return {k[len("encoder.") :]: v for k, v in ae_state.items() if k.startswith("encoder.")}


def train_autoencoder(
    dataset: ImageDataset,
    ae_cfg: AutoEncoderConfig,
    seed: int,
    device,
    checkpoint: Path | None,
    callback: Callback | None = None,
    progress: bool = True,
    on_progress: ProgressSink | None = None,
    progress_s: float | None = None,
) -> tuple[dict, list]:
    """Stage 1, resuming from `checkpoint` when it exists: (state_dict on the CPU, history).

    on_progress, progress_s: the in-epoch lines (RunOptions).
    """
    run = RunOptions(seed, device, True, callback, progress, on_progress, progress_s)
    model, history = pretrain_autoencoder(dataset, ae_cfg, run, checkpoint)
    return {k: v.cpu() for k, v in model.state_dict().items()}, history


def baseline_keys(ae_cfg: AutoEncoderConfig) -> tuple[str, ...]:
    """The baselines scored for a stage 1: k-means on raw pixels and on the auto-encoder's codes, and on the
    pretrained encoder's codes when stage 1 starts from pretrained weights (the first baseline unsupervised
    clustering work compares with: pretrained features + k-means)."""
    return ("raw_pixels", "autoencoder", *(("pretrained",) if ae_cfg.pretrained is not None else ()))


def compute_baselines(
    dataset: ImageDataset,
    encoder_state: dict,
    ae_cfg: AutoEncoderConfig,
    merger: str,
    seed: int,
    device,
    holdout: tuple[float, int] = NO_HOLDOUT,
) -> dict:
    """Scores for the same K of k-means on raw pixels, on the auto-encoder's codes before LA and, with
    `ae_cfg.pretrained`, on the codes of the pretrained encoder as loaded, before any training.

    holdout: (fraction, seed) of scoring.holdout, so that the baselines are scored on the same parts as the trials.
    """
    device = resolve_device(device)
    heldout = holdout_mask(dataset.labels, *holdout)

    def scores(codes: torch.Tensor) -> dict:
        return score_codes(codes, dataset.labels, seed=seed, device=device, heldout=heldout)[0]

    def codes_of(encoder: EncoderVGGMerged) -> torch.Tensor:
        return encode_all(encoder.to(device), dataset, device)

    ae_encoder = EncoderVGGMerged(ae_cfg.arch, None, ae_cfg.width, merger)
    ae_encoder.encoder.load_state_dict(encoder_state)
    baselines = {"raw_pixels": scores(raw_pixel_codes(dataset)), "autoencoder": scores(codes_of(ae_encoder))}
    del ae_encoder  # freed before the pretrained encoder is made: one encoder's weights on the device at a time
    if ae_cfg.pretrained is not None:
        # Loaded again from the weights stage 1 started from (a file, or torch's cache for "imagenet"), not
        # taken from the stored auto-encoder, whose encoder stage 1 has trained.
        pretrained = EncoderVGGMerged(ae_cfg.arch, ae_cfg.pretrained, ae_cfg.width, merger)
        baselines["pretrained"] = scores(codes_of(pretrained))
    return baselines


def baselines_path(
    store_dir: Path, key: str, merger: str, labels_key: str, holdout: tuple[float, int] = NO_HOLDOUT
) -> Path:
    """Baselines are kept beside the stored auto-encoder they score, per merger, label set and held-out split."""
    return Path(store_dir) / key / f"baselines_{merger}_{labels_key}_{split_tag(*holdout)}.json"


def stored_stage1(
    dataset: ImageDataset,
    ae_cfg: AutoEncoderConfig,
    mergers,
    seed: int,
    device,
    store_dir: str | os.PathLike,
    callback: Callback | None = None,
    progress: bool = True,
    holdout: tuple[float, int] = NO_HOLDOUT,
    on_progress: ProgressSink | None = None,
    progress_s: float | None = None,
) -> Stage1:
    """Stage 1 and its baselines from the store, trained there first when absent (by one process at a time)."""
    key = store_key(dataset.fingerprint, ae_cfg, seed)
    ae_state, history, trained = get_or_train(
        store_dir,
        key,
        lambda checkpoint: train_autoencoder(
            dataset, ae_cfg, seed, device, checkpoint, callback, progress, on_progress, progress_s
        ),
    )
    encoder_state = encoder_part(ae_state)
    baselines = {}
    for merger in mergers:
        path = baselines_path(store_dir, key, merger, dataset.labels_key, holdout)
        # None when absent, unreadable, or lacking one of these (scored by an earlier laray, before the
        # pretrained baseline): warned about and removed, then scored again here
        stored = read_baselines(path, baseline_keys(ae_cfg))
        if stored is not None:
            baselines[merger] = stored
        else:
            baselines[merger] = compute_baselines(dataset, encoder_state, ae_cfg, merger, seed, device, holdout)
            write_json(path, baselines[merger])
    return Stage1(key, encoder_state, history, baselines, trained, "trained" if trained else "store")


def store_folder(store_dir: str | os.PathLike | None = None) -> Path:
    """Where trained auto-encoders are kept: the folder given, else beside the decode cache."""
    return Path(store_dir) if store_dir is not None else default_cache_dir() / "autoencoders"


def train_run(
    dataset: ImageDataset,
    out: str | os.PathLike,
    ae_cfg: AutoEncoderConfig,
    la_cfg: LAConfig,
    run: RunOptions = RunOptions(),
    store_dir: str | os.PathLike | None = None,
    stage1: Stage1 | None = None,
) -> dict:
    """Stage 1 (given, or reused from the store when trained before), stage 2, evaluation; writes OUT's files."""
    seed, device, callback, progress = run.seed, run.device, run.callback, run.progress
    device = resolve_device(device)  # a device this machine lacks fails before anything is created
    out = Path(out)
    with naming_full_disk(out, "checkpoints/"):
        (out / "checkpoints").mkdir(parents=True, exist_ok=True)
    if dataset.image_size != ae_cfg.image_size:
        raise ConfigError(f"image_size {ae_cfg.image_size}: the data set was decoded at {dataset.image_size} px")
    la_cfg.check_data_size(len(dataset))
    if stage1 is None:
        store_dir = store_folder(store_dir)
        stage1 = stored_stage1(
            dataset,
            ae_cfg,
            [la_cfg.merger],
            seed,
            device,
            store_dir,
            callback,
            progress,
            (la_cfg.holdout, la_cfg.holdout_seed),
            run.on_progress,
            run.progress_s,
        )
    baselines = stage1.baselines[la_cfg.merger]
    heldout = holdout_mask(dataset.labels, la_cfg.holdout, la_cfg.holdout_seed)

    def metrics_of(scores: dict, la_history: list) -> dict:
        return {
            **scores,
            "baselines": baselines,
            "history": stage1.history + la_history,
            "n_images": len(dataset),
            "n_labels": len(dataset.class_names),
            "data": dataset.spec,
            "seed": seed,
            "device": str(device),
            "autoencoder": {
                "key": stage1.key,
                "source": stage1.source,
                "trained_in_this_run": stage1.trained_in_this_run,
            },
            "config": {"autoencoder": dataclasses.asdict(ae_cfg), "la": dataclasses.asdict(la_cfg)},
        }

    def write_outputs(la_history: list, codes: torch.Tensor, assignments: np.ndarray) -> dict:
        # Every epoch, so that a run stopped at a report (ASHA, Ctrl-C) still leaves its latest outputs.
        # Each file atomically, metrics.json last; a full disk stops the run naming `out` (laray.errors).
        if codes_file.holds(codes):
            codes_file.publish()
        else:
            write_codes(out / "codes.npy", codes)
        write_assignments(out / "assignments.csv", dataset, assignments, heldout)
        scores = {k: v for k, v in la_history[-1].items() if k.removeprefix(PREFIX) in SCORE_NAMES}
        metrics = metrics_of(scores, la_history)
        write_json(out / "metrics.json", metrics)
        return metrics

    codes_file = CodesFile(out / "codes.npy")
    try:
        result = finetune_la(
            dataset,
            stage1.encoder_state,
            ae_cfg,
            la_cfg,
            dataclasses.replace(run, device=device),
            checkpoint=out / "checkpoints" / "la.ckpt",
            on_evaluated=write_outputs,
            codes_buffer=codes_file.new,
        )
        if not result.history:  # zero LA epochs: score the encoder as it is
            return write_outputs([{"stage": STAGE_LA, "epoch": 0, **result.scores}], result.codes, result.assignments)
        return write_outputs(result.history, result.codes, result.assignments)
    finally:
        codes_file.discard()
