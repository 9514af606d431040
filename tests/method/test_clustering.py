"""Seeded k-means and top-k neighbour search."""

import numpy as np
import pytest
import torch
from sklearn.cluster import KMeans
from sklearn.metrics import adjusted_rand_score

from laray.method import clustering
from laray.method.clustering import kmeans


def blobs(n_per=50, n_blobs=5, d=16, spread=0.05, seed=0):
    gen = torch.Generator().manual_seed(seed)
    centres = torch.randn(n_blobs, d, generator=gen) * 3
    x = centres.repeat_interleave(n_per, 0) + spread * torch.randn(n_per * n_blobs, d, generator=gen)
    return x, torch.arange(n_blobs).repeat_interleave(n_per)


@pytest.mark.parametrize("init", ["k-means++", "random"])
def test_kmeans_recovers_separated_blobs(init):
    x, truth = blobs()
    # k-means++ always finds the blobs; random init may merge two, so take the best of a few seeds.
    best = min((kmeans(x, 5, seed=s, init=init) for s in range(5)), key=lambda r: r.inertia)
    assert adjusted_rand_score(truth.numpy(), best.labels.numpy()) == 1.0
    if init == "k-means++":
        assert adjusted_rand_score(truth.numpy(), kmeans(x, 5, seed=0).labels.numpy()) == 1.0


def test_kmeans_inertia_close_to_scikit_learn_on_random_data():
    x = torch.rand(3000, 10, generator=torch.Generator().manual_seed(1))
    ours = np.mean([kmeans(x, 25, seed=s).inertia for s in range(3)])
    theirs = np.mean([KMeans(25, n_init=1, random_state=s).fit(x.numpy()).inertia_ for s in range(3)])
    assert ours <= 1.03 * theirs


def test_kmeans_result_is_consistent():
    x, _ = blobs(n_per=30, spread=1.0, seed=2)
    result = kmeans(x, 7, seed=3)
    # Labels are the nearest centroids and the inertia is their summed squared distance.
    d2 = torch.cdist(x, result.centroids) ** 2
    assert torch.equal(result.labels, d2.argmin(1))
    assert result.inertia == pytest.approx(d2.min(1).values.sum().item(), rel=1e-4)
    assert 1 <= result.n_iter <= 100


def test_kmeans_is_deterministic_per_seed():
    x = torch.randn(500, 8, generator=torch.Generator().manual_seed(0))
    a, b, c = kmeans(x, 10, seed=4), kmeans(x, 10, seed=4), kmeans(x, 10, seed=5)
    assert torch.equal(a.labels, b.labels) and torch.equal(a.centroids, b.centroids)
    assert not torch.equal(a.labels, c.labels)


@pytest.mark.parametrize("seed", range(5))
def test_kmeans_reseeds_empty_clusters(seed):
    # Four distinct points, two of them heavily duplicated: random init nearly always draws
    # duplicates, whose clusters empty; re-seeding must still find all four points.
    x = torch.cat([torch.zeros(50, 2), torch.ones(50, 2), torch.tensor([[5.0, 0.0], [0.0, 5.0]])])
    result = kmeans(x, 4, seed=seed, init="random")
    assert result.inertia == 0.0
    assert len(torch.unique(result.labels)) == 4


def test_kmeans_more_clusters_than_distinct_points_does_not_crash():
    x = torch.cat([torch.zeros(10, 3), torch.ones(10, 3)])
    result = kmeans(x, 5, seed=0)
    assert result.inertia == 0.0 and result.labels.max() < 5


def test_kmeans_chunked_equals_unchunked(monkeypatch):
    x = torch.randn(400, 6, generator=torch.Generator().manual_seed(7))
    whole = kmeans(x, 9, seed=1)
    monkeypatch.setattr(clustering, "CHUNK_ELEMENTS", 50)  # chunks of 5 rows
    chunked = kmeans(x, 9, seed=1)
    assert torch.equal(whole.labels, chunked.labels)


@pytest.mark.parametrize("bad", [{"n_clusters": 0}, {"n_clusters": 11}, {"init": "kmeans|| "}])
def test_kmeans_rejects_bad_arguments(bad):
    args = {"n_clusters": 3, **bad}
    with pytest.raises(ValueError):
        kmeans(torch.randn(10, 2), **args)
