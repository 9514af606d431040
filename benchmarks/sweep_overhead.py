"""What Ray Tune costs a trial, and what training stage 1 once saves a sweep.

The same run (stage 2 of the embedded digits with the demo's settings, stage 1 already trained)
is timed twice in one process: directly with `train_run`, and as a one-trial sweep with
`run_sweep` (its stage 1 loaded from the sweep's store, so both do the same training). The
difference is Tune's overhead per trial: starting the trial's worker, handing it the data
reference and stage 1, a report and a checkpoint every epoch, the experiment's bookkeeping.
Ray's own start-up, once per sweep, is timed apart. It runs at two lengths: the demo's run
and longer ones, up to a few minutes. Last, stage 1 is timed alone: an 8-trial sweep trains it
once instead of 8 times, which saves 7 times that.

    python benchmarks/sweep_overhead.py            # 10, 40 and 150 LA epochs: about 12 minutes on 2 cores
    python benchmarks/sweep_overhead.py --quick    # seconds: a tiny model, one epoch (what the tests run)
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

from laray.data.dataset import describe, open_dataset
from laray.settings.config import replace
from laray.settings.defaults import demo_configs
from laray.settings.space import SWEEP_SET, parse_space
from laray.training.run import stored_stage1, train_run
from laray.training.stages import RunOptions

TRIALS = 8


def timed(fn):
    began = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - began


def one_trial_space(ae, la) -> dict:
    """A space with nothing left to search: every setting fixed at the direct run's."""
    fixed_la = {k: v for k, v in vars(la).items() if k not in ("temperature", "mixing_rate", *SWEEP_SET)}
    # No held-out part and no confirmation: the same single run as the direct one.
    return {
        "num_samples": 1,
        "max_concurrent": 1,
        "grace_period": la.epochs,
        "holdout": 0,
        "confirm_top": 0,
        "fixed": {"autoencoder": vars(ae), "la": fixed_la},
        "search": {"temperature": {"categorical": [la.temperature]}, "mixing_rate": {"categorical": [la.mixing_rate]}},
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny model, 1 + 1 epochs (seconds)")
    parser.add_argument(
        "--la-epochs",
        type=int,
        nargs="+",
        default=None,
        help="LA epochs of the runs compared (default: 10, the demo's; 40; 150, a few minutes)",
    )
    parser.add_argument("--threads", type=int, default=2, help="CPU threads of a run, and CPUs of the trial")
    args = parser.parse_args(argv)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    torch.set_num_threads(args.threads)

    ae, la = demo_configs()
    if args.quick:
        ae, la = replace(ae, width=0.125, epochs=1), replace(la, epochs=1)
    lengths = args.la_epochs or ([1] if args.quick else [la.epochs, 40, 150])
    work = Path(tempfile.mkdtemp(prefix="laray-overhead-"))
    try:
        data = describe("digits", ae.image_size)
        dataset = open_dataset(data)
        store = work / "store"
        stage1, stage1_s = timed(lambda: stored_stage1(dataset, ae, [la.merger], 0, "cpu", store, progress=False))
        print(
            f"stage 1 ({ae.arch} width {ae.width}, {ae.epochs} epochs, {len(dataset)} images) and its baselines: "
            f"{stage1_s:.1f} s"
        )

        import ray

        from laray.sweep.driver import SweepRun, TrialResources, run_sweep

        _, ray_s = timed(
            lambda: ray.init(
                num_cpus=args.threads, include_dashboard=False, configure_logging=False, log_to_driver=False
            )
        )
        print(f"Ray start-up (once per sweep): {ray_s:.1f} s\n")
        rows = []
        for epochs in lengths:
            la_run = replace(la, epochs=epochs)
            _, direct_s = timed(
                lambda: train_run(
                    dataset,
                    work / f"direct{epochs}",
                    ae,
                    la_run,
                    stage1=stage1,
                    run=RunOptions(device="cpu", progress=False),
                )
            )
            name = f"sweep{epochs}"
            shutil.copytree(store, work / "results" / name / "autoencoders")  # stage 1 as the sweep stored it
            result, sweep_s = timed(
                lambda: run_sweep(
                    data,
                    parse_space(one_trial_space(ae, la_run)),
                    run=SweepRun(str(work / "results"), name, verbose=0),
                    trial=TrialResources(cpus=args.threads, device="cpu"),
                )
            )
            assert result.n_trials == 1 and result.n_errored == 0, "the one-trial sweep failed"
            rows.append((epochs, direct_s, sweep_s))
        ray.shutdown()

        print(f"{'LA epochs':>9} {'direct s':>9} {'one-trial sweep s':>18} {'Tune overhead s':>16} {'overhead %':>11}")
        for epochs, direct_s, sweep_s in rows:
            print(
                f"{epochs:>9} {direct_s:>9.1f} {sweep_s:>18.1f} {sweep_s - direct_s:>16.1f} "
                f"{100 * (sweep_s - direct_s) / direct_s:>10.1f}%"
            )
        longest_direct = rows[-1][1]
        sweep_total = stage1_s + TRIALS * rows[-1][2]
        print(
            f"\nstage 1 once instead of once per trial: an {TRIALS}-trial sweep of the {rows[-1][0]}-epoch runs "
            f"saves {TRIALS - 1} x {stage1_s:.1f} s = {(TRIALS - 1) * stage1_s:.1f} s of trial time "
            f"({100 * (TRIALS - 1) * stage1_s / (sweep_total + (TRIALS - 1) * stage1_s):.0f}% of that sweep's "
            f"trial time had each trial trained its own; one run is {longest_direct:.1f} s)"
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
