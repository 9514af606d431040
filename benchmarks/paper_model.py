"""The DF20 sweep on paper (docs/benchmarks.md): hours from counted FLOPs at 40 % of each processor's peak.

A projection.

The FLOPs per image come from benchmarks/train_throughput.py (FlopCounterMode); k-means costs
2·N·K·d a Lloyd pass (laray.method.clustering), at most 100 passes after k-means++ (counted as 2 passes),
laray.scoring.evaluate.N_INIT restarts per evaluation. Nothing here is measured: it prints the tables of
docs/benchmarks.md's "A DF20 sweep on paper" from these inputs.

Stage 1 over W data-parallel workers (Ray Train, DistributedDataParallel; docs/benchmarks.md's "Stage 1 over
all GPUs"): each worker computes 1/W of every step's batch, the steps per epoch stay one worker's, and each
step adds DDP's ring all-reduce of the auto-encoder's gradients (2(W-1)/W x gradient bytes through each GPU's
link), overlapped with the backward pass or not; rank 0 evaluates while the others wait.

    python benchmarks/paper_model.py                       # with laray's evaluation restarts
    python benchmarks/paper_model.py --restarts 5          # as the model read before evaluations kept 20
    python benchmarks/paper_model.py --link-fraction 0.2   # stage 1 over all GPUs at half the links' assumed rate
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

# Stage 1 over W workers. The global batch is one worker's (the space's 64): each worker takes 64 / W of it.
STAGE1_BATCH = 64
FORWARD_SHARE = 1 / 3  # of STAGE1_STEP: the auto-encoder's forward is about 2 x ENCODE (61.4 of 184 GFLOP)
LINK_FRACTION = 0.4  # of each link's peak, the same share as the FLOPs': an assumption, not a measurement
LINKS = {  # each GPU's peak bytes/s one way to the others in one instance
    "A10G": ("PCIe Gen4 x16, no NVLink (g5.12xlarge: 4, g5.48xlarge: 8)", 31.5e9),
    "H100 SXM": ("NVLink 4 through NVSwitch (p5.48xlarge: 8)", 450e9),
}


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


def autoencoder_parameters(arch: str = "vgg16_bn") -> int:
    """Parameters of the whole auto-encoder (encoder and decoder), counted by torch on the meta device
    (no weights made, nothing downloaded): what DDP all-reduces the gradients of."""
    import torch

    from laray.method.models import AutoEncoderVGG

    with torch.device("meta"):
        model = AutoEncoderVGG(arch)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def allreduce_seconds(grad_bytes: float, workers: int, bandwidth: float) -> float:
    """Ring all-reduce: each GPU sends (and receives) 2(W-1)/W of the gradient bytes over its link."""
    return 2 * (workers - 1) / workers * grad_bytes / bandwidth


def stage1_step(gpu: str, workers: int, grad_bytes: float, link_fraction: float = LINK_FRACTION) -> dict:
    """Seconds of one stage-1 step (the global batch of STAGE1_BATCH) over `workers` GPUs of the kind."""
    compute = STAGE1_BATCH / workers * STAGE1_STEP / PEAKS[gpu][0]
    forward, backward = FORWARD_SHARE * compute, (1 - FORWARD_SHARE) * compute
    comm = allreduce_seconds(grad_bytes, workers, LINKS[gpu][1] * link_fraction)
    return {
        "compute": compute,
        "backward": backward,
        "all-reduce": comm,
        "overlapped": forward + max(backward, comm),  # DDP reduces each bucket as the backward pass fills it
        "no overlap": forward + backward + comm,  # the upper bound
    }


def stage1_seconds(s: dict, step: dict, overlap: bool = True) -> float:
    """Stage 1 with its training steps split over the workers: the steps per epoch are one worker's
    (N / STAGE1_BATCH); the evaluation after each epoch (encode, k-means) and the baselines on one GPU."""
    epoch = N / STAGE1_BATCH * step["overlapped" if overlap else "no overlap"]
    return STAGE1_EPOCHS * (epoch + s["encode"] + s["eval k-means"]) + s["raw baseline"] + s["eval k-means"]


def confirmation_stage1(stage1_over: dict, gpus: int, seeds: int = CONFIRM_SEEDS) -> tuple[float, int]:
    """(seconds, workers a seed) of the confirmation's stage 1 for `seeds` seeds on `gpus` GPUs, laid out
    as ends soonest: w workers a seed run gpus // w seeds at a time (w = 1: the seeds at once, a GPU each;
    w = gpus: each seed over all of them, one after another). stage1_over: seconds of stage 1 over w workers."""
    return min((math.ceil(seeds / (gpus // w)) * stage1_over[w], w) for w in range(1, gpus + 1))


def sweep_hours(
    s: dict, gpus: int, confirm_runs=CONFIRM_RUNS, confirm_seeds=CONFIRM_SEEDS, stage1_over: dict | None = None
) -> dict:
    """Hours of the sweep on `gpus` GPUs. stage1_over: seconds of stage 1 over w workers (DDP) for each w up
    to `gpus`, the search's over all of them; None: stage 1 on one GPU (before the data-parallel stage 1)."""
    h = {
        "stage 1": (s["stage 1"] if stage1_over is None else stage1_over[gpus]) / 3600,
        "trials": (LA_EPOCHS_OF_TRIALS * s["LA epoch"] + TRIALS * s["encode"]) / gpus / 3600,
    }
    h["search"] = h["stage 1"] + h["trials"]
    h["confirm stage 1"] = math.ceil(confirm_seeds / gpus) * s["stage 1"] / 3600  # the seeds at once, a GPU each
    if stage1_over is not None:
        seconds, h["confirm workers a seed"] = confirmation_stage1(stage1_over, gpus, confirm_seeds)
        h["confirm stage 1"] = seconds / 3600
    h["confirm runs"] = (confirm_runs * LA_EPOCHS * s["LA epoch"] + confirm_runs * s["encode"]) / gpus / 3600
    h["total"] = h["search"] + h["confirm stage 1"] + h["confirm runs"]
    return h


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--restarts", type=int, default=N_INIT, help="k-means restarts per evaluation (default: laray's, %(default)s)"
    )
    parser.add_argument(
        "--link-fraction",
        type=float,
        default=LINK_FRACTION,
        help="share of each GPU link's peak the all-reduce gets (default: %(default)s)",
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
    print_stage1_over_all(units, args.link_fraction)
    return 0


def print_stage1_over_all(units: dict, link_fraction: float) -> None:
    """Stage 1 over all of a machine's GPUs (DDP) against stage 1 on one GPU, and what the sweep takes then."""
    params = autoencoder_parameters()
    grad = 4 * params  # float32 gradients: the parameters stay float32 under bf16 autocast
    print(
        "\nSTAGE 1 OVER ALL GPUS (Ray Train, DDP): PROJECTION from counted FLOPs and assumed link rates\n"
        f"gradient all-reduced a step: {params:,} parameters (vgg16_bn auto-encoder, encoder and decoder) "
        f"x 4 bytes = {grad / 1e6:.1f} MB"
    )
    for gpu, (link, peak) in LINKS.items():
        rate = f"{peak / 1e9:.1f} GB/s peak, at {100 * link_fraction:.0f} % {peak * link_fraction / 1e9:.1f} GB/s"
        print(f"{gpu}: {link}, {rate}")
    columns = [(g, n) for g in PEAKS for n in (1, 4, 8)]
    names = "".join(f"{f'{g} x {n}':>14}" for g, n in columns)
    steps = {c: stage1_step(*c, grad, link_fraction) for c in columns}
    print(f"\n{'stage-1 step, global batch 64':<34}{names}")
    print(f"{'images a worker':<34}" + "".join(f"{STAGE1_BATCH // n:>14}" for _, n in columns))
    for key in ("compute", "backward", "all-reduce", "overlapped", "no overlap"):
        print(f"{key + ', ms':<34}" + "".join(f"{steps[c][key] * 1e3:>14.1f}" for c in columns))
    # the link rate at which the all-reduce takes as long as the backward pass: above it, DDP hides it
    hidden = [f"{2 * (n - 1) / n * grad / steps[(g, n)]['backward'] / 1e9:.1f}" if n > 1 else "-" for g, n in columns]
    print(f"{'all-reduce hidden above, GB/s':<34}" + "".join(f"{h:>14}" for h in hidden))
    over = {  # seconds of stage 1 over w workers of each kind, overlapped and not
        (g, w, overlap): stage1_seconds(units[g], stage1_step(g, w, grad, link_fraction), overlap)
        for g in PEAKS
        for w in range(1, 9)
        for overlap in (True, False)
    }
    before = {c: sweep_hours(units[c[0]], c[1]) for c in columns}
    after = {
        (g, n): sweep_hours(units[g], n, stage1_over={w: over[(g, w, True)] for w in range(1, n + 1)})
        for g, n in columns
    }
    bound = {(g, n): over[(g, n, False)] / 3600 for g, n in columns}
    for h in (*before.values(), *after.values()):
        h["share"] = 100 * h["stage 1"] / h["search"]
    print(f"\n{'stage 1 over all GPUs, hours':<34}{names}")
    for label, figures, key in (
        ("before: stage 1 on one GPU", before, "stage 1"),
        ("before: its share of the search, %", before, "share"),
        ("before: search", before, "search"),
        ("after: stage 1 over all, overlap", after, "stage 1"),
        ("after: stage 1, no overlap", bound, None),
        ("after: its share of the search, %", after, "share"),
        ("after: search", after, "search"),
        ("before: confirmation's stage 1", before, "confirm stage 1"),
        ("after: confirmation's stage 1", after, "confirm stage 1"),
        ("before: search and confirmation", before, "total"),
        ("after: search and confirmation", after, "total"),
    ):
        digits = 0 if key == "share" else 2
        print(
            f"{label:<34}" + "".join(f"{figures[c] if key is None else figures[c][key]:>14.{digits}f}" for c in columns)
        )
    print(
        f"{'confirmation: workers a seed':<34}" + "".join(f"{after[c]['confirm workers a seed']:>14}" for c in columns)
    )
    for g in PEAKS:
        u, h = units[g], after[(g, 8)]
        waiting = STAGE1_EPOCHS * (u["encode"] + u["eval k-means"]) + u["raw baseline"] + u["eval k-means"]
        print(
            f"{g} x 8: rank 0's evaluations and the baselines, the other workers waiting, are "
            f"{100 * waiting / 3600 / h['stage 1']:.0f} % of stage 1 over all"
        )


if __name__ == "__main__":
    sys.exit(main())
