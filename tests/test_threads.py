"""torch's threads: the cores this process may use, and one thread for small k-means."""

import os

import torch

from laray.method import clustering
from laray.threads import idle_cores, size_threads, threads, usable_cores


def test_the_cores_a_process_may_use_are_its_affinity():
    assert usable_cores() == len(os.sched_getaffinity(0))


def test_size_threads_and_the_block_that_changes_them_for_a_while():
    before = torch.get_num_threads()
    try:
        assert size_threads(2) == 2 and torch.get_num_threads() == 2
        with threads(1):
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 2
        assert size_threads() == idle_cores() == torch.get_num_threads()
        assert 1 <= idle_cores() <= usable_cores()
    finally:
        torch.set_num_threads(before)


def test_a_small_kmeans_runs_on_one_thread_and_gives_what_it_gives_on_two(monkeypatch):
    x = torch.randn(600, 16, generator=torch.Generator().manual_seed(0))
    seen = []
    real = clustering._assign

    def assign(*args):
        seen.append(torch.get_num_threads())
        return real(*args)

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        monkeypatch.setattr(clustering, "_assign", assign)
        small = clustering.kmeans(x, 8, seed=3)
        assert set(seen) == {1} and torch.get_num_threads() == 2  # one thread inside, two again after
        seen.clear()
        monkeypatch.setattr(clustering, "SMALL_WORK", 0)  # the same k-means taken as large: every thread
        large = clustering.kmeans(x, 8, seed=3)
        assert set(seen) == {2}
    finally:
        torch.set_num_threads(before)
    assert torch.equal(small.labels, large.labels) and abs(small.inertia - large.inertia) < 1e-3 * large.inertia
