"""A time budget for the search (--time-budget 6h): once spent, no new trial starts and running ones stop.

The budget counts the driver's time inside the search's Tuner.fit, summed over resumes, in
STORAGE/NAME/budget.json ({"budget_s", "spent_s", "ended_search"}). Three parts do the work, all
in the driver process where Tune runs them: a Searcher wrapper answers FINISHED instead of
asking Optuna for a new trial, a Stopper stops each running trial at its next report (so it
ends TERMINATED with that epoch's checkpoint, like a trial ASHA stopped), and a Callback keeps
the clock and writes the file.

Tune copies these parts: tuner.pkl holds the ones given to the first Tuner and the experiment
state holds another copy of the stopper, both un-pickled on a resume. So the parts hold only
the experiment folder, and the running clock is looked up by that folder in this process.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from ray.tune import Callback, Stopper
from ray.tune.search import Searcher
from ray.tune.search.util import _set_search_properties_backwards_compatible

from laray.settings.duration import BudgetError
from laray.training.run import write_json

BUDGET_FILE = "budget.json"
SAVE_EVERY_S = 2.0  # a driver killed outright loses at most this much of the spent time
_running: dict[str, "_Clock"] = {}  # experiment folder -> the clock of the search this driver is running
_stopped: dict[str, set] = {}  # experiment folder -> ids of the trials the budget stopped in this driver


def _key(experiment) -> str:
    return str(Path(experiment).expanduser().resolve())


def _read(experiment) -> dict:
    try:
        return json.loads((Path(experiment) / BUDGET_FILE).read_text())
    except FileNotFoundError:  # a sweep started before budgets existed: no budget
        return {"budget_s": None, "spent_s": 0.0, "ended_search": False}


class _Clock:
    """The search's running time from the start of this fit, on top of what earlier fits spent."""

    def __init__(self, experiment: str):
        self.experiment, self.state = experiment, _read(experiment)
        self.started = self.saved = time.monotonic()
        self.spent_before = float(self.state.get("spent_s", 0.0))

    def current(self) -> dict:
        return {**self.state, "spent_s": self.spent_before + time.monotonic() - self.started}

    def save(self) -> None:
        self.saved = time.monotonic()
        write_json(Path(self.experiment) / BUDGET_FILE, self.current())


def _current(experiment: str) -> dict:
    clock = _running.get(experiment)
    return clock.current() if clock else _read(experiment)


def _spent(experiment: str) -> bool:
    """True once the budget is spent; the first time also records that the budget ended the search."""
    state = _current(experiment)
    if state.get("budget_s") is None or state["spent_s"] < state["budget_s"]:
        return False
    if not state.get("ended_search"):
        clock = _running.get(experiment)
        if clock:
            clock.state["ended_search"] = True
            clock.save()
        else:
            write_json(Path(experiment) / BUDGET_FILE, {**state, "ended_search": True})
    return True


class BudgetSearcher(Searcher):
    """The sweep's searcher, answering FINISHED once the budget is spent. Tune's SearchGenerator then asks
    for no more trials, and the experiment ends when the running ones have (TuneController.is_finished)."""

    def __init__(self, searcher: Searcher, experiment: str):
        # `searcher`: the name Tune's SearchGenerator follows to save and restore the inner searcher itself
        self.searcher = searcher
        self.experiment = experiment
        super().__init__(metric=searcher.metric, mode=searcher.mode)

    metric = property(lambda self: self.searcher.metric)
    mode = property(lambda self: self.searcher.mode)

    def suggest(self, trial_id: str):
        # Checked before Optuna is asked: a spent budget leaves no RUNNING Optuna trial behind.
        return Searcher.FINISHED if _spent(self.experiment) else self.searcher.suggest(trial_id)

    def set_search_properties(self, metric, mode, config, **spec) -> bool:
        return _set_search_properties_backwards_compatible(
            self.searcher.set_search_properties, metric, mode, config, **spec
        )

    def set_max_concurrency(self, max_concurrent: int) -> bool:
        return self.searcher.set_max_concurrency(max_concurrent)

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        self.searcher.on_trial_result(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        self.searcher.on_trial_complete(trial_id, result=result, error=error)

    def on_pause(self, trial_id: str) -> None:
        self.searcher.on_pause(trial_id)

    def on_unpause(self, trial_id: str) -> None:
        self.searcher.on_unpause(trial_id)

    def get_state(self) -> dict:
        return {}  # the spent time lives in budget.json, read when a fit starts

    def set_state(self, state: dict) -> None:
        pass


class BudgetStopper(Stopper):
    """Stops a trial at its first report once the budget is spent; never stops all at once (mid-epoch)."""

    def __init__(self, experiment: str):
        self.experiment = experiment

    def __call__(self, trial_id: str, result: dict) -> bool:
        if not _spent(self.experiment):
            return False
        _stopped.setdefault(self.experiment, set()).add(trial_id)
        return True

    def stop_all(self) -> bool:
        return False


class BudgetClock(Callback):
    """Runs the clock from the start of each fit (setup) to its end, writing budget.json every few seconds."""

    def __init__(self, experiment: str):
        self.experiment = experiment

    def setup(self, **info) -> None:
        _running[self.experiment] = _Clock(self.experiment)

    def on_step_end(self, iteration: int, trials: list, **info) -> None:
        clock = _running.get(self.experiment)
        if clock and time.monotonic() - clock.saved >= SAVE_EVERY_S:
            clock.save()

    def on_experiment_end(self, trials: list, **info) -> None:  # also after an error or Ctrl-C (TuneController.cleanup)
        clock = _running.pop(self.experiment, None)
        if clock:
            clock.save()


def budget_parts(seconds: float | None, experiment, searcher: Searcher):
    """A new search: record the budget (None: none yet; a resume may set one) and return
    (searcher for TuneConfig(search_alg=), stopper for RunConfig(stop=), callback for RunConfig(callbacks=))."""
    key = _key(experiment)
    write_json(Path(key) / BUDGET_FILE, {"budget_s": seconds, "spent_s": 0.0, "ended_search": False})
    return BudgetSearcher(searcher, key), BudgetStopper(key), BudgetClock(key)


def resume_budget(seconds: float | None, experiment) -> None:
    """A resume: Tune brings back the parts from tuner.pkl; a new budget replaces the recorded one (None: keep it)."""
    if seconds is None:
        return
    path = Path(experiment) / BUDGET_FILE
    if not path.exists():
        raise BudgetError(
            f"the sweep at {experiment} was started without time budgets: resume it without "
            "--time-budget, or start a new sweep"
        )
    state = _read(experiment)
    if state.get("ended_search") and seconds != state.get("budget_s"):
        # Tune saved its search as finished; a restore keeps it so, whatever the budget says now.
        raise BudgetError(
            "the time budget already ended this sweep's search, which a resume does not reopen: "
            "resume without --time-budget, or start a new sweep"
        )
    write_json(path, {**state, "budget_s": seconds})


def left_s(experiment) -> float | None:
    """Seconds of budget left (live while the search runs in this driver); None: no budget."""
    state = _current(_key(experiment))
    return None if state.get("budget_s") is None else max(0.0, state["budget_s"] - state["spent_s"])


def stopped_by_budget(experiment, trial_id: str) -> bool:
    """Whether the budget stopped this trial (in this driver): for the console's line about its end."""
    return trial_id in _stopped.get(_key(experiment), ())


def budget_s(experiment) -> float | None:
    """The budget in force (the one recorded, which a resume may have replaced); None: none."""
    return _current(_key(experiment)).get("budget_s")


def ended_search(experiment) -> bool:
    """Whether the budget ended the search (refused a new trial or stopped a running one): for best.json."""
    return bool(_current(_key(experiment)).get("ended_search"))
