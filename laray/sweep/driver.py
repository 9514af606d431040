"""The sweep: a Ray Tune function trainable over both stages, Optuna's TPE, ASHA.

Ray is imported here and by the sweep's helpers only (sweep_stage1, progress, asha, budget, and space's
Tune distributions); the rest of laray runs without it.

    STORAGE/NAME/               Ray Tune's experiment folder (Tuner.restore and ExperimentAnalysis read it)
    STORAGE/NAME/optuna.db      the Optuna study (optuna-dashboard sqlite:///STORAGE/NAME/optuna.db)
    STORAGE/NAME/sweep.json     what makes its scores comparable, for --warm-start (laray.sweep.warm_start)
    STORAGE/NAME/asha.json      ASHA's rungs, which Tune does not save (laray.sweep.asha)
    STORAGE/NAME/budget.json    the time budget and the search time spent (laray.sweep.budget)
    STORAGE/NAME/driver.lock    the running driver (laray.sweep.lock)
    STORAGE/NAME/autoencoders/  stage 1, trained once per sweep by a Ray task (laray.sweep.stage1)
    STORAGE/NAME/TRIAL/         per trial: progress.csv, result.json, TensorBoard events, checkpoints,
                                metrics.json, assignments.csv, codes.npy, worker.json
    STORAGE/NAME/confirm/       the confirmation (laray.scoring.confirm): the top configurations with fresh
                                seeds, a second Tune experiment whose trials have the same files
    STORAGE/NAME/best.json      the search's best trial, the confirmed configurations, the baselines,
                                the winner's margin over k-means on raw pixels

Trials receive the data set by reference (a `ListingDigest`: how to list it, digests of the
driver's listing, the cache key; no per-file entry and never image bytes) and open it on their
own node, from that node's cache folder; they receive stage 1's weights and baselines
through Ray's object store.
A trial reports every LA epoch with `ray.tune.report(metrics, checkpoint=...)` and
resumes from `tune.get_checkpoint()` after its worker dies. A trial whose loss goes
non-finite ends as errored with that reason, and the sweep goes on.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import resource
import shutil
import socket
import sys
import tempfile
import time
from pathlib import Path

import torch

from laray.checkpoint import write_atomic
from laray.data.cache import default_cache_dir
from laray.data.dataset import DataRef, ListingDigest, open_dataset
from laray.errors import LarayError, SweepError, naming_full_disk
from laray.interrupt import take_signals_back, tune_fit_stops_on_signal
from laray.scoring.confirm import (
    CONFIRM_DIR,
    baselines_over_seeds,
    confirmation_seeds,
    confirmed,
    margin_over,
    pick_top,
)
from laray.settings.config import replace
from laray.settings.space import SIZE_LIMITS, SearchSpace
from laray.sweep.lock import LOCK_NAME, SweepLock
from laray.sweep.stage1 import cancel_stage1_tasks, sweep_stage1
from laray.sweep.warm_start import OPTUNA_DB
from laray.sweep.warm_start import recorded as warm_start_record
from laray.training.run import Stage1, write_json
from laray.training.stages import STAGE_LA, NonFiniteLossError

log = logging.getLogger("laray.sweep.driver")

NONFINITE_MARKER = "nonfinite_loss.txt"
REPORTED = (
    "purity",
    "nmi",
    "ari",
    "acc",
    "silhouette",
    "heldout_purity",
    "heldout_nmi",
    "heldout_ari",
    "heldout_acc",
    "loss",
    "images_per_s",
    "lr",
    "epoch",
)


def ignore_exit_in_callbacks() -> None:
    """Stop printing a SystemExit that Python cannot raise, in a trial's worker; print the others.

    Ray stops a finished trial's worker by raising SystemExit in it. When that lands in a
    garbage-collection callback (a WeakSet's, say), Python prints it with a traceback as an
    ignored exception, which reads like a failure but is the exit itself (it showed in 2 of 14
    runs of the console test in tests/sweep/test_sweep.py). Other ignored exceptions still go to the
    hook that was there.
    """
    previous = sys.unraisablehook
    if getattr(previous, "laray_ignores_exit", False):  # Ray reuses workers: install once
        return

    def hook(unraisable) -> None:
        if not isinstance(unraisable.exc_value, SystemExit):
            previous(unraisable)

    hook.laray_ignores_exit = True
    sys.unraisablehook = hook


def _trial_dir() -> Path:
    from ray import tune

    return Path(tune.get_context().get_trial_dir())


def _fit_to_data(config: dict, n_images: int) -> dict:
    """Ranges were resolved against the files listed; a few may have failed to decode on the node."""
    fitted = dict(config)
    for name, limits in SIZE_LIMITS.items():
        if name in fitted:
            low, high = limits(n_images)
            fitted[name] = min(max(fitted[name], low), high)
            if fitted[name] != config[name]:
                log.warning("%s %s clipped to %s: %d images decoded", name, config[name], fitted[name], n_images)
    return fitted


def _write_worker_record(path: Path, record: dict) -> None:
    record["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    path.write_text(json.dumps(record, indent=2))


def train_trial(
    config: dict,
    data: ListingDigest,
    stage1: Stage1,
    space: SearchSpace,
    seed: int,
    device: str,
    threads: int,
    cache_dir: str | None = None,
    quiet: bool = False,
) -> None:
    """The function trainable: one trial = one `train_run` with the trial's LA hyperparameters.

    It opens `data` on its node (from the node's cache folder, decoding once per node) and
    starts stage 2 from `stage1`. worker.json in the trial folder says where it ran, whether it
    decoded the data, its start-up time and its peak resident memory.
    quiet: Ray Train's "Checkpoint successfully created at ..." line, once per epoch, not logged.
    """
    import ray
    from ray import tune

    if quiet:
        logging.getLogger("ray.train").setLevel(logging.WARNING)

    from laray.training.run import train_run

    began = time.perf_counter()
    ignore_exit_in_callbacks()
    torch.set_num_threads(threads)
    out = _trial_dir()
    dataset = open_dataset(data, cache_dir)
    worker = {
        "node_id": ray.get_runtime_context().get_node_id(),
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "cache_dir": str(Path(cache_dir) if cache_dir else default_cache_dir()),
        "decoded_here": dataset.decoded_here,
        "open_data_s": time.perf_counter() - began,
    }
    _write_worker_record(out / "worker.json", worker)
    marker = out / NONFINITE_MARKER
    if marker.exists():  # restarted after a non-finite loss: it would only diverge again
        raise NonFiniteLossError(marker.read_text())
    la_ckpt = out / "checkpoints" / "la.ckpt"
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:  # a restart: continue from the last reported epoch
        with checkpoint.as_directory() as folder:  # atomic: a kill or a full disk mid-copy leaves no torn la.ckpt
            copy = (Path(folder) / "la.ckpt").read_bytes()  # tens of MB
            write_atomic(la_ckpt, lambda f: f.write(copy))

    def report(record: dict) -> None:
        if record["stage"] != STAGE_LA:
            return  # stage 1 is shared by the trials; ASHA compares LA epochs only
        if "startup_s" not in worker:  # trial start to its first LA step: before the first epoch's steps began
            worker["startup_s"] = time.perf_counter() - began - record["epoch_s"] - record.get("eval_s", 0)
        if "eval_s" not in record:
            return  # not evaluated (eval_every): nothing for ASHA to compare
        metrics = {k: record[k] for k in REPORTED if k in record}
        _write_worker_record(out / "worker.json", worker)
        with (
            naming_full_disk(tempfile.gettempdir(), "the trial's checkpoint for Tune"),
            tempfile.TemporaryDirectory() as folder,
        ):
            shutil.copy2(la_ckpt, Path(folder) / "la.ckpt")
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(folder))

    la_cfg = replace(space.la, **_fit_to_data(config, len(dataset)))
    try:
        train_run(
            dataset,
            out,
            space.ae,
            la_cfg,
            seed=seed,
            device=device,
            resume=checkpoint is not None,
            callback=report,
            progress=False,
            stage1=stage1,
        )
    except NonFiniteLossError as exc:
        marker.write_text(str(exc))
        raise


@dataclasses.dataclass
class SweepResult:
    experiment: Path
    best_config: dict | None
    best_metrics: dict | None
    n_trials: int
    n_errored: int
    baselines: dict  # {"raw_pixels": scores, "autoencoder": scores} for the best trial's merger
    confirmed: list = dataclasses.field(default_factory=list)  # laray.scoring.confirm.confirmed: best mean first
    confirmed_baselines: dict | None = None  # the baselines over the confirmation's seeds
    margin: dict | None = (
        None  # the winner minus k-means on raw pixels, paired by seed (laray.scoring.confirm.margin_over)
    )


def _optuna_search(space: SearchSpace, experiment: Path, name: str, seed: int):
    import optuna
    from ray.tune.search.optuna import OptunaSearch

    storage = optuna.storages.RDBStorage(f"sqlite:///{experiment / OPTUNA_DB}")
    return OptunaSearch(
        metric=space.objective,
        mode=space.mode,
        sampler=optuna.samplers.TPESampler(seed=seed),
        study_name=name,
        storage=storage,
    )


def _fail_orphaned_optuna_trials(experiment: Path, name: str, sweep_over: bool = False) -> None:
    """Mark FAIL the Optuna trials left RUNNING that no Tune trial will ever finish.

    Optuna writes a sampled trial to SQLite at once; Tune saves its state every few
    seconds. A driver killed in between leaves a RUNNING Optuna trial that Tune never
    saved (caught before a resume: its parameters match no Tune trial). And a resumed
    searcher may ask Optuna for a trial that Tune then never starts (caught when the
    sweep is over: every Tune trial has ended, so nothing RUNNING can finish).
    """
    import optuna

    from laray.results.scores import tune_trial_states

    db = experiment / OPTUNA_DB
    if not db.exists():
        return
    tune_trials = tune_trial_states(experiment)
    if sweep_over and (not tune_trials or any(t.get("status") not in ("TERMINATED", "ERROR") for t in tune_trials)):
        return  # interrupted (Ctrl-C): its RUNNING trials may still finish after a resume
    known = [] if sweep_over else [t.get("config", {}) for t in tune_trials]
    study = optuna.load_study(study_name=name, storage=f"sqlite:///{db}")
    for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        if not any(all(config.get(k) == v for k, v in trial.params.items()) for config in known):
            study.tell(trial.number, state=optuna.trial.TrialState.FAIL)


def run_sweep(
    data: DataRef,
    space: SearchSpace,
    storage: str,
    name: str,
    num_samples: int | None = None,
    seed: int = 0,
    cpus_per_trial: float = 1,
    gpus_per_trial: float = 0,
    max_failures: int = 2,
    resume: bool = False,
    device: str = "auto",
    verbose: int = 1,
    cache_dir: str | None = None,
    warm_start: list[str] = (),
) -> SweepResult:
    """Run (or, with resume=True, continue) the sweep STORAGE/NAME over `space` on the data `data` lists.

    cache_dir: the decode cache folder on every node (a shared one, or a local path that exists on
    each); None: each node's own default (LARAY_CACHE_DIR in its environment, else ~/.cache/laray).
    warm_start: earlier sweeps' folders whose finished trials TPE starts from (laray.sweep.warm_start).
    Ray must already be initialised (ray.init) by the caller.
    """
    from ray import tune

    from laray.sweep.asha import ResumableASHA

    if "://" in storage and not storage.startswith("file://"):
        experiment_local = None  # cloud storage: the study and auto-encoders live beside the driver
    else:
        experiment_local = Path(storage.removeprefix("file://")).expanduser().resolve() / name
    experiment = experiment_local or Path(tempfile.gettempdir()) / "laray" / name
    storage_path = storage if experiment_local is None else str(experiment.parent)
    experiment_path = f"{storage_path.rstrip('/')}/{name}"
    check_resources(cpus_per_trial, gpus_per_trial, device)
    if resume and not tune.Tuner.can_restore(experiment_path):
        if not _started_here(experiment_local):
            raise SweepError(f"no sweep to resume at {experiment_path}")
        resume = False  # stopped before its search began (in stage 1): the search starts now, stage 1 from the store
    if resume and num_samples is not None:  # Tuner.restore keeps the stored count and would ignore it silently
        raise SweepError("the number of trials of a sweep cannot change when it is resumed")
    if resume and warm_start:
        raise SweepError("--warm-start: the trials a sweep starts from are taken over when it starts, not on --resume")
    from laray.sweep.console import one_line_for_gone_checkpoints, quiet_ray
    from laray.sweep.tune_space import tune_space

    one_line_for_gone_checkpoints()
    if verbose < 2:  # before stage 1, whose lines Ray forwards
        quiet_ray()
    # One driver at a time: a second one, or a --resume of a running sweep, is refused here before it
    # touches the experiment (laray.sweep.lock). With cloud storage the lock sits beside this driver only.
    with SweepLock(experiment):
        if not resume and tune.Tuner.can_restore(experiment_path):
            raise SweepError(f"a sweep already exists at {experiment_path}: use --resume or another --name")
        experiment.mkdir(parents=True, exist_ok=True)
        threads = max(1, int(cpus_per_trial))
        resources = {"cpu": cpus_per_trial, "gpu": gpus_per_trial}
        device = "cuda" if gpus_per_trial > 0 else device
        # One held-out split for the whole sweep, confirmation included: drawn with the sweep's seed.
        space = dataclasses.replace(space, la=replace(space.la, holdout_seed=seed))
        holdout = (space.la.holdout, seed)
        param_space = tune_space(space, len(data))
        if not resume:  # before stage 1: a warm start that cannot be taken over costs nothing yet
            _start_from(warm_start, data, space, seed, param_space, experiment, name)
        # Through the object store, by reference: the encoder's weights and the baselines, tens of MB at most.
        stage1_baselines, stage1 = sweep_stage1(
            data,
            space.ae,
            space.mergers(),
            seed,
            experiment / "autoencoders",
            resources,
            device,
            threads,
            cache_dir,
            holdout,
        )
        shared = dict(
            data=data.digest(), space=space, device=device, threads=threads, cache_dir=cache_dir, quiet=verbose < 2
        )
        trainable = tune.with_parameters(train_trial, stage1=stage1, seed=seed, **shared)
        trainable = tune.with_resources(trainable, resources)

        from laray.sweep.budget import budget_parts, budget_s, ended_search, resume_budget

        if resume:
            _fail_orphaned_optuna_trials(experiment, name)
            resume_budget(space.time_budget_s, experiment)  # the budget's parts come back from Tune's own files
            tuner = tune.Tuner.restore(
                experiment_path, trainable=trainable, resume_unfinished=True, resume_errored=False
            )
        else:
            # The time budget: the searcher asks for no trial once it is spent, the stopper ends running ones at
            # their next epoch end, the clock counts the search's time across resumes (laray.sweep.budget).
            searcher, stopper, clock = budget_parts(
                space.time_budget_s, experiment, _optuna_search(space, experiment, name, seed)
            )
            tuner = tune.Tuner(
                trainable,
                param_space=param_space,
                tune_config=tune.TuneConfig(
                    search_alg=searcher,
                    # time_attr "epoch": the LA epoch, also when eval_every > 1 reports only some of them
                    scheduler=ResumableASHA(
                        experiment,
                        time_attr="epoch",
                        max_t=max(1, space.la.epochs),
                        grace_period=min(space.grace_period, max(1, space.la.epochs)),
                    ),
                    metric=space.objective,
                    mode=space.mode,
                    num_samples=num_samples or space.num_samples,
                    max_concurrent_trials=space.max_concurrent,
                ),
                run_config=_run_config(
                    name,
                    storage_path,
                    verbose,
                    max_failures,
                    "search",
                    space,
                    stopper,
                    clock,
                    budget_of=str(experiment),
                ),
            )
        with tune_fit_stops_on_signal():  # SIGTERM or Ctrl-C: Tune saves its state, then StopRequested
            results = tuner.fit()
        _fail_orphaned_optuna_trials(experiment, name, sweep_over=True)
        errored = sum(1 for r in results if r.error is not None)
        try:
            best = results.get_best_result(metric=space.objective, mode=space.mode, scope="last")
            best_config, best_metrics = dict(best.config), dict(best.metrics)
        except RuntimeError:  # no trial reported anything
            best_config = best_metrics = None
        baselines = stage1_baselines[(best_config or {}).get("merger", space.la.merger)]
        confirmed, confirmed_baselines, margin = [], None, None
        if space.confirms and best_config is not None:
            searched = [(dict(r.config), dict(r.metrics or {})) for r in results if r.error is None]
            confirmed, confirmed_baselines = _confirm(
                data, searched, space, shared, experiment, experiment_path, seed, resources, verbose, max_failures
            )
            if confirmed:
                margin = margin_over(confirmed[0], confirmed_baselines["raw_pixels"])
        summary = {
            "best_config": best_config,
            "best_metrics": {k: best_metrics.get(k) for k in REPORTED} if best_metrics else None,
            "n_trials": len(results),
            "n_errored": errored,
            "baselines": baselines,
            "holdout": space.la.holdout,
            "confirmed": confirmed,
            "confirmed_baselines": confirmed_baselines,
            "margin_over_raw_pixels": margin,
            "warm_start": warm_start_record(f"sqlite:///{experiment / OPTUNA_DB}", name),
            "time_budget_s": budget_s(experiment),
            "ended_by_time_budget": ended_search(experiment),
        }
        write_json(experiment / "best.json", summary)  # atomic; a full disk is named
        return SweepResult(
            Path(experiment_path) if experiment_local is None else experiment,
            best_config,
            best_metrics,
            len(results),
            errored,
            baselines,
            confirmed,
            confirmed_baselines,
            margin,
        )


def _start_from(
    warm_start: list[str], data: DataRef, space: SearchSpace, seed: int, param_space: dict, experiment: Path, name: str
) -> None:
    """A new sweep records what makes its scores comparable (sweep.json), and takes over earlier sweeps' trials."""
    from ray.tune.search.optuna import OptunaSearch

    from laray.sweep import warm_start as warm

    identity = warm.sweep_identity(data, space, seed)
    warm.write_identity(experiment, identity)
    if warm_start:
        # The distributions OptunaSearch samples from: taken-over trials must have the same ones (warm.take_over).
        taken = warm.take_over(warm_start, identity, OptunaSearch.convert_search_space(param_space))
        warm.seed_study(f"sqlite:///{experiment / OPTUNA_DB}", name, space.mode, taken)
        log.info(taken.describe())


def _run_config(
    name: str,
    storage_path: str,
    verbose: int,
    max_failures: int,
    label: str,
    space: SearchSpace,
    stop=None,
    clock=None,
    budget_of: str | None = None,
):
    """verbose 0: silent; 1: laray's line per trial event (laray.sweep.console); 2: Ray Tune's own table as well.

    stop, clock: the time budget's stopper and clock (the search only); budget_of: the folder whose budget the
    console shows.
    """
    from ray import tune

    from laray.sweep.console import SweepProgress

    progress = (
        [SweepProgress(label, space.la.epochs, space.objective, space.max_concurrent, budget_of)] if verbose else []
    )
    callbacks = progress + ([clock] if clock is not None else [])
    # sync_artifacts: with cloud storage, the files a trial writes (assignments.csv...) are uploaded too.
    return tune.RunConfig(
        name=name,
        storage_path=storage_path,
        verbose=max(0, verbose - 1),
        callbacks=callbacks,
        stop=stop,
        sync_config=tune.SyncConfig(sync_artifacts=True),
        failure_config=tune.FailureConfig(max_failures=max_failures),
        checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
    )


def confirm_trial(config: dict, stage1s: dict, **kwargs) -> None:
    """One confirmation run: a search trial's LA settings (config["la"]) with a fresh seed (config["seed"])."""
    import ray

    seed = config["seed"]
    train_trial(config["la"], stage1=ray.get(stage1s[seed]), seed=seed, **kwargs)


def _confirm(
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
):
    """Re-run the search's top configurations with fresh seeds (laray.scoring.confirm) as STORAGE/NAME/confirm/.

    A second Tune experiment, run like the search (same resources, concurrency and failure
    handling) and resumed like it. Stage 1 is trained once per seed (the seeds' tasks at once),
    each kept in the store.
    """
    from ray import tune

    seeds = confirmation_seeds(seed, space.confirm_seeds)

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
        )

    # One Ray task per seed, at once: on a cluster each takes a GPU, as the trials do.
    try:
        done = dict(zip(seeds, in_daemon_threads(stage1_of, seeds)))
    except KeyboardInterrupt:  # a stop signal: the other seeds' tasks would train on, on their cluster
        cancel_stage1_tasks()
        raise
    baselines, stage1s = {s: done[s][0] for s in seeds}, {s: done[s][1] for s in seeds}
    trainable = tune.with_resources(tune.with_parameters(confirm_trial, stage1s=stage1s, **shared), resources)
    path = f"{experiment_path}/{CONFIRM_DIR}"
    if tune.Tuner.can_restore(path):
        tuner = tune.Tuner.restore(path, trainable=trainable, resume_unfinished=True, resume_errored=False)
    else:
        top = pick_top(searched, space.objective, space.mode, space.la.epochs, space.confirm_top)
        log.info("confirming %d configuration(s) with seeds %s", len(top), seeds)
        tuner = tune.Tuner(
            trainable,
            param_space={"la": tune.grid_search(top), "seed": tune.grid_search(seeds)},
            tune_config=tune.TuneConfig(max_concurrent_trials=space.max_concurrent),
            run_config=_run_config(CONFIRM_DIR, experiment_path, verbose, max_failures, "confirm", space),
        )
    with tune_fit_stops_on_signal():
        results = tuner.fit()
    runs = [
        (r.config["la"], r.config["seed"], dict(r.metrics))
        for r in results
        if r.error is None and r.metrics and space.objective in r.metrics
    ]
    entries = confirmed(runs, space.objective, space.mode)
    merger = entries[0]["config"].get("merger", space.la.merger) if entries else space.la.merger
    return entries, baselines_over_seeds({s: baselines[s][merger] for s in seeds})


def _started_here(experiment: Path | None) -> bool:
    """A local sweep folder that a driver began (its lock file) before Tune saved any state of it."""
    return experiment is not None and (experiment / LOCK_NAME).exists()


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


def check_resources(cpus_per_trial: float, gpus_per_trial: float, device: str) -> None:
    """Refuse, before anything is created, a trial that no node of the running Ray cluster can ever hold.

    Tune would otherwise wait forever for it. An autoscaler may add nodes: like Tune itself
    (ray.tune.execution.cluster_info), laray takes ~/ray_bootstrap_config.yaml, which `ray up` puts
    on the head node, as the sign of one, and then checks nothing.
    """
    import ray

    if device.startswith("cuda") and gpus_per_trial <= 0:
        raise LarayError(
            f"--device {device} in a sweep needs --gpus-per-trial > 0: Ray hides the GPUs from "
            "trials that did not ask for one"
        )
    if Path("~/ray_bootstrap_config.yaml").expanduser().exists():
        return
    nodes = [n["Resources"] for n in ray.nodes() if n["Alive"]]
    for option, wanted, key in (
        ("--cpus-per-trial", cpus_per_trial, "CPU"),
        ("--gpus-per-trial", gpus_per_trial, "GPU"),
    ):
        most = max((r.get(key, 0) for r in nodes), default=0)
        if wanted > most:
            raise LarayError(
                f"{option} {wanted:g}: no node of this Ray cluster has that many {key}s (the most is "
                f"{most:g}) and no autoscaler can add one; Tune would wait forever"
            )


def ray_init(address: str | None, dashboard: bool = False, quiet: bool = False) -> None:
    """Start or join Ray; the dashboard, when asked for, binds to 127.0.0.1 only.

    quiet: without Ray's notice that token authentication is on (as it is by default).
    """
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # No stack dump from Ray's C++ failure-signal handler when SIGTERM stops the driver or its workers:
    # laray handles stop signals itself (laray.interrupt). Read when ray is imported; workers inherit it.
    os.environ.setdefault("RAY_DISABLE_FAILURE_SIGNAL_HANDLER", "1")
    if quiet:
        logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
        # Lines forwarded from tasks (stage 1's), in a terminal or a redirected log: no ANSI colour codes, and
        # no "[repeated 3x across cluster]" notes, which carry their own colour. Both read when ray is imported.
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")
        os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    import ray  # after the settings above: Ray reads them when it is imported

    if ray.is_initialized():
        return
    if address:
        ray.init(address=address, configure_logging=False)  # as below: Tune's INFO lines stay off the console
    else:
        ray.init(include_dashboard=dashboard, dashboard_host="127.0.0.1", configure_logging=False)
    global _ray_started_here
    _ray_started_here = True
    take_signals_back()  # ray.init makes SIGTERM exit at once


_ray_started_here = False


def shutdown_ray() -> None:
    """Shut down (or leave) the Ray that ray_init started or joined; one started by someone else stays."""
    global _ray_started_here
    if _ray_started_here:
        import ray

        ray.shutdown()
        _ray_started_here = False
