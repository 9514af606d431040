"""How much a chunked pass grows glibc's heap: one scratch buffer against a fresh block per chunk.

k-means' assignments (laray.method.clustering._assign) and the LA step (laray.method.la._BackgroundScores) work
in chunks of 16 MiB. Once glibc has freed one such block it raises its mmap threshold above it
(up to 32 MiB), so the next blocks come from the heap; freed between small allocations that last
(the per-chunk labels), they leave holes the next block does not fit, and the heap grows. laray
now reuses one buffer per pass. Each run is a process of its own, so that heaps do not mix: the
resident memory (VmRSS, and RssAnon, the anonymous part; Linux) after the data is made, and after
the k-means or the LA steps. Where the small allocations land differs from process to process, and
with it the per-chunk growth, hence several runs per row and their median. The per-chunk k-means
is `_assign` as it was before the buffer, patched in here; laray.method.la has no switch for per-chunk
blocks, so its steps run only as shipped.

    python benchmarks/heap_growth.py              # N = 276,000, 3 runs per row (under 3 minutes on 2 cores)
    python benchmarks/heap_growth.py --n 20000    # seconds
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys

import torch

import laray.method.clustering
from laray.method.clustering import kmeans
from laray.method.la import LocalAggregationLoss, MemoryBank

DIM, BATCH, K, THREADS = 128, 256, 300, 2


def per_chunk_assign(x: torch.Tensor, x_sq: torch.Tensor, centroids: torch.Tensor):
    """laray.method.clustering._assign before its buffer (74ee188^): a new score matrix every chunk."""
    c_sq = (centroids * centroids).sum(1)
    labels, dists = [], []
    step = laray.method.clustering._rows_per_chunk(len(centroids))
    for start in range(0, len(x), step):
        part = torch.addmm(c_sq, x[start : start + step], centroids.T, alpha=-2.0)  # (chunk, C)
        d, lab = part.min(1)
        labels.append(lab)
        dists.append(d)
    return torch.cat(labels), (torch.cat(dists) + x_sq).clamp_min_(0)


def _memory_mb() -> dict:
    """VmRSS and RssAnon of this process, MB (10^6 bytes)."""
    with open("/proc/self/status") as status:
        kb = {line.split(":")[0]: int(line.split()[1]) for line in status if line.startswith(("VmRSS:", "RssAnon:"))}
    return {"rss": kb["VmRSS"] * 1024 / 1e6, "anon": kb["RssAnon"] * 1024 / 1e6}


def kmeans_point(way: str, n: int, iters: int) -> dict:
    if way == "per-chunk":
        laray.method.clustering._assign = per_chunk_assign  # kmeans looks it up in the module at each call
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, DIM, generator=gen)
    x.div_(x.norm(dim=1, keepdim=True))  # unit rows, in place: no second copy on the heap before we start
    before = _memory_mb()
    # Random init, as LA's reclustering runs it: k-means++ would add C passes of its own allocations.
    # tol=0 so that all `iters` iterations run.
    result = kmeans(x, max(2, n // 100), seed=0, init="random", max_iter=iters, tol=0.0)
    assert result.n_iter == iters, result.n_iter
    return {"before": before, "after": _memory_mb()}


def la_point(n: int, iters: int, steps: int) -> dict:
    """`steps` LA steps as training runs them (loss, backward, bank update), after one reclustering."""
    torch.manual_seed(0)
    bank = MemoryBank(n, DIM, 0.5, seed=0)
    # `iters` k-means iterations, not training's 20: a quarter of the time, the same buffer pattern.
    loss_fn = LocalAggregationLoss(bank, 0.07, min(K, n - 1), 1, max(2, n // 100), seed=0, kmeans_max_iter=iters)
    loss_fn.recluster()  # as at the start of an epoch: the steps begin on the heap k-means left
    gen = torch.Generator().manual_seed(1)
    # clone: a slice would keep each N-long permutation alive, a block of its own between the steps'.
    batches = [
        (torch.randn(BATCH, DIM, generator=gen), torch.randperm(n, generator=gen)[:BATCH].clone()) for _ in range(steps)
    ]
    before = _memory_mb()
    for codes, indices in batches:
        codes.requires_grad_()
        loss_fn(codes, indices).backward()
        bank.update(indices, codes)
    return {"before": before, "after": _memory_mb()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=276_000, help="rows (images); k-means uses N / 100 centroids")
    parser.add_argument("--iters", type=int, default=5, help="k-means iterations (and the LA reclustering's)")
    parser.add_argument("--steps", type=int, default=12, help="LA steps")
    parser.add_argument("--repeats", type=int, default=3, help="processes per row (the growth varies between them)")
    parser.add_argument("--point", help=argparse.SUPPRESS)  # internal: one run, in a child process
    args = parser.parse_args(argv)
    if args.point:
        torch.set_num_threads(THREADS)
        what, way = args.point.split(":")
        out = kmeans_point(way, args.n, args.iters) if what == "kmeans" else la_point(args.n, args.iters, args.steps)
        print(json.dumps(out))
        return 0

    c = max(2, args.n // 100)
    print(
        f"N {args.n:,}, d {DIM}, {THREADS} threads, torch {torch.__version__}; k-means: C {c:,}, random init,"
        f" {args.iters} iterations; LA: batch {BATCH}, k {min(K, args.n - 1)}, C {c:,}, R 1, {args.steps} steps"
    )
    print(
        f"{'pass':<31} {'run':>3} {'RSS before':>10} {'after':>6} {'growth':>6}"
        f" {'anon before':>11} {'after':>6} {'growth':>6}"
    )
    passes = (
        ("kmeans:buffer", "k-means, one buffer (shipped)"),
        ("kmeans:per-chunk", "k-means, a block per chunk"),
        ("la:buffer", "LA steps, one buffer (shipped)"),
    )
    for point, label in passes:
        growth = []
        for run in range(1, args.repeats + 1):
            done = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--point",
                    point,
                    "--n",
                    str(args.n),
                    "--iters",
                    str(args.iters),
                    "--steps",
                    str(args.steps),
                ],
                capture_output=True,
                text=True,
                check=True,
            )
            r = json.loads(done.stdout.strip().splitlines()[-1])
            b, a = r["before"], r["after"]
            growth.append((a["rss"] - b["rss"], a["anon"] - b["anon"]))
            print(
                f"{label:<31} {run:>3} {b['rss']:>10.0f} {a['rss']:>6.0f} {growth[-1][0]:>+6.0f}"
                f" {b['anon']:>11.0f} {a['anon']:>6.0f} {growth[-1][1]:>+6.0f}"
            )
        rss, anon = (statistics.median(g) for g in zip(*growth))
        print(f"{'  median':<31} {'':>3} {'':>10} {'':>6} {rss:>+6.0f} {'':>11} {'':>6} {anon:>+6.0f}")
    print("LA steps, a block per chunk: not measured (laray.method.la has no switch or constant for it)")
    print("MB = 10^6 bytes; before: after the data (and the LA reclustering); each run in its own process")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
