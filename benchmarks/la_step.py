"""Time one Local Aggregation training step: laray's way against a direct implementation.

A step is the loss on a batch of codes plus its backward pass (the encoder is left
out: it costs the same both ways). laray reclusters once per epoch, so its figure
is the step plus one reclustering amortised over the N / batch steps of an epoch.
The direct way, written here as LA is often first implemented, refits R
scikit-learn KMeans and a cosine ball tree on the whole bank for every batch,
builds (batch x N) boolean masks and intersects them in Python, and rebuilds
float64 tensors from numpy.

    python benchmarks/la_step.py            # headline + scaling table (a few minutes on 2 cores)
    python benchmarks/la_step.py --quick    # small sizes, seconds (what the tests run)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time

import numpy as np
import torch

from laray.method.la import LocalAggregationLoss, MemoryBank

HEADLINE = dict(n=5_400, d=512, k=500, R=6, C=100, batch=64, tau=0.07, m=0.5)
QUICK = dict(n=1_000, d=64, k=50, R=2, C=10, batch=64, tau=0.07, m=0.5)
SCALING_SIZES = (5_400, 50_000, 276_000)
QUICK_SIZES = (500, 1_000, 2_000)


def laray_step_times(cfg: dict, steps: int, device: str) -> dict:
    """Seconds for one reclustering and for one loss+backward, median of `steps` batches."""
    torch.manual_seed(0)
    bank = MemoryBank(cfg["n"], cfg["d"], cfg["m"], seed=0, device=device)
    loss_fn = LocalAggregationLoss(bank, cfg["tau"], cfg["k"], cfg["R"], cfg["C"], seed=0)

    def sync():
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    start = time.perf_counter()
    loss_fn.recluster()
    sync()
    recluster_s = time.perf_counter() - start

    times = []
    for step in range(steps + 2):  # two warm-up steps
        codes = torch.randn(cfg["batch"], cfg["d"], device=device, requires_grad=True)
        indices = torch.randperm(cfg["n"], device=device)[: cfg["batch"]]
        sync()
        start = time.perf_counter()
        loss_fn(codes, indices).backward()
        bank.update(indices, codes)
        sync()
        if step >= 2:
            times.append(time.perf_counter() - start)
    step_s = float(np.median(times))
    steps_per_epoch = math.ceil(cfg["n"] / cfg["batch"])
    return {"recluster_s": recluster_s, "step_s": step_s, "amortised_s": step_s + recluster_s / steps_per_epoch}


def direct_step(bank: np.ndarray, codes: torch.Tensor, indices: np.ndarray, cfg: dict) -> float:
    """One step done the direct way; returns the loss."""
    from scipy.spatial.distance import cosine as cosine_distance
    from sklearn.cluster import KMeans
    from sklearn.neighbors import NearestNeighbors

    n = len(bank)
    codes = codes.double()  # float64 rebuilt every step
    code_np = codes.detach().numpy()
    code_np = code_np / np.linalg.norm(code_np, axis=1, keepdims=True)
    for i, v in zip(indices, code_np):  # bank update inside the loss, one row at a time
        bank[i] = cfg["m"] * v + (1 - cfg["m"]) * bank[i]

    def masks(rows):  # dense (batch, N) boolean masks
        out = []
        for row in rows:
            mask = np.full(n, False)
            mask[np.asarray(row, dtype=int)] = True
            out.append(mask)
        return np.array(out)

    # Ball tree with a Python cosine metric, refit on the whole bank.
    finder = NearestNeighbors(n_neighbors=cfg["k"] + 1, algorithm="ball_tree", metric=cosine_distance)
    background = masks(finder.fit(bank).kneighbors(code_np, return_distance=False))
    # R k-means fits on the whole bank, every batch.
    members = [np.array([], dtype=int)] * len(indices)
    for r in range(cfg["R"]):
        labels = KMeans(cfg["C"], init="random", n_init=1, random_state=r).fit(bank).labels_
        for b, c in enumerate(labels[indices]):
            members[b] = np.union1d(members[b], np.where(labels == c)[0]).astype(int)
    close = masks(members)
    both = np.array([[x and y for x, y in zip(bx, cx)] for bx, cx in zip(background, close)])

    v = torch.nn.functional.normalize(codes, dim=1)

    def density(mask):  # ragged sets: a loop over the batch
        out = []
        for b in range(len(v)):
            vals = torch.tensor(np.compress(mask[b], bank, axis=0))
            out.append(torch.exp(vals @ v[b] / cfg["tau"]).sum())
        return torch.stack(out)

    loss = (torch.log(density(background)) - torch.log(density(both))).mean()
    loss.backward()
    return loss.item()


def direct_time(cfg: dict, steps: int) -> float:
    rng = np.random.default_rng(0)
    bank = rng.standard_normal((cfg["n"], cfg["d"]))
    bank /= np.linalg.norm(bank, axis=1, keepdims=True)
    times = []
    for _ in range(steps):
        codes = torch.randn(cfg["batch"], cfg["d"], requires_grad=True)
        indices = rng.choice(cfg["n"], cfg["batch"], replace=False)
        start = time.perf_counter()
        direct_step(bank, codes, indices, cfg)
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def _proc_status_mib(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024  # reported in KiB
    raise RuntimeError(f"no {field} in /proc/self/status")


def scaling_point(cfg: dict, steps: int, device: str) -> dict:
    """Run in a fresh process so that its peak memory is its own: peak RSS above the RSS after imports."""
    baseline = _proc_status_mib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:  # reset the peak (VmHWM) to the current RSS
        f.write("5")
    result = laray_step_times(cfg, steps, device)
    if device.startswith("cuda"):
        result["extra_peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
    else:
        result["extra_peak_mib"] = _proc_status_mib("VmHWM") - baseline
    return result


def run_scaling(base: dict, sizes, steps: int, device: str) -> list[dict]:
    rows = []
    for n in sizes:
        cfg = {**base, "n": n}
        out = subprocess.run(
            [sys.executable, __file__, "--point", json.dumps(cfg), "--steps", str(steps), "--device", device],
            capture_output=True,
            text=True,
            check=True,
        )
        rows.append({"n": n, **json.loads(out.stdout.strip().splitlines()[-1])})
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes for a smoke test (seconds)")
    parser.add_argument("--steps", type=int, default=20, help="timed laray steps per measurement")
    parser.add_argument("--direct-steps", type=int, default=3, help="timed direct-way steps (each takes seconds)")
    parser.add_argument("--device", default="cpu", help="torch device for laray's way (cpu, cuda)")
    parser.add_argument("--no-scaling", action="store_true", help="skip the N scaling table")
    parser.add_argument("--point", help=argparse.SUPPRESS)  # internal: one scaling row in a child process
    args = parser.parse_args(argv)

    if args.point:
        print(json.dumps(scaling_point(json.loads(args.point), args.steps, args.device)))
        return 0

    cfg, sizes = (QUICK, QUICK_SIZES) if args.quick else (HEADLINE, SCALING_SIZES)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {args.device}")
    print("config: " + ", ".join(f"{k}={v}" for k, v in cfg.items()))

    ours = laray_step_times(cfg, args.steps, args.device)
    direct_s = direct_time(cfg, args.direct_steps)
    print(f"laray  reclustering (R={cfg['R']} k-means runs): {ours['recluster_s'] * 1e3:9.1f} ms, once per epoch")
    print(f"laray  step (loss + backward + bank update):  {ours['step_s'] * 1e3:9.2f} ms")
    print(f"laray  step, reclustering amortised:           {ours['amortised_s'] * 1e3:9.2f} ms")
    print(f"direct step (refit per batch, masks):          {direct_s * 1e3:9.1f} ms  (median of {args.direct_steps})")
    print(f"speed-up, amortised: {direct_s / ours['amortised_s']:.0f}x")

    if not args.no_scaling:
        print(f"\nscaling with N (d={cfg['d']}, k={cfg['k']}, R={cfg['R']}, C={cfg['C']}, batch={cfg['batch']}):")
        print(
            f"{'N':>9} {'step ms':>9} {'recluster s':>12} {'amortised ms':>13} {'peak MiB':>9}"
            f" {'N ratio':>8} {'time ratio':>11} {'peak ratio':>11}"
        )
        rows = run_scaling(cfg, sizes, args.steps, args.device)
        first = rows[0]
        for row in rows:  # ratios to the first row: linear growth keeps them at or below the N ratio
            print(
                f"{row['n']:>9,} {row['step_s'] * 1e3:>9.2f} {row['recluster_s']:>12.2f} "
                f"{row['amortised_s'] * 1e3:>13.2f} {row['extra_peak_mib']:>9.0f} {row['n'] / first['n']:>8.1f} "
                f"{row['amortised_s'] / first['amortised_s']:>11.1f} "
                f"{row['extra_peak_mib'] / max(first['extra_peak_mib'], 1):>11.1f}"
            )
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    sys.exit(main())
