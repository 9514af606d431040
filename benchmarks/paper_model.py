"""The DF20 sweep on paper (docs/benchmarks.md): hours from counted FLOPs at 40 % of each processor's peak.

A projection.

The FLOPs per image come from benchmarks/train_throughput.py (FlopCounterMode); k-means costs
2·N·K·d a Lloyd pass (laray.method.clustering), at most 100 passes after k-means++ (counted as 2 passes),
laray.scoring.evaluate.N_INIT restarts per evaluation. Nothing here is measured: it prints the tables of
docs/benchmarks.md's "A DF20 sweep on paper" from these inputs.

    python benchmarks/paper_model.py                # with laray's evaluation restarts
    python benchmarks/paper_model.py --restarts 5   # as the model read before evaluations kept 20
"""

from __future__ import annotations

import argparse
import math
import sys

from laray.scoring.evaluate import N_INIT

N, K, D = 276_000, 1_604, 512  # DF20 images, species, code length (vgg16_bn, mean merger)
GFLOP = 1e9
STAGE1_STEP, LA_STEP_BF16, LA_STEP_F32, ENCODE = 184.0 * GFLOP, 91.9 * GFLOP, 0.57 * GFLOP, 30.7 * GFLOP
STAGE1_EPOCHS = 10
TRIALS, LA_EPOCHS_OF_TRIALS = 40, 230  # ASHA: grace 3, factor 4, max_t 20, each rung keeping exactly a quarter
CONFIRM_RUNS, CONFIRM_SEEDS, LA_EPOCHS = 15, 5, 20
KMEANS_PASSES = 1 + 1 + 100  # k-means++ seeding (about two passes' work) and at most 100 Lloyd passes
RECLUSTER = 5.5 * 21 * 2 * N * 873 * D  # R = 5.5 runs x 21 passes at C = 873 (the space's middles)
RAW_D = 32 * 32 * 3  # the raw-pixel baseline's features
PEAKS = {"A10G": (28e12, 14e12), "H100 SXM": (396e12, 27e12)}  # 40 % of dense bf16, float32
CPU = 169e9  # 40 % of a g5.2xlarge's 4 cores, float32


def kmeans_flop(d: int, restarts: int) -> float:
    return restarts * KMEANS_PASSES * 2 * N * K * d


def model(gpu: str, restarts: int, kmeans_on_cpu: bool = False) -> dict:
    """Seconds of each unit of work on one GPU of the kind."""
    bf16, f32 = PEAKS[gpu]
    km = CPU if kmeans_on_cpu else f32
    s = {
        "stage-1 epoch": N * STAGE1_STEP / bf16,
        "encode": N * ENCODE / bf16,
        "LA training": N * LA_STEP_BF16 / bf16 + N * LA_STEP_F32 / f32,
        "recluster": RECLUSTER / f32,
        "eval k-means": kmeans_flop(D, restarts) / km,
        "raw baseline": kmeans_flop(RAW_D, restarts) / km,
    }
    s["LA epoch"] = s["LA training"] + s["recluster"] + s["encode"] + s["eval k-means"]
    s["stage 1"] = (
        STAGE1_EPOCHS * (s["stage-1 epoch"] + s["encode"] + s["eval k-means"]) + s["raw baseline"] + s["eval k-means"]
    )
    return s


def sweep_hours(s: dict, gpus: int, confirm_runs=CONFIRM_RUNS, confirm_seeds=CONFIRM_SEEDS) -> dict:
    h = {
        "stage 1": s["stage 1"] / 3600,
        "trials": (LA_EPOCHS_OF_TRIALS * s["LA epoch"] + TRIALS * s["encode"]) / gpus / 3600,
    }
    h["search"] = h["stage 1"] + h["trials"]
    h["confirm stage 1"] = math.ceil(confirm_seeds / gpus) * s["stage 1"] / 3600
    h["confirm runs"] = (confirm_runs * LA_EPOCHS * s["LA epoch"] + confirm_runs * s["encode"]) / gpus / 3600
    h["total"] = h["search"] + h["confirm stage 1"] + h["confirm runs"]
    return h


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--restarts", type=int, default=N_INIT, help="k-means restarts per evaluation (default: laray's, %(default)s)"
    )
    args = parser.parse_args(argv)
    r = args.restarts
    print(f"PROJECTION from counted FLOPs at 40 % of peak; {r} k-means restarts per evaluation\n")
    print(
        f"k-means per evaluation {kmeans_flop(D, r) / 1e12:,.0f} TFLOP; raw-pixel baseline "
        f"{kmeans_flop(RAW_D, r) / 1e12:,.0f} TFLOP; reclustering {RECLUSTER / 1e12:.1f} TFLOP"
    )
    units = {gpu: model(gpu, r) for gpu in PEAKS}
    print(f"\n{'unit of work':<34}" + "".join(f"{g:>12}" for g in PEAKS))
    for key, label in (
        ("stage-1 epoch", "stage-1 epoch, training"),
        ("encode", "encode of all N"),
        ("LA training", "LA epoch, training"),
        ("recluster", "LA reclustering"),
        ("eval k-means", "evaluation k-means"),
        ("raw baseline", "raw-pixel baseline k-means"),
        ("LA epoch", "one LA epoch (all of it)"),
    ):
        print(f"{label:<34}" + "".join(f"{units[g][key] / 60:>10.1f} m" for g in PEAKS))
    print(f"{'stage 1 (10 epochs, baselines)':<34}" + "".join(f"{units[g]['stage 1'] / 3600:>10.2f} h" for g in PEAKS))
    columns = [(g, n) for g in PEAKS for n in (4, 8)]
    table = {(g, n): sweep_hours(units[g], n) for g, n in columns}
    print(f"\n{'whole sweep, hours':<34}" + "".join(f"{f'{g} x {n}':>14}" for g, n in columns))
    for key in ("stage 1", "trials", "search", "confirm stage 1", "confirm runs", "total"):
        print(f"{key:<34}" + "".join(f"{table[c][key]:>14.2f}" for c in columns))
    small = {g: sweep_hours(units[g], 4, confirm_runs=6, confirm_seeds=3) for g in PEAKS}
    for g in PEAKS:
        full, part = table[(g, 4)], small[g]
        share = (part["confirm stage 1"] + part["confirm runs"]) / (full["confirm stage 1"] + full["confirm runs"])
        print(f"{g}: --confirm-top 2 --confirm-seeds 3 costs {100 * share:.0f} % of the default confirmation on 4 GPUs")
    for g in PEAKS:
        cpu = model(g, r, kmeans_on_cpu=True)
        hours = [sweep_hours(cpu, n)["search"] for n in (4, 8)]
        print(
            f"{g}: evaluation k-means on the CPU instead: {cpu['eval k-means'] / 60:.1f} min an epoch, search "
            f"{hours[0]:.1f} / {hours[1]:.1f} h on 4 / 8 GPUs, an LA epoch "
            f"{100 * cpu['eval k-means'] / cpu['LA epoch']:.0f} % k-means"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
