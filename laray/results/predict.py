"""`laray predict`: assign new images to the clusters of a trained trial.

The trial's encoder comes from its last LA checkpoint; its clusters are the
k-means (K = number of species) of its final codes, whose centroids are the means
of the codes in each cluster (what k-means converged to). A new image goes to the
nearest centroid; the distance is Euclidean between unit codes and centroids.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch

from laray.checkpoint import load_checkpoint
from laray.errors import LarayError
from laray.method.models import EncoderVGGMerged
from laray.results import scores as analysis
from laray.scoring.evaluate import encode_all


def find_trial(experiment: str | Path, trial: str = "best", objective: str = "purity") -> analysis.Trial:
    """A trial by id (or a unique prefix), or the best one by `objective` (silhouette when unlabelled)."""
    trials = analysis.load_trials(experiment)
    if trial != "best":
        matches = [t for t in trials if t.trial_id.startswith(trial) or t.folder.name == trial]
        if len(matches) != 1:
            raise LarayError(
                f"trial {trial!r} matches {len(matches)} trials in {experiment}; ids: {[t.trial_id for t in trials]}"
            )
        return matches[0]
    has_labels = any(t.assignments is not None and analysis.labelled(t.assignments) for t in trials)
    table = analysis.trials_table(trials, {}, with_k=False)
    best = analysis.best_trial(trials, table, objective if has_labels else "silhouette")
    if best is None:
        raise LarayError(f"no trial of {experiment} has finished an LA epoch yet")
    return best


def load_clusterer(trial: analysis.Trial) -> tuple[EncoderVGGMerged, torch.Tensor, np.ndarray, int]:
    """(encoder in eval mode, centroids (K, d), their cluster ids, image size) of a trial."""
    checkpoint = trial.folder / "checkpoints" / "la.ckpt"
    if trial.metrics is None or trial.assignments is None or not checkpoint.exists():
        raise LarayError(f"trial {trial.trial_id} has no finished LA epoch (checkpoint, metrics.json, assignments.csv)")
    ae, la = trial.metrics["config"]["autoencoder"], trial.metrics["config"]["la"]
    encoder = EncoderVGGMerged(ae["arch"], None, ae["width"], la["merger"])
    try:
        state = load_checkpoint(checkpoint)
    except Exception as exc:  # torn or damaged: its .prev is an epoch older than the codes, so no fallback here
        raise LarayError(
            f"cannot read {checkpoint} ({type(exc).__name__}); run the trial again or pick another with --trial"
        ) from None
    encoder.load_state_dict(state["model"])
    encoder.eval()
    codes = torch.from_numpy(np.load(trial.folder / "codes.npy"))
    clusters = trial.assignments["cluster"].to_numpy()
    ids = np.unique(clusters)
    centroids = torch.stack([codes[torch.from_numpy(clusters == c)].mean(0) for c in ids])  # (K, d)
    return encoder, centroids, ids, ae["image_size"]


def predict(
    experiment: str | Path,
    spec: str,
    out_csv: str | Path,
    trial: str = "best",
    device="cpu",
    cache_dir: str | None = None,
    image_root: str | None = None,
    path_column: str = "image_path",
) -> pd.DataFrame:
    """Write path, cluster, distance for every image of `spec` (labels not needed) and return the frame."""
    from laray.data.dataset import load_dataset

    chosen = find_trial(experiment, trial)
    encoder, centroids, ids, image_size = load_clusterer(chosen)
    dataset = load_dataset(
        spec, image_size, label_column=None, path_column=path_column, image_root=image_root, cache_dir=cache_dir
    )
    device = torch.device(device)
    codes = encode_all(encoder.to(device), dataset, device)  # (N, d) unit codes
    distances = torch.cdist(codes, centroids)  # (N, K)
    nearest = distances.min(1)
    frame = pd.DataFrame(
        {"path": dataset.paths, "cluster": ids[nearest.indices.numpy()], "distance": nearest.values.numpy()}
    )
    out_csv = Path(out_csv)
    out_csv.parent.mkdir(parents=True, exist_ok=True)
    frame.to_csv(out_csv, index=False)
    return frame
