"""One run of both stages with one set of hyperparameters, and what it leaves in its folder.

    OUT/metrics.json      final purity, nmi, ari, acc; the baselines; the per-epoch history; the settings
    OUT/assignments.csv   idx, path, label (species name), cluster: one row per image
    OUT/codes.npy         final unit codes (N, d), float32, in idx order
    OUT/checkpoints/      the LA stage's checkpoint (the auto-encoder lives in the reuse store)

`laray train` calls `train_run`; the sweep's trainable calls it too.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from laray.ae_store import get_or_train, store_key
from laray.cache import default_cache_dir
from laray.config import AutoEncoderConfig, LAConfig
from laray.data import ImageDataset
from laray.evaluate import encode_all, score_codes
from laray.models import EncoderVGGMerged
from laray.train import Callback, finetune_la, pretrain_autoencoder, resolve_device

RAW_BASELINE_SIDE = 32  # raw-pixel baseline on images downsampled to at most this side: N x 3,072 floats


def demo_configs() -> tuple[AutoEncoderConfig, LAConfig]:
    """CPU-sized settings for the embedded digits: both stages in a minute or two on 2 cores."""
    ae = AutoEncoderConfig(arch="vgg11_bn", width=0.25, image_size=32, epochs=5, batch_size=64, lr=0.05)
    # The demo sweep's best trial (README, "Quality on digits"): >= raw pixels on 6 of 6 seeds, > on 5.
    la = LAConfig(epochs=10, batch_size=64, lr=0.01, temperature=0.04, mixing_rate=0.2, k_neighbours=300,
                  clustering_repeats=7, n_centroids=240, augment=True)
    return ae, la


def default_configs(spec: str) -> tuple[AutoEncoderConfig, LAConfig]:
    return demo_configs() if spec == "digits" else (AutoEncoderConfig(), LAConfig())


def raw_pixel_codes(dataset: ImageDataset) -> torch.Tensor:
    """Flattened pixels in [0, 1], downsampled (area) to at most RAW_BASELINE_SIDE px: the baseline's features."""
    chunks = []
    for start in range(0, len(dataset), 1024):
        x = dataset.uint8_batch(np.arange(start, min(start + 1024, len(dataset)))).float().div_(255)
        if x.shape[-1] > RAW_BASELINE_SIDE:
            x = F.adaptive_avg_pool2d(x, RAW_BASELINE_SIDE)
        chunks.append(x.flatten(1))
    return torch.cat(chunks)


def write_assignments(path: Path, dataset: ImageDataset, clusters: np.ndarray) -> None:
    names = np.array(dataset.class_names + [""], dtype=object)  # label -1 -> ""
    frame = pd.DataFrame({"idx": np.arange(len(dataset)), "path": dataset.paths,
                          "label": names[dataset.labels], "cluster": clusters})
    tmp = path.with_suffix(".csv.tmp")
    frame.to_csv(tmp, index=False)
    os.replace(tmp, path)


def _write_json(path: Path, obj) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=float))
    os.replace(tmp, path)


def _labels_key(dataset: ImageDataset) -> str:
    """Identifies the images and their labels: the same files scored by another label column differ."""
    digest = hashlib.sha256(dataset.fingerprint.encode())
    digest.update(np.ascontiguousarray(dataset.labels).tobytes())
    digest.update("\n".join(dataset.class_names).encode())
    return digest.hexdigest()[:16]


def _baselines(dataset: ImageDataset, encoder_state: dict, ae_cfg: AutoEncoderConfig, merger: str, seed: int,
               device: torch.device, path: Path) -> dict:
    """Scores for the same K of k-means on raw pixels and on the auto-encoder's codes before LA.

    Kept beside the stored auto-encoder, so that a sweep's trials compute them once.
    """
    if path.exists():
        return json.loads(path.read_text())
    ae_encoder = EncoderVGGMerged(ae_cfg.arch, None, ae_cfg.width, merger)
    ae_encoder.encoder.load_state_dict(encoder_state)
    baselines = {
        "raw_pixels": score_codes(raw_pixel_codes(dataset), dataset.labels, seed=seed)[0],
        "autoencoder": score_codes(encode_all(ae_encoder.to(device), dataset, device), dataset.labels, seed=seed)[0],
    }
    _write_json(path, baselines)
    return baselines


def train_run(dataset: ImageDataset, out: str | os.PathLike, ae_cfg: AutoEncoderConfig, la_cfg: LAConfig,
              seed: int = 0, device="auto", resume: bool = False, store_dir: str | os.PathLike | None = None,
              callback: Callback | None = None, progress: bool = True) -> dict:
    """Stage 1 (reused from the store when trained before), stage 2, evaluation; writes OUT's files."""
    out = Path(out)
    (out / "checkpoints").mkdir(parents=True, exist_ok=True)
    device = resolve_device(device)
    if dataset.image_size != ae_cfg.image_size:
        raise ValueError(f"data decoded at {dataset.image_size} px but image_size is {ae_cfg.image_size}")
    la_cfg.check_data_size(len(dataset))
    store_dir = Path(store_dir) if store_dir is not None else default_cache_dir() / "autoencoders"
    key = store_key(dataset.fingerprint, ae_cfg, seed)

    def train_stage1(checkpoint: Path):
        model, history = pretrain_autoencoder(dataset, ae_cfg, seed, device, checkpoint=checkpoint, resume=True,
                                              callback=callback, progress=progress)
        return {k: v.cpu() for k, v in model.state_dict().items()}, history

    ae_state, ae_history, trained = get_or_train(store_dir, key, train_stage1)
    encoder_state = {k[len("encoder."):]: v for k, v in ae_state.items() if k.startswith("encoder.")}

    baselines = _baselines(dataset, encoder_state, ae_cfg, la_cfg.merger, seed, device,
                           store_dir / key / f"baselines_{la_cfg.merger}_{_labels_key(dataset)}.json")

    def metrics_of(scores: dict, la_history: list) -> dict:
        return {
            **scores,
            "baselines": baselines,
            "history": ae_history + la_history,
            "n_images": len(dataset),
            "n_labels": len(dataset.class_names),
            "data": dataset.spec,
            "seed": seed,
            "device": str(device),
            "autoencoder": {"key": key, "store": str(store_dir), "trained_in_this_run": trained},
            "config": {"autoencoder": dataclasses.asdict(ae_cfg), "la": dataclasses.asdict(la_cfg)},
        }

    def write_outputs(la_history: list, codes: torch.Tensor, assignments: np.ndarray) -> dict:
        # Every epoch, so that a run stopped at a report (ASHA, Ctrl-C) still leaves its latest outputs.
        np.save(out / "codes.npy", codes.numpy().astype(np.float32))
        write_assignments(out / "assignments.csv", dataset, assignments)
        scores = {k: v for k, v in la_history[-1].items() if k in ("purity", "nmi", "ari", "acc", "silhouette")}
        metrics = metrics_of(scores, la_history)
        _write_json(out / "metrics.json", metrics)
        return metrics

    result = finetune_la(dataset, encoder_state, ae_cfg, la_cfg, seed, device, checkpoint=out / "checkpoints" / "la.ckpt",
                         resume=resume, callback=callback, progress=progress, on_evaluated=write_outputs)
    if not result.history:  # zero LA epochs: score the encoder as it is
        return write_outputs([{"stage": "local_aggregation", "epoch": 0, **result.scores}], result.codes,
                             result.assignments)
    metrics = write_outputs(result.history, result.codes, result.assignments)
    return metrics
