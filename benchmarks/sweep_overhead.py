"""What Ray Tune costs a trial: laray's trainable against a bare Tune function trainable, side by side in one run.

Four experiments of T trials each, one trial at a time, in one Ray instance:

- a bare Tune function trainable that reports E times and does nothing else (Tune's own floor),
  with fresh workers and with workers reused across trials (TuneConfig(reuse_actors=True));
- laray's sweep (`run_sweep`) of T identical trials: stage 2 of the digits, E LA epochs, stage 1
  already in the sweep's store, again with fresh and with reused workers.

The same stage-2 run is also timed directly with `train_run` in this process, before and after the
sweeps (their mean is `direct`). A trial's fixed cost is what it costs beyond its training:

    bare Tune:  experiment wall / T
    laray:      (sweep wall - T x direct) / T

Both include the experiment's own set-up and tear-down shared out over its T trials (laray's: the
lock, the Optuna study, stage 1 read from the store, best.json); "after the first" leaves out what
came before the first trial's function started (for fresh workers that includes the first worker's
start). worker.json in each trial folder gives the trial's own parts: `open_data_s` and
`startup_s` (trial start to its first LA step); stage 1's `ray.get`, which Tune does before the
trial's function starts, is timed apart in a worker. driver.py does not set reuse_actors: here it is set by
wrapping `ray.tune.TuneConfig` while each experiment starts (`--reuse`).

    python benchmarks/sweep_overhead.py            # the demo's 10-epoch runs, 4 trials: about 8 minutes on 2 cores
    python benchmarks/sweep_overhead.py --quick    # tiny model, 1 epoch, 3 trials, baselines not scored (the test)
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
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
from laray.training import run as run_module
from laray.training.run import stored_stage1, train_run
from laray.training.stages import RunOptions


def timed(fn):
    began = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - began


def load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


@contextlib.contextmanager
def reusing_workers(reuse: bool):
    """Every TuneConfig made inside has reuse_actors=`reuse` (driver.py, not ours to edit, sets none)."""
    from ray import tune

    original = tune.TuneConfig
    tune.TuneConfig = functools.partial(original, reuse_actors=reuse)
    try:
        yield
    finally:
        tune.TuneConfig = original


def same_trials_space(ae, la, trials: int) -> dict:
    """A space with nothing left to search: T trials, every setting fixed at the direct run's."""
    fixed_la = {k: v for k, v in vars(la).items() if k not in ("temperature", "mixing_rate", *SWEEP_SET)}
    # No held-out part, no confirmation, ASHA's first rung at the last epoch: T copies of the direct run.
    return {
        "num_samples": trials,
        "max_concurrent": 1,
        "grace_period": la.epochs,
        "holdout": 0,
        "confirm_top": 0,
        "fixed": {"autoencoder": vars(ae), "la": fixed_la},
        "search": {"temperature": {"categorical": [la.temperature]}, "mixing_rate": {"categorical": [la.mixing_rate]}},
    }


def bare_trainable(config: dict) -> None:
    """Tune's floor: a function trainable that only reports, `reports` times."""
    from ray import tune

    began = time.time()
    for i in range(config["reports"]):
        tune.report({"epoch": i + 1, "started_at": began})


def bare_sweep(storage: Path, name: str, trials: int, reports: int, threads: int, reuse: bool) -> tuple[float, float]:
    """(wall s, s before the first trial's function started) of T bare trials, one at a time."""
    from ray import tune

    tuner = tune.Tuner(
        tune.with_resources(bare_trainable, {"cpu": threads}),
        param_space={"reports": reports, "i": tune.grid_search(list(range(trials)))},
        tune_config=tune.TuneConfig(max_concurrent_trials=1, reuse_actors=reuse),
        run_config=tune.RunConfig(name=name, storage_path=str(storage), verbose=0),
    )
    began = time.time()
    results, wall = timed(tuner.fit)
    assert len(results) == trials and not results.errors, results.errors
    first = min(r.metrics["started_at"] for r in results)
    return wall, first - began


def worker_records(experiment: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(experiment.glob("*/worker.json"))]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny model, 1 + 1 epochs, 3 trials (seconds)")
    parser.add_argument("--trials", type=int, default=None, help="trials per experiment (default 4; --quick 3)")
    parser.add_argument("--la-epochs", type=int, default=None, help="LA epochs of a trial (default: the demo's 10)")
    parser.add_argument(
        "--reuse", choices=("both", "on", "off"), default="both", help="workers reused across trials, or fresh"
    )
    parser.add_argument("--threads", type=int, default=None, help="CPU threads of a run and CPUs of a trial")
    args = parser.parse_args(argv)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    threads = args.threads or (1 if args.quick else 2)
    torch.set_num_threads(threads)
    trials = args.trials or (3 if args.quick else 4)
    modes = {"both": (False, True), "on": (True,), "off": (False,)}[args.reuse]

    ae, la = demo_configs()
    if args.quick:
        ae, la = replace(ae, width=0.125, epochs=1), replace(la, epochs=1)
        # Not what is timed, and k-means on raw pixels alone takes half a minute on a busy 2-core machine.
        keys = run_module.baseline_keys(ae)
        run_module.compute_baselines = lambda *a, **k: {name: {} for name in keys}
    if args.la_epochs is not None:
        la = replace(la, epochs=args.la_epochs)
    print(f"load average (1, 5, 15 min) at the start: {load()} on {os.cpu_count()} CPUs")
    work = Path(tempfile.mkdtemp(prefix="laray-overhead-"))
    try:
        data = describe("digits", ae.image_size)
        dataset = open_dataset(data)
        store = work / "store"
        stage1, stage1_s = timed(lambda: stored_stage1(dataset, ae, [la.merger], 0, "cpu", store, progress=False))
        print(f"stage 1 ({ae.arch} width {ae.width}, {ae.epochs} epochs, {len(dataset)} images): {stage1_s:.1f} s")

        def direct(tag: str) -> float:
            return timed(
                lambda: train_run(
                    dataset, work / tag, ae, la, stage1=stage1, run=RunOptions(device="cpu", progress=False)
                )
            )[1]

        import ray

        from laray.sweep.driver import SweepRun, TrialResources, run_sweep

        _, ray_s = timed(
            lambda: ray.init(num_cpus=2, include_dashboard=False, configure_logging=False, log_to_driver=False)
        )
        print(f"Ray start-up (once per sweep, not counted below): {ray_s:.1f} s")
        # tune.with_parameters gets stage 1 in the trial's worker before laray's function starts: every trial,
        # reused worker or not. In a list: a task's ObjectRef argument would be resolved before it starts.
        fetch = ray.remote(lambda refs: timed(lambda: ray.get(refs[0]))[1])
        stage1_ref = ray.put(stage1)
        ray.get(fetch.remote([stage1_ref]))  # a worker started and warm
        print(f"stage 1's ray.get in a worker, as each trial pays it: {ray.get(fetch.remote([stage1_ref])):.3f} s")
        del stage1_ref
        directs = [direct("direct-before")]
        rows = []
        for reuse in modes:
            label = "reused" if reuse else "fresh"
            wall, before_first = bare_sweep(work / "bare", f"bare-{label}", trials, la.epochs, threads, reuse)
            rows.append((f"bare Tune, {label} workers", wall, before_first, 0.0, None))
            name = f"laray-{label}"
            shutil.copytree(store, work / "results" / name / "autoencoders")  # stage 1 as the sweep stored it
            began = time.time()
            with reusing_workers(reuse):
                result, wall = timed(
                    lambda: run_sweep(
                        data,
                        parse_space(same_trials_space(ae, la, trials)),
                        run=SweepRun(str(work / "results"), name, verbose=0),
                        trial=TrialResources(cpus=threads, device="cpu"),
                    )
                )
            assert result.n_trials == trials and result.n_errored == 0, f"the {name} sweep failed"
            records = worker_records(work / "results" / name)
            assert len(records) == trials, records
            rows.append((f"laray, {label} workers", wall, min(r["started_at"] for r in records) - began, None, records))
        directs.append(direct("direct-after"))
        ray.shutdown()
        direct_s = sum(directs) / len(directs)

        print(
            f"\ndirect run (train_run, {la.epochs} LA epochs): {directs[0]:.2f} s before the sweeps, "
            f"{directs[1]:.2f} s after; {direct_s:.2f} s taken as a trial's training"
        )
        print(f"{trials} trials per experiment, one at a time, {threads} CPU(s) each\n")
        print(
            f"{'experiment':<26} {'wall s':>7} {'before 1st s':>12} {'fixed s/trial':>13} {'after 1st':>9}"
            f"  {'open data s':>11} {'startup s':>9}"
        )
        for label, wall, before_first, training, records in rows:
            training = trials * direct_s if training is None else training
            per_trial = (wall - training) / trials
            after_first = (wall - before_first - training) / trials
            parts = ""
            if records:
                mean = {k: sum(r[k] for r in records) / len(records) for k in ("open_data_s", "startup_s")}
                parts = f"  {mean['open_data_s']:>11.2f} {mean['startup_s']:>9.2f}"
            print(f"{label:<26} {wall:>7.1f} {before_first:>12.1f} {per_trial:>13.2f} {after_first:>9.2f}{parts}")
        print(f"\nload average (1, 5, 15 min) at the end: {load()}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
