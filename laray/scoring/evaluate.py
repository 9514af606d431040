"""Evaluation of an encoder: unit codes of every image, k-means with K = number of species, scores.

Purity grows with the number of clusters, so the score that the sweep optimises is
always computed with K = the number of species, never with the LA clusterings.
Without labels, the silhouette of the codes under the same k-means stands in.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from laray.data.dataset import model_batch
from laray.data.prefetch import BatchPrefetcher
from laray.method.clustering import kmeans
from laray.scoring.holdout import PREFIX
from laray.scoring.metrics import cluster_scores
from laray.settings.config import UNLABELLED_CLUSTERS

# k-means restarts per evaluation (best inertia kept): with few, the same codes score far apart from one
# evaluation seed to another (benchmarks/eval_restarts.py measures the spread; docs/benchmarks.md).
N_INIT = 20
SILHOUETTE_SAMPLE = 5000  # silhouette is O(n^2): score a fixed random sample of this many codes


@torch.no_grad()
def encode_all(
    encoder: torch.nn.Module,
    dataset,
    device: torch.device,
    batch_size: int = 256,
    autocast: bool = False,
    prefetch: int = 3,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Unit codes (N, d) float32 of every image in index order, the encoder in eval mode.

    out: the (N, d) float32 tensor to fill, on any device (a memory-mapped file's, or the memory
    bank itself), so that no second N x d array is made; by default a new one on the CPU.
    prefetch: batches read ahead by a background thread (laray.data.prefetch); 0 reads in the loop.
    autocast: bf16 autocast and channels_last batches, as the stage trains (laray.training.stages.uses_bf16);
    the codes are float32 either way, cast before they are normalised.
    """
    was_training = encoder.training
    encoder.eval()
    codes = out  # filled in place: a list of batches then torch.cat would hold the codes twice
    batches = [np.arange(start, min(start + batch_size, len(dataset))) for start in range(0, len(dataset), batch_size)]
    try:
        with BatchPrefetcher(dataset, batches, device, prefetch) as feed:
            for idx, images in feed:
                x = model_batch(images, device, channels_last=autocast)
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                    batch = F.normalize(encoder(x).float(), dim=1)
                if codes is None:
                    codes = torch.empty(len(dataset), batch.shape[1])
                codes[idx[0] : idx[-1] + 1] = batch.to(codes.device)
    finally:
        encoder.train(was_training)
    return codes


def score_codes(
    codes: torch.Tensor,
    labels: np.ndarray,
    n_clusters: int | None = None,
    seed: int = 0,
    n_init: int = N_INIT,
    device: str | torch.device = "cpu",
    heldout: np.ndarray | None = None,
) -> tuple[dict, np.ndarray]:
    """k-means on the codes (K = number of species unless given, best inertia of n_init seeds) -> (scores, assignments).

    Labelled data: purity, nmi, ari, acc. Unlabelled (all labels -1): silhouette (cosine).
    heldout: a mask (laray.scoring.holdout): every code is clustered, the plain scores count the images
    outside it and heldout_purity... those inside it.
    device: where k-means runs. Training passes its own: at Danish Fungi size (N = 276,000,
    K = 1,604) the CPU would take tens of minutes per evaluation while the GPU waited.
    """
    labelled = bool((labels >= 0).any())
    if n_clusters is None:
        n_clusters = len(np.unique(labels[labels >= 0])) if labelled else UNLABELLED_CLUSTERS
    n_clusters = max(1, min(n_clusters, len(codes)))
    x = codes.to(device).float()
    best = None  # only the best run is kept: 20 runs' labels would be 20 more N-long arrays
    for i in range(n_init):
        run = kmeans(x, n_clusters, seed=seed + i)
        if best is None or run.inertia < best.inertia:
            best = run
        del run
    assignments = best.labels.cpu().numpy()
    if labelled:
        known = labels >= 0
        if heldout is None:
            return cluster_scores(labels[known], assignments[known]), assignments
        selected, held = known & ~heldout, known & heldout
        scores = cluster_scores(labels[selected], assignments[selected])
        scores.update({PREFIX + k: v for k, v in cluster_scores(labels[held], assignments[held]).items()})
        return scores, assignments
    from sklearn.metrics import silhouette_score

    if not 2 <= len(np.unique(assignments)) <= len(codes) - 1:  # the silhouette's own limits
        return {"silhouette": float("nan")}, assignments
    sample = min(SILHOUETTE_SAMPLE, len(codes))
    score = silhouette_score(codes.numpy(), assignments, metric="cosine", sample_size=sample, random_state=seed)
    return {"silhouette": float(score)}, assignments
