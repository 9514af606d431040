"""Stage 1 on 1 worker against 2 data-parallel workers (Ray Train, DDP over gloo), side by side in one run.

For each seed, the same stage 1 (the digits demo's settings unless told otherwise) trained by
laray.sweep.stage1_ddp with 1 worker and with 2: the loss after each epoch, the purity of k-means on the
auto-encoder's codes after the last, and the wall time (Ray Train's start included). The spread of
1-worker purity across seeds is the yardstick the 2-worker difference is read against (docs/training.md).
Each worker takes one CPU and one torch thread, so 2 workers use 2 cores where 1 uses one.

    python benchmarks/stage1_workers.py                    # digits, seeds 0 1 2, the demo's stage 1
    python benchmarks/stage1_workers.py --seeds 0 --epochs 2 --small     # a quick look (tests run this)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from laray.settings.config import AutoEncoderConfig  # noqa: E402

DEMO = AutoEncoderConfig(arch="vgg11_bn", width=0.25, image_size=32, epochs=5, batch_size=64, lr=0.05)
SMALL = AutoEncoderConfig(arch="vgg11_bn", width=0.125, image_size=32, epochs=2, batch_size=32)


def run(data: str, cfg: AutoEncoderConfig, seed: int, workers: int, folder: Path) -> dict:
    from laray.data.dataref import describe
    from laray.sweep.stage1_ddp import read_checkpoint, train_stage1_ddp

    ref = describe(data, cfg.image_size)
    began = time.perf_counter()
    checkpoint = train_stage1_ddp(
        ref.digest(), cfg, seed, workers, {"cpu": 1, "gpu": 0}, "cpu", 1, None, str(folder / f"s{seed}w{workers}")
    )
    _, history = read_checkpoint(checkpoint)
    return {
        "seed": seed,
        "workers": workers,
        "wall_s": time.perf_counter() - began,
        "loss": [r["loss"] for r in history],
        "purity": history[-1]["purity"],
        "epoch_s": [r["epoch_s"] for r in history],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="digits")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, help="stage-1 epochs (default: the settings')")
    parser.add_argument("--small", action="store_true", help="a tiny auto-encoder (seconds an epoch)")
    parser.add_argument("--json", metavar="FILE", help="also write the runs here")
    args = parser.parse_args(argv)
    import dataclasses

    import ray

    cfg = SMALL if args.small else DEMO
    if args.epochs is not None:
        cfg = dataclasses.replace(cfg, epochs=args.epochs)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    load = os.getloadavg()[0]
    ray.init(num_cpus=2, include_dashboard=False, configure_logging=False, log_to_driver=False)
    runs = []
    with tempfile.TemporaryDirectory() as folder:
        for seed in args.seeds:
            for workers in (1, 2):  # side by side, seed by seed: the machine's load weighs on both alike
                runs.append(run(args.data, cfg, seed, workers, Path(folder)))
    ray.shutdown()
    settings = f"{cfg.arch} width {cfg.width:g}, {cfg.image_size} px, {cfg.epochs} epochs, batch {cfg.batch_size}"
    print(f"stage 1 {settings}, lr {cfg.lr:g} on {args.data}; load average {load:.1f} at the start, "
          f"{os.getloadavg()[0]:.1f} at the end")  # fmt: skip
    print(f"{'seed':>4} {'workers':>7} {'wall s':>7} {'epoch s':>8} {'purity':>7}  loss per epoch")
    for r in runs:
        losses = " ".join(f"{v:.4f}" for v in r["loss"])
        print(f"{r['seed']:>4} {r['workers']:>7} {r['wall_s']:>7.1f} {statistics.mean(r['epoch_s']):>8.2f} "
              f"{r['purity']:>7.3f}  {losses}")  # fmt: skip
    one = [r for r in runs if r["workers"] == 1]
    two = [r for r in runs if r["workers"] == 2]
    differences = [b["purity"] - a["purity"] for a, b in zip(one, two)]
    loss_ratio = [b["loss"][-1] / a["loss"][-1] for a, b in zip(one, two)]
    speed = [statistics.mean(a["epoch_s"]) / statistics.mean(b["epoch_s"]) for a, b in zip(one, two)]
    print(f"purity, 2 workers minus 1, per seed: {' '.join(f'{d:+.3f}' for d in differences)}")
    if len(one) > 1:
        print(f"1-worker purity across seeds: sd {statistics.stdev(r['purity'] for r in one):.3f}, "
              f"range {min(r['purity'] for r in one):.3f}-{max(r['purity'] for r in one):.3f}")  # fmt: skip
    print(f"last-epoch loss, 2 workers / 1: {' '.join(f'{x:.3f}' for x in loss_ratio)}")
    print(f"epoch time, 1 worker / 2 workers (speed-up): {' '.join(f'{x:.2f}' for x in speed)}")
    if args.json:
        Path(args.json).write_text(json.dumps(runs, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
