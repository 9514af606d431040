"""The confirmation: the search's top configurations re-run with fresh seeds, as STORAGE/NAME/confirm/.

The arithmetic (which configurations, which seeds, mean and interval) is laray.scoring.confirm's; this
module runs it on Ray Tune like the search. `--resume` with a larger `--confirm-seeds` adds the new seeds
(STORAGE/NAME/confirm-seeds-A-B/) to the finished runs: a verdict the seeds could not settle gets more of them
without running the search again.
"""

from __future__ import annotations

import json
from pathlib import Path

from laray.data.dataset import DataRef
from laray.interrupt import tune_fit_stops_on_signal
from laray.scoring.confirm import (
    ADDED_SEEDS_PREFIX,
    CONFIRM_DIR,
    baselines_over_seeds,
    confirmation_seeds,
    confirmed,
    contenders,
)
from laray.settings.space import SearchSpace
from laray.sweep.plan import confirmation_stage1_layout
from laray.sweep.ray_setup import run_config
from laray.sweep.stage1 import cancel_stage1_tasks, sweep_stage1
from laray.sweep.trainable import confirm_trial
from laray.training.run import write_json

# The confirmation's contenders and the seeds of each of its Tune experiments: the first, STORAGE/NAME/confirm/, and
# one more for each --resume that raised --confirm-seeds (confirm-seeds-A-B/), run over the same contenders.
RECORD_FILE = "confirmation.json"


def confirm_top(
    data: DataRef,
    searched: list[tuple[dict, dict]],
    space: SearchSpace,
    shared: dict,
    experiment: Path,
    experiment_path: str,
    seed: int,
    resources: dict,
    verbose: int,
    max_failures: int,
    recipe: dict | None = None,
    stage1_workers: int = 1,
    planned_per_seed: int | None = None,
    tracker=None,
):
    """Re-run the search's top configurations with fresh seeds (laray.scoring.confirm) as STORAGE/NAME/confirm/.

    recipe: what `laray train` would run (laray.settings.defaults.recipe_point), re-run over the same seeds
    beside them, marked (laray.scoring.confirm.RECIPE_MARK) in its runs' settings. A second Tune experiment,
    run like the search (same resources, concurrency and failure handling) and resumed like it. Stage 1 is
    trained once per seed, each kept in the store, laid out over the `stage1_workers` the search's stage 1
    had as the plan says ends soonest (`planned_per_seed` workers a seed, from plan.json; without a plan,
    laray.sweep.plan.confirmation_stage1_layout's default): one task a seed, all at once, or data-parallel
    groups of workers, as many seeds at a time as the workers hold. tracker: the sweep's MLflow tracking
    (laray.sweep.tracking.Tracking), None when off. Seeds asked for beyond those run before (a resume with a larger
    space.confirm_seeds) run the same contenders as one more Tune experiment; fewer asked for keeps those run.
    """
    from ray import tune

    from laray.sweep.tune_state import repair_tune_state

    requested = confirmation_seeds(seed, space.confirm_seeds)
    path = f"{experiment_path}/{CONFIRM_DIR}"
    restoring = tune.Tuner.can_restore(path)
    record = read_record(experiment, path, requested) if restoring else None
    if record is None:  # a new confirmation: its contenders and seeds recorded before anything runs
        top = contenders(searched, recipe, space.objective, space.mode, space.la.epochs, space.confirm_top)
        record = {"contenders": top, "experiments": [{"name": CONFIRM_DIR, "seeds": requested}]}
        write_json(experiment / RECORD_FILE, record)
    top = record["contenders"]
    covered = [s for e in record["experiments"] for s in e["seeds"]]
    extra = [s for s in requested if s not in covered]
    if extra:  # --confirm-seeds raised on --resume: the same contenders over the new seeds, as one more experiment
        record["experiments"].append({"name": f"{ADDED_SEEDS_PREFIX}{extra[0]}-{extra[-1]}", "seeds": extra})
        write_json(experiment / RECORD_FILE, record)
    seeds = sorted(covered + extra)

    if planned_per_seed is not None and planned_per_seed <= stage1_workers:
        per_seed = planned_per_seed
    else:  # no plan (a resumed sweep's is read from plan.json), or one made for more workers than Ray found
        per_seed = confirmation_stage1_layout(len(seeds), stage1_workers)
    # Tasks queue at Ray until a slot frees; data-parallel groups go in rounds that the workers hold at once.
    at_once = max(1, stage1_workers // per_seed) if per_seed > 1 else len(seeds)
    # Announced in the console's own format before stage 1's lines, which name their seeds
    if not restoring:
        what = f"{len(top)} configuration(s), the recipe among them"
    elif extra:
        what = f"the confirmation, {len(extra)} seed(s) added ({extra})"
    else:
        what = "the stopped confirmation, resumed"
    where = f"{per_seed} workers each, {at_once} at a time" if per_seed > 1 else "one task each"
    print(f"[confirm] {what}, with seeds {seeds}; first stage 1 for each seed ({where})", flush=True)

    def stage1_of(s: int):
        return sweep_stage1(
            data,
            space.ae,
            space.mergers(),
            s,
            experiment / "autoencoders",
            resources,
            shared["device"],
            shared["threads"],
            shared["cache_dir"],
            (space.la.holdout, seed),
            shared["progress_s"],
            per_seed,
            f"{experiment_path}/autoencoders",
        )

    try:
        done = {}
        for first in range(0, len(seeds), at_once):
            group = seeds[first : first + at_once]
            done.update(zip(group, in_daemon_threads(stage1_of, group)))
    except KeyboardInterrupt:  # a stop signal: the other seeds' tasks would train on, on their cluster
        cancel_stage1_tasks()
        raise
    baselines, stage1s = {s: done[s][0] for s in seeds}, {s: done[s][1] for s in seeds}
    trainable = tune.with_resources(tune.with_parameters(confirm_trial, stage1s=stage1s, **shared), resources)
    runs = []
    for part in record["experiments"]:  # one after the other: the first (and any added before) finished first
        part_path = f"{experiment_path}/{part['name']}"
        if "://" not in part_path and Path(part_path).is_dir():
            repair_tune_state(part_path)  # a driver killed while Tune copied its state leaves it torn
        if tune.Tuner.can_restore(part_path):
            tuner = tune.Tuner.restore(part_path, trainable=trainable, resume_unfinished=True, resume_errored=False)
        else:
            tuner = tune.Tuner(
                trainable,
                param_space={"la": tune.grid_search(top), "seed": tune.grid_search(part["seeds"])},
                tune_config=tune.TuneConfig(max_concurrent_trials=space.max_concurrent, reuse_actors=True),
                run_config=run_config(
                    part["name"],
                    experiment_path,
                    verbose,
                    max_failures,
                    "confirm",
                    space,
                    callbacks=[]
                    if tracker is None
                    else [tracker.callback("confirm", list(space.search), seed, space.la.epochs, contenders=top)],
                ),
            )
        with tune_fit_stops_on_signal():
            results = tuner.fit()
        runs += [
            (r.config["la"], r.config["seed"], dict(r.metrics))
            for r in results
            if r.error is None and r.metrics and space.objective in r.metrics
        ]
    entries = confirmed(runs, space.objective, space.mode)
    merger = entries[0]["config"].get("merger", space.la.merger) if entries else space.la.merger
    return entries, baselines_over_seeds({s: baselines[s][merger] for s in seeds})


def read_record(experiment: Path, path: str, requested: list[int]) -> dict | None:
    """The confirmation's contenders and each of its experiments' seeds (STORAGE/NAME/confirmation.json).

    A sweep confirmed before that file existed: read from its one experiment's trials when it finished
    (best.json written), else taken to have the seeds asked for now (it is resumed as it began); None when it
    has no run yet.
    """
    file = experiment / RECORD_FILE
    if file.exists():
        return json.loads(file.read_text())
    from ray.tune import ExperimentAnalysis

    trials = ExperimentAnalysis(path).trials
    if not trials:  # stopped before its first run: nothing to read, the contenders are chosen again
        return None
    top = []
    for trial in trials:
        if trial.config["la"] not in top:
            top.append(trial.config["la"])
    seeds = sorted({t.config["seed"] for t in trials}) if (experiment / "best.json").exists() else requested
    return {"contenders": top, "experiments": [{"name": CONFIRM_DIR, "seeds": seeds}]}


def in_daemon_threads(function, items: list) -> list:
    """[function(item) for item in items], all at once, each in a daemon thread; the first error is raised.

    Daemon threads, unlike a ThreadPoolExecutor's, let a stop signal end the driver at once: the
    main thread waits in short joins, which a signal interrupts, and nothing joins the threads at exit.
    """
    import threading

    results, errors = [None] * len(items), [None] * len(items)

    def run(i: int) -> None:
        try:
            results[i] = function(items[i])
        except BaseException as exc:  # handed to the main thread
            errors[i] = exc

    threads = [threading.Thread(target=run, args=(i,), daemon=True, name=f"laray-{i}") for i in range(len(items))]
    for thread in threads:
        thread.start()
    for thread in threads:
        while thread.is_alive():
            thread.join(0.2)
    for exc in errors:
        if exc is not None:
            raise exc
    return results
