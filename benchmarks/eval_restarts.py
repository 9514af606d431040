"""How much of a run's purity is the evaluation's own luck: k-means restarts against the spread over its seeds.

For each run folder (what `laray train` or a sweep's trial writes: codes.npy, assignments.csv),
the final codes are clustered again with K = number of labels, keeping the best inertia of R
restarts, for R in --restarts and for several evaluation seeds. The codes do not change, so any
spread across seeds is the evaluation's, not the training's.

    python benchmarks/eval_restarts.py RUN [RUN ...]
    python benchmarks/eval_restarts.py --quick    # a 300-image synthetic set of codes, seconds
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from laray.scoring.evaluate import score_codes


def load_run(folder: Path) -> tuple[torch.Tensor, np.ndarray]:
    codes = torch.from_numpy(np.load(folder / "codes.npy"))
    names = pd.read_csv(folder / "assignments.csv")["label"].fillna("")
    classes = sorted(n for n in names.unique() if n != "")
    index = {n: i for i, n in enumerate(classes)}
    return codes, np.array([index.get(n, -1) for n in names], dtype=np.int64)


def synthetic(n: int = 300, d: int = 16, k: int = 10, seed: int = 0) -> tuple[torch.Tensor, np.ndarray]:
    """Overlapping unit-sphere blobs: a set of codes on which k-means has several local optima."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % k
    codes = torch.randn(k, d, generator=gen)[labels] + 0.9 * torch.randn(n, d, generator=gen)
    return torch.nn.functional.normalize(codes, dim=1), labels.numpy()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="*", type=Path, help="run folders holding codes.npy and assignments.csv")
    parser.add_argument("--restarts", type=int, nargs="+", default=[5, 10, 20, 50])
    parser.add_argument("--seeds", type=int, default=5, help="evaluation seeds per run and restart count")
    parser.add_argument("--quick", action="store_true", help="a synthetic set of codes instead of runs")
    args = parser.parse_args(argv)
    if not args.runs and not args.quick:
        parser.error("give run folders, or --quick")
    sets = [("synthetic", *synthetic())] if args.quick else [(str(r), *load_run(r)) for r in args.runs]
    print(f"purity of the same codes, evaluation seeds 0..{args.seeds - 1}: min-max (spread)")
    print(f"{'run':<40} " + " ".join(f"{f'{r} restarts':>22}" for r in args.restarts))
    for name, codes, labels in sets:
        cells = []
        for restarts in args.restarts:
            began = time.perf_counter()
            scores = [score_codes(codes, labels, seed=s, n_init=restarts)[0]["purity"] for s in range(args.seeds)]
            seconds = (time.perf_counter() - began) / args.seeds
            cells.append(f"{min(scores):.3f}-{max(scores):.3f} ({max(scores) - min(scores):.3f}) {seconds:4.2f}s")
        print(f"{name[-40:]:<40} " + " ".join(f"{c:>22}" for c in cells), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
