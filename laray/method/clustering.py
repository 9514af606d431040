"""Seeded k-means: a pure function on tensors, CPU or CUDA.

It works in chunks of rows so that the (rows x centroids) score matrix stays bounded
whatever the data set size.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from laray.threads import threads

# Upper bound on the elements of one score matrix chunk (4 Mi floats = 16 MiB in float32): large
# enough for efficient products, small beside a worker's memory whatever N and K. On 2 CPU cores
# (N = 50,000, d = 128, K = 1,604) 10 iterations took 3.75 s with it, 4.54 s with 64 MiB chunks.
CHUNK_ELEMENTS = 1 << 22


# A k-means whose assignment step multiplies fewer numbers than this (N x d x K) runs on one thread on the CPU:
# the digits' evaluation (N = 1,797, d = 128, K = 10 to 50) spends more time in OpenMP's barriers than in its work,
# the more so on a busy machine (laray.threads). Danish Fungi's (N = 276,000) keeps every thread.
SMALL_WORK = 1 << 25


class KMeansResult(NamedTuple):
    labels: torch.Tensor  # (N,) long
    centroids: torch.Tensor  # (C, d)
    inertia: float  # sum of squared distances to the assigned centroid
    n_iter: int


def _rows_per_chunk(n_cols: int) -> int:
    return max(1, CHUNK_ELEMENTS // max(1, n_cols))


def _assign(x: torch.Tensor, x_sq: torch.Tensor, centroids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest centroid of every row of x and the squared distance to it (x_sq: the rows' squared norms)."""
    c_sq = (centroids * centroids).sum(1)  # (C,)
    n, step = len(x), _rows_per_chunk(len(centroids))
    labels = torch.empty(n, dtype=torch.long, device=x.device)
    dists = x.new_empty(n)
    # One score buffer for every chunk: a new 16 MiB block per chunk, freed between small lasting
    # allocations, grew glibc's heap by up to 870 MB in a 5-iteration k-means at N = 276,000 on
    # 2 threads, against about 50 MB with the buffer (benchmarks/heap_growth.py).
    buffer = x.new_empty(min(step, n) * len(centroids))
    for start in range(0, n, step):
        rows = slice(start, min(start + step, n))
        part = buffer[: (rows.stop - start) * len(centroids)].view(rows.stop - start, len(centroids))
        # ||x - c||^2 = ||x||^2 - 2 x.c + ||c||^2; the argmin needs only the last two terms.
        torch.addmm(c_sq, x[rows], centroids.T, alpha=-2.0, out=part)  # (chunk, C)
        torch.min(part, 1, out=(dists[rows], labels[rows]))
    return labels, (dists + x_sq).clamp_min_(0)


def _kmeans_plus_plus(x: torch.Tensor, x_sq: torch.Tensor, n_clusters: int, gen: torch.Generator) -> torch.Tensor:
    """k-means++ seeding (Arthur & Vassilvitskii 2007): each next centre drawn with probability ~ D(x)^2."""
    n = len(x)
    first = torch.randint(n, (1,), generator=gen, device=gen.device)
    centroids = x.new_empty(n_clusters, x.shape[1])
    centroids[0] = x[first]

    def sq_dist(c: torch.Tensor) -> torch.Tensor:  # (N,), without an (N, d) temporary
        return (x_sq - 2 * (x @ c) + c @ c).clamp_min_(0)

    closest = sq_dist(centroids[0])
    for c in range(1, n_clusters):
        weights = closest.double()
        if weights.sum() <= 0:  # fewer distinct points than clusters: any point will do
            weights = torch.ones_like(weights)
        pick = torch.multinomial(weights, 1, generator=gen)
        centroids[c] = x[pick]
        closest = torch.minimum(closest, sq_dist(centroids[c]))
    return centroids


def kmeans(
    x: torch.Tensor, n_clusters: int, seed: int = 0, init: str = "k-means++", max_iter: int = 100, tol: float = 1e-6
) -> KMeansResult:
    """Lloyd's k-means on the rows of `x` (N, d), deterministic for a given seed and device.

    Stops when no label changes, when the relative drop of inertia falls below `tol`,
    or after `max_iter` iterations. A cluster that empties is re-seeded with the point
    farthest from its centroid.
    """
    if x.ndim != 2 or len(x) == 0:
        raise ValueError(f"x must be a non-empty (N, d) tensor, got shape {tuple(x.shape)}")
    n = len(x)
    if not 1 <= n_clusters <= n:
        raise ValueError(f"n_clusters must be in [1, {n}] for {n} points, got {n_clusters}")
    if init not in ("k-means++", "random"):
        raise ValueError(f"unknown init {init!r}; valid: 'k-means++', 'random'")
    if x.device.type == "cpu" and n * x.shape[1] * n_clusters <= SMALL_WORK and torch.get_num_threads() > 1:
        with threads(1):
            return kmeans(x, n_clusters, seed, init, max_iter, tol)
    gen = torch.Generator(device=x.device).manual_seed(seed)
    x_sq = torch.einsum("ij,ij->i", x, x)  # (N,), without the (N, d) temporary that (x * x).sum(1) makes
    if init == "k-means++":
        centroids = _kmeans_plus_plus(x, x_sq, n_clusters, gen)
    else:
        centroids = x[torch.randperm(n, generator=gen, device=x.device)[:n_clusters]].clone()

    labels, dists = _assign(x, x_sq, centroids)
    inertia = dists.sum().item()
    n_iter = 0
    for n_iter in range(1, max_iter + 1):
        # Update step: mean of each cluster's members.
        counts = torch.bincount(labels, minlength=n_clusters)  # (C,)
        sums = torch.zeros_like(centroids).index_add_(0, labels, x)  # (C, d)
        filled = counts > 0
        centroids[filled] = sums[filled] / counts[filled, None].to(x.dtype)
        empty = (~filled).nonzero().flatten()
        if len(empty):
            far = dists.topk(len(empty)).indices
            centroids[empty] = x[far]
        new_labels, dists = _assign(x, x_sq, centroids)
        new_inertia = dists.sum().item()
        unchanged = torch.equal(new_labels, labels) and not len(empty)
        converged = abs(inertia - new_inertia) <= tol * max(inertia, 1e-30)
        labels, inertia = new_labels, new_inertia
        if unchanged or converged:
            break
    return KMeansResult(labels, centroids, inertia, n_iter)
