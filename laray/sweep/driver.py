"""`run_sweep`: the search (Optuna's TPE over the trainable, ASHA stopping the weakest), then the confirmation.

Ray is imported only in this layer (laray.sweep), and only once a sweep starts: ray_setup.ray_init
sets the environment Ray reads at import first. What a sweep leaves:

    STORAGE/NAME/               Ray Tune's experiment folder (Tuner.restore and ExperimentAnalysis read it)
    STORAGE/NAME/optuna.db      the Optuna study, its objective named, each trial's end in its user attributes
                                (laray.sweep.study); `laray dashboard STORAGE/NAME` shows it
    STORAGE/NAME/sweep.json     what makes its scores comparable, for --warm-start (laray.sweep.warm_start)
    STORAGE/NAME/asha.json      ASHA's rungs, which Tune does not save (laray.sweep.asha)
    STORAGE/NAME/budget.json    the time budget and the search time spent (laray.sweep.budget)
    STORAGE/NAME/driver.lock    the running driver (laray.sweep.lock)
    STORAGE/NAME/ray_dashboard.json  where the driver's Ray dashboard is, when it has one (`laray dashboard`)
    STORAGE/NAME/events.out.tfevents.laray-hparams  TensorBoard's HPARAMS columns (laray.sweep.hparams)
    STORAGE/NAME/tune-state.zip  a whole copy of Tune's state files, for a resume after a kill tore them
                                (laray.sweep.tune_state); each confirmation experiment has its own
    STORAGE/NAME/autoencoders/  stage 1, trained once per sweep by a Ray task (laray.sweep.stage1)
    STORAGE/NAME/TRIAL/         per trial: progress.csv, result.json, TensorBoard events, checkpoints,
                                metrics.json, assignments.csv, codes.npy, worker.json
    STORAGE/NAME/confirm/       the confirmation (laray.scoring.confirm): the top configurations with fresh
                                seeds, a second Tune experiment whose trials have the same files
    STORAGE/NAME/confirm-seeds-A-B/  seeds a --resume with a larger --confirm-seeds added, one more experiment
    STORAGE/NAME/confirmation.json   the confirmation's contenders and each experiment's seeds
    STORAGE/NAME/plan.json      the plan printed before it started: the expected wall time and its parts
    STORAGE/NAME/best.json      the search's best trial, the confirmed configurations, the baselines,
                                the winner's margin over k-means on raw pixels and over the recipe (its first
                                trial, re-run in the confirmation), and the verdict in words

How a trial runs: laray.sweep.trainable; the confirmation: laray.sweep.confirmation.
"""

from __future__ import annotations

import dataclasses
import logging
import tempfile
from collections.abc import Sequence
from pathlib import Path

from laray.data.dataset import DataRef
from laray.errors import SweepError
from laray.interrupt import tune_fit_stops_on_signal
from laray.scoring.confirm import margin_over, split_recipe, verdict
from laray.settings.config import replace
from laray.settings.defaults import recipe_point
from laray.settings.space import SearchSpace
from laray.settings.stage1_search import ae_config_of
from laray.sweep.confirmation import confirm_top
from laray.sweep.lock import LOCK_NAME, SweepLock
from laray.sweep.plan import reduction_factor
from laray.sweep.ray_setup import check_resources, record_dashboard, run_config
from laray.sweep.stage1 import sweep_stage1
from laray.sweep.stage1_ddp import stage1_workers
from laray.sweep.trainable import REPORTED, train_trial
from laray.sweep.warm_start import OPTUNA_DB
from laray.sweep.warm_start import recorded as warm_start_record
from laray.training.epoch_progress import progress_interval_s
from laray.training.run import write_json

log = logging.getLogger("laray.sweep.driver")


@dataclasses.dataclass
class SweepResult:
    experiment: Path
    best_config: dict | None
    best_metrics: dict | None
    n_trials: int
    n_errored: int
    # {"raw_pixels": scores, "autoencoder": scores[, "pretrained": scores]} for the best trial's merger
    baselines: dict
    confirmed: list = dataclasses.field(default_factory=list)  # laray.scoring.confirm.confirmed: best mean first
    confirmed_baselines: dict | None = None  # the same baselines over the confirmation's seeds
    margin: dict | None = (
        None  # the winner minus k-means on raw pixels, paired by seed (laray.scoring.confirm.margin_over)
    )
    recipe: dict | None = None  # the recipe's confirmation entry: what `laray train` runs, over the same seeds
    margin_over_recipe: dict | None = None  # the winner minus the recipe, paired by seed
    verdict: str | None = None  # in words: did the search beat the recipe (laray.scoring.confirm.verdict)
    beat_recipe: bool = False


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


@dataclasses.dataclass(frozen=True)
class SweepRun:
    """Which sweep and how it runs, as Tune's RunConfig; what it searches is the SearchSpace."""

    storage: str  # a folder, or a cloud URI (s3://...): the sweep is STORAGE/NAME
    name: str
    num_samples: int | None = None  # trials; None: the space's
    seed: int = 0
    resume: bool = False  # continue STORAGE/NAME
    max_failures: int = 2  # restarts of a trial whose worker died
    verbose: int = 1  # 0 silent, 1 laray's console, 2 Ray Tune's table as well
    warm_start: Sequence[str] = ()  # earlier sweeps' folders whose finished trials TPE starts from
    plan: dict | None = None  # the plan printed before it started (laray.sweep.plan): kept as plan.json
    # None: no tracking (on --resume: as the sweep began); "mlflow": MLflow runs in STORAGE/NAME/mlflow.db; a tracking
    # URI: that MLflow server's (laray.sweep.tracking)
    tracking: str | None = None


@dataclasses.dataclass(frozen=True)
class TrialResources:
    """What each trial (and stage 1's task) asks Ray for, and where it finds the decoded data."""

    cpus: float = 1
    gpus: float = 0
    device: str = "auto"
    # the decode cache folder on every node (a shared one, or a local path that exists on each);
    # None: each node's own default (LARAY_CACHE_DIR in its environment, else ~/.cache/laray)
    cache_dir: str | None = None
    # workers that train stage 1 together, data-parallel, each with a trial's resources (laray.sweep.stage1_ddp);
    # None: every GPU the cluster offers when stage 1 starts, 1 without GPUs
    stage1_workers: int | None = None


def run_sweep(
    data: DataRef, space: SearchSpace, run: SweepRun, trial: TrialResources = TrialResources()
) -> SweepResult:
    """Run (or, with run.resume, continue) the sweep STORAGE/NAME over `space` on the data `data` lists.

    Ray must already be initialised (ray_setup.ray_init) by the caller.
    """
    storage, name, num_samples, seed = run.storage, run.name, run.num_samples, run.seed
    resume, max_failures, verbose, warm_start = run.resume, run.max_failures, run.verbose, list(run.warm_start)
    from ray import tune

    from laray.sweep.asha import ResumableASHA

    cpus_per_trial, gpus_per_trial, device, cache_dir = trial.cpus, trial.gpus, trial.device, trial.cache_dir

    if "://" in storage and not storage.startswith("file://"):
        experiment_local = None  # cloud storage: the study and auto-encoders live beside the driver
    else:
        experiment_local = Path(storage.removeprefix("file://")).expanduser().resolve() / name
    experiment = experiment_local or Path(tempfile.gettempdir()) / "laray" / name
    storage_path = storage if experiment_local is None else str(experiment.parent)
    experiment_path = f"{storage_path.rstrip('/')}/{name}"
    check_resources(cpus_per_trial, gpus_per_trial, device)
    workers = stage1_workers(trial.stage1_workers, cpus_per_trial, gpus_per_trial)
    if resume and not tune.Tuner.can_restore(experiment_path):
        if not _started_here(experiment_local):
            raise SweepError(f"no sweep to resume at {experiment_path}")
        resume = False  # stopped before its search began (in stage 1): the search starts now, stage 1 from the store
    if resume and num_samples is not None:  # Tuner.restore keeps the stored count and would ignore it silently
        raise SweepError("the number of trials of a sweep cannot change when it is resumed")
    if resume and warm_start:
        raise SweepError("--warm-start: the trials a sweep starts from are taken over when it starts, not on --resume")
    from laray.sweep.tracking import sweep_tracking

    tracker = sweep_tracking(run.tracking, experiment, name, resume)  # None: off
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
        if tracker is not None and not resume:
            tracker.record(experiment)
        if run.plan is not None and not resume:
            write_json(experiment / "plan.json", run.plan)
        if experiment_local is not None:  # for `laray dashboard STORAGE/NAME`: where this driver's Ray dashboard is
            record_dashboard(experiment)
        threads = max(1, int(cpus_per_trial))
        resources = {"cpu": cpus_per_trial, "gpu": gpus_per_trial}
        device = "cuda" if gpus_per_trial > 0 else device
        # One held-out split for the whole sweep, confirmation included: drawn with the sweep's seed.
        space = dataclasses.replace(space, la=replace(space.la, holdout_seed=seed))
        holdout = (space.la.holdout, seed)
        # The in-epoch lines' interval as this driver's environment says: the workers', on other nodes, may not.
        progress_s = progress_interval_s()
        param_space = tune_space(space, len(data))
        # What the user would otherwise run: the search's first trial and a contender in the confirmation.
        recipe = recipe_point(space, len(data))
        # The stage 1 trained before the search, and per seed for the confirmation, is the recipe's: with stage-1
        # settings searched, trials that ask for another train their own (laray.settings.stage1_search).
        space = dataclasses.replace(space, ae=ae_config_of(space.ae, recipe))
        trials = num_samples or space.num_samples
        if not resume:  # before stage 1: a warm start that cannot be taken over costs nothing yet
            _start_from(warm_start, data, space, seed, param_space, experiment, name)
        if workers > 1 and space.ae.epochs > 0:
            print(f"stage 1 on {workers} workers (data-parallel, Ray Train), seed {seed}", flush=True)
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
            progress_s,
            workers,
            f"{experiment_path}/autoencoders",
        )
        shared = dict(
            data=data.digest(),
            space=space,
            device=device,
            threads=threads,
            cache_dir=cache_dir,
            quiet=verbose < 2,
            progress_s=progress_s,
            # where a trial whose stage-1 settings are searched finds (or trains) its own (laray.settings.stage1_search)
            store_dir=None if experiment_local is None else str(experiment / "autoencoders"),
        )
        trainable = tune.with_parameters(train_trial, stage1=stage1, seed=seed, **shared)
        trainable = tune.with_resources(trainable, resources)

        from laray.sweep.budget import budget_parts, budget_s, ended_search, resume_budget
        from laray.sweep.study import name_stored_objective, optuna_search
        from laray.sweep.tune_state import repair_tune_state

        if resume:
            if experiment_local is not None:
                repair_tune_state(experiment)  # a driver killed while Tune copied its state leaves it torn
            _fail_orphaned_optuna_trials(experiment, name)
            name_stored_objective(f"sqlite:///{experiment / OPTUNA_DB}", name, space.objective)
            resume_budget(space.time_budget_s, experiment)  # the budget's parts come back from Tune's own files
            tuner = tune.Tuner.restore(
                experiment_path, trainable=trainable, resume_unfinished=True, resume_errored=False
            )
        else:
            # The time budget: the searcher asks for no trial once it is spent, the stopper ends running ones at
            # their next epoch end, the clock counts the search's time across resumes (laray.sweep.budget).
            searcher, stopper, clock = budget_parts(
                space.time_budget_s,
                experiment,
                optuna_search(
                    space,
                    f"sqlite:///{experiment / OPTUNA_DB}",
                    name,
                    seed,
                    str(experiment),
                    trials,
                    first=recipe,
                ),
            )
            tuner = tune.Tuner(
                trainable,
                param_space=param_space,
                tune_config=tune.TuneConfig(
                    search_alg=searcher,
                    # time_attr "epoch": the LA epoch, also when eval_every > 1 reports only some of them
                    scheduler=ResumableASHA(
                        experiment,
                        reduction_factor=reduction_factor(trials, space.confirm_top),
                        time_attr="epoch",
                        max_t=max(1, space.la.epochs),
                        grace_period=min(space.grace_period, max(1, space.la.epochs)),
                    ),
                    metric=space.objective,
                    mode=space.mode,
                    num_samples=trials,
                    max_concurrent_trials=space.max_concurrent,
                    # a worker runs trial after trial: its start and imports once (benchmarks/sweep_overhead.py)
                    reuse_actors=True,
                ),
                run_config=run_config(
                    name,
                    storage_path,
                    verbose,
                    max_failures,
                    "search",
                    space,
                    stopper,
                    clock,
                    budget_of=str(experiment),
                    seed=seed,
                    callbacks=[]
                    if tracker is None
                    else [tracker.callback("search", list(space.search), seed, space.la.epochs, str(experiment))],
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
        recipe_entry, over_recipe, beat, said = None, None, False, None
        if space.confirms and best_config is not None:
            searched = [(dict(r.config), dict(r.metrics or {})) for r in results if r.error is None]
            entries, confirmed_baselines = confirm_top(
                data,
                searched,
                space,
                shared,
                experiment,
                experiment_path,
                seed,
                resources,
                verbose,
                max_failures,
                recipe=recipe,
                stage1_workers=workers,
                planned_per_seed=_planned(experiment).get("epochs", {}).get("confirm_stage1_workers"),
                tracker=tracker,
            )
            confirmed, recipe_entry = split_recipe(entries)
            if confirmed:
                margin = margin_over(confirmed[0], confirmed_baselines["raw_pixels"])
                if recipe_entry is not None:
                    over_recipe = margin_over(confirmed[0], recipe_entry)
                beat, said = verdict(confirmed[0], over_recipe, space.objective)
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
            "recipe": recipe_entry,
            "margin_over_recipe": over_recipe,
            "beat_recipe": beat,
            "verdict": said,
            "warm_start": warm_start_record(f"sqlite:///{experiment / OPTUNA_DB}", name),
            "time_budget_s": budget_s(experiment),
            "ended_by_time_budget": ended_search(experiment),
        }
        write_json(experiment / "best.json", summary)  # atomic; a full disk is named
        if tracker is not None:  # the winner's runs and the verdict tagged, the baselines logged
            tracker.end_of_sweep(summary, space.objective)
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
            recipe_entry,
            over_recipe,
            said,
            beat,
        )


def _start_from(
    warm_start: list[str], data: DataRef, space: SearchSpace, seed: int, param_space: dict, experiment: Path, name: str
) -> None:
    """A new sweep records what makes its scores comparable (sweep.json), creates its study, its objective named
    (so that `laray dashboard` shows it during stage 1 already), and takes over earlier sweeps' trials."""
    from ray.tune.search.optuna import OptunaSearch

    from laray.sweep import warm_start as warm
    from laray.sweep.study import create_study

    identity = warm.sweep_identity(data, space, seed)
    warm.write_identity(experiment, identity)
    create_study(f"sqlite:///{experiment / OPTUNA_DB}", name, space)
    if warm_start:
        # The distributions OptunaSearch samples from: taken-over trials must have the same ones (warm.take_over).
        taken = warm.take_over(warm_start, identity, OptunaSearch.convert_search_space(param_space))
        warm.seed_study(f"sqlite:///{experiment / OPTUNA_DB}", name, space.mode, taken)
        log.info(taken.describe())


def _planned(experiment: Path) -> dict:
    """plan.json as the driver that started the sweep wrote it, or {} (none: --resume of a sweep without one)."""
    import json

    try:
        return json.loads((experiment / "plan.json").read_text())
    except (OSError, ValueError):
        return {}


def _started_here(experiment: Path | None) -> bool:
    """A local sweep folder that a driver began (its lock file) before Tune saved any state of it."""
    return experiment is not None and (experiment / LOCK_NAME).exists()
