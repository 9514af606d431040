"""The sweep's Optuna study as a dashboard shows it: its objective named, and how each trial ended.

Two things optuna-dashboard cannot know from Ray Tune's OptunaSearch alone:
- the objective's name: Optuna calls it "Objective 0" unless the study names it
  (`Study.set_metric_names`); `create_study` does when a sweep starts (before stage 1, and so
  before a warm start adds trials) and `name_stored_objective` when it is resumed;
- which trials ASHA or the time budget stopped: OptunaSearch tells every trial that ended
  without error COMPLETE with its last score. `ReportingOptunaSearch` records on each such
  trial, before telling it, the user attributes STOPPED_BY ("ASHA", "time budget" or "none")
  and EPOCHS_RUN (the LA epochs it ran), which optuna-dashboard lists with the trial.

Stopped trials stay COMPLETE rather than PRUNED, so that TPE goes on weighing them as it always
has. Optuna's TPESampler (optuna/samplers/_tpe/sampler.py, `_split_trials`) fills its "good"
group with COMPLETE trials first, ranked by value, and takes PRUNED trials only when fewer
COMPLETE ones than the group's size exist, ranked by the deepest step reached and then by the
last intermediate value. Marked PRUNED, a trial that ASHA stopped after 3 epochs at a high
score would rank below every full run, even worse ones (the demo's confirmed winner was such a
trial, docs/sweeps.md), and its intermediate values lack the epoch it was stopped at (Tune does
not pass the stopping result to the searcher's on_trial_result). PRUNED trials would also drop
out of warm starts (laray.sweep.warm_start takes COMPLETE trials) and of `laray analyze`'s
history and importances.

Ray is imported at the top: import this module only once ray_setup.ray_init has run.
"""

from __future__ import annotations

import math
import warnings

import optuna
from ray.tune.search.optuna import OptunaSearch

from laray.sweep.budget import stopped_by_budget

STOPPED_BY, EPOCHS_RUN = "stopped_by", "epochs_run"  # user attributes of each trial Tune finished
ASHA, TIME_BUDGET, NOT_STOPPED = "ASHA", "time budget", "none"


def name_objective(study: optuna.Study, objective: str) -> None:
    """The study's objective named (optuna-dashboard shows it instead of "Objective 0"); idempotent."""
    if study.metric_names != [objective]:
        with warnings.catch_warnings():  # "set_metric_names is experimental": in Optuna since 3.2, and harmless here
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.set_metric_names([objective])


def create_study(storage: str, name: str, space) -> optuna.Study:
    """The sweep's study `name` in `storage` (a URL or an Optuna storage), created or loaded, its objective named.

    OptunaSearch then loads it (load_if_exists), as does laray.sweep.warm_start.seed_study.
    """
    direction = "maximize" if space.mode == "max" else "minimize"
    study = optuna.create_study(storage=storage, study_name=name, load_if_exists=True, direction=direction)
    name_objective(study, space.objective)
    return study


def sampler_settings(num_samples: int, max_concurrent: int) -> dict:
    """TPESampler's settings for a search of num_samples trials, max_concurrent at a time.

    - n_startup_trials: Optuna's default, 10 random trials before TPE models anything, is more than
      a CPU sweep's whole budget (6 to 12 trials): a third of the trials, at least 2, at most 10.
    - multivariate: one joint density over the settings rather than one per setting, since LA's
      settings act together (a colder temperature wants a different mixing rate).
    Simulated searches over the measured landscapes (benchmarks/sampler_sim.py, docs/landscape.md)
    found no measurable difference between these settings, Optuna's defaults and random search at
    6-12 trials: the recipe tried first is what mattered there.
    - constant_liar: with trials running side by side, the running ones count as bad results, so
      that two trials sampled at once are not the same point.
    """
    return {
        "n_startup_trials": min(10, max(2, math.ceil(num_samples / 3))),
        "multivariate": True,
        "constant_liar": max_concurrent > 1,
    }


def optuna_search(
    space,
    storage: str,
    name: str,
    seed: int,
    experiment: str,
    num_samples: int | None = None,
    first: dict | None = None,
) -> ReportingOptunaSearch:
    """The sweep's searcher: seeded TPE over the study `name` in `storage` (a URL), its objective named, sized
    for num_samples trials (None: the space's).

    first: a configuration tried before anything is sampled (the recipe, laray.settings.defaults.recipe_point);
    left out when a searched categorical setting does not offer its value.
    """
    rdb = optuna.storages.RDBStorage(storage)
    create_study(rdb, name, space)  # named before the first trial, also when _start_from did not run first
    offered = first is not None and all(
        dist.kind != "categorical" or first.get(key) in dist.args for key, dist in space.search.items()
    )
    # A recipe outside a searched range is tried all the same (Optuna uses an enqueued value as given); its
    # warning, once per setting, would read like a fault in the console.
    warnings.filterwarnings("ignore", message=r"Fixed parameter .* is out of range", category=UserWarning)
    with warnings.catch_warnings():  # multivariate and constant_liar are "experimental": in Optuna since 2.2
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        settings = sampler_settings(num_samples or space.num_samples, space.max_concurrent)
        sampler = optuna.samplers.TPESampler(seed=seed, **settings)
    return ReportingOptunaSearch(
        metric=space.objective,
        mode=space.mode,
        sampler=sampler,
        study_name=name,
        storage=rdb,
        points_to_evaluate=[dict(first)] if offered else None,
        epochs=max(1, space.la.epochs),
        experiment=experiment,
    )


def name_stored_objective(storage: str, name: str, objective: str) -> None:
    """A resumed sweep's study named too (one an older laray started has no name); nothing when it has no study."""
    try:
        study = optuna.load_study(study_name=name, storage=storage)
    except KeyError:  # stopped before the search created it
        return
    name_objective(study, objective)


def stopped_by(epochs_run: int, epochs: int, budget_stopped: bool) -> str:
    """Who ended a trial that Tune finished without an error, by the LA epochs it ran out of `epochs`."""
    if epochs_run >= epochs:
        return NOT_STOPPED
    return TIME_BUDGET if budget_stopped else ASHA


class ReportingOptunaSearch(OptunaSearch):
    """OptunaSearch that records, on each Optuna trial it tells, who stopped it and after how many epochs.

    epochs: the LA epochs of a full trial; experiment: the sweep's folder, whose time budget
    (laray.sweep.budget) knows which trials it stopped. Both are pickled with the searcher's
    state, so a resumed sweep records the same way.
    """

    def __init__(self, *args, epochs: int, experiment: str, **kwargs):
        super().__init__(*args, **kwargs)
        self._laray_epochs, self._laray_experiment = epochs, experiment

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        ot_trial = self._ot_trials.get(trial_id)
        # Only a trial that reported (result with its epoch) and is still RUNNING in Optuna can take attributes;
        # an errored one is told FAIL, which says enough.
        if (
            ot_trial is not None
            and not error
            and result
            and "epoch" in result
            and trial_id not in self._completed_trials
        ):
            epochs_run = int(result["epoch"])
            ended = stopped_by(epochs_run, self._laray_epochs, stopped_by_budget(self._laray_experiment, trial_id))
            try:
                ot_trial.set_user_attr(STOPPED_BY, ended)
                ot_trial.set_user_attr(EPOCHS_RUN, epochs_run)
            except optuna.exceptions.UpdateFinishedTrialError:
                # Told already by a driver killed before Tune saved that the trial had ended: on resume Tune ends
                # it again; Optuna keeps what was recorded (OptunaSearch's own tell logs this case and goes on).
                pass
        super().on_trial_complete(trial_id, result=result, error=error)
