"""The sweep's console: a line per trial event, each with the sweep's state and an estimate of the time left.

A Ray Tune callback on the driver. The estimate ("up to ~X left") counts every unfinished trial to
its last epoch, at the median seconds per epoch seen so far, with as many trials at once as the
concurrency limit allows: ASHA stopping trials early makes the real rest shorter, slower epochs longer.
"""

from __future__ import annotations

import logging
import os
import statistics
import sys
import time

from ray import tune

from laray.settings.duration import duration


class _VanishedFile(logging.Filter):
    """Drops Tune's traceback when a snapshot listed a file that was gone when copied.

    On one machine Tune copies the trials' folders while they write; laray writes every file
    through a temporary one renamed into place, and a temporary file can vanish between the
    listing and the copy. The next snapshot copies everything again. Tune's syncer logs the same
    race as text ("Last sync command failed with the following error:" and the traceback).
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], FileNotFoundError):
            return False
        text = str(record.msg)
        return not (text.startswith("Last sync command failed") and "FileNotFoundError" in text)


class _GoneCheckpoint(logging.Filter):
    """Tune's traceback for a checkpoint folder that was already gone when it came to delete it, as one line.

    A driver stopped between deleting an old checkpoint and saving its state leaves the folder listed;
    the resumed driver deletes it again when the trial's next checkpoint comes, and Tune logs the
    FileNotFoundError with its traceback. The folder was meant to go: one warning line says so.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], FileNotFoundError):
            record.msg, record.args = "an old checkpoint was already deleted: %s", (record.exc_info[1],)
            record.exc_info = record.exc_text = None
            record.levelno, record.levelname = logging.WARNING, "WARNING"
        return True


def one_line_for_gone_checkpoints() -> None:
    """On the driver, whatever the verbosity: see _GoneCheckpoint."""
    for name in ("ray.tune.execution.tune_controller", "ray.train._internal.storage"):
        target = logging.getLogger(name)
        if not any(isinstance(f, _GoneCheckpoint) for f in target.filters):
            target.addFilter(_GoneCheckpoint())


class _Dropped(logging.Filter):
    """Drops the records whose message holds one of `parts`: what laray's own lines already say."""

    def __init__(self, *parts: str):
        super().__init__()
        self.parts = parts

    def filter(self, record: logging.LogRecord) -> bool:
        return not any(part in str(record.msg) for part in self.parts)


# logger -> parts of its messages that laray's console says otherwise, or that tell a user nothing to act on
DROPPED = {
    # "The `process_trial_result` operation took 1.107 s, which may be a performance bottleneck.": a busy machine
    "ray.tune.utils.util": ("may be a performance bottleneck",),
    # the stop signal's own messages: laray prints one line with the command that continues (laray.interrupt)
    "ray.tune.tune": ("Stop signal received", "Experiment has been interrupted", "Trials did not complete"),
    # a failed trial's traceback: the console says FAILED and its error.txt holds the traceback
    "ray.tune.execution.tune_controller": ("Trial task failed",),
}


def quiet_ray() -> None:
    """Ray Tune's and Optuna's own console off on the driver (laray's lines stand in for it); --verbose keeps it."""
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # the new engine prints its header and hints even when silent
    # Ray colours the prefix of the lines it forwards from tasks, also into a file: plain text instead.
    os.environ.setdefault("RAY_COLOR_PREFIX", "0")
    # num_to_keep forces a state snapshot at times, and Tune warns each time, to no use here.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # "A new study created in RDB ..."
    # On --resume, trials killed before their first report have no results yet; Tune re-runs them.
    logging.getLogger("ray.tune.analysis.experiment_analysis").setLevel(logging.ERROR)
    for name in ("ray.tune.execution.experiment_state", "ray.train._internal.syncer"):
        copier = logging.getLogger(name)
        if not any(isinstance(f, _VanishedFile) for f in copier.filters):
            copier.addFilter(_VanishedFile())
    for name, parts in DROPPED.items():
        target = logging.getLogger(name)
        if not any(isinstance(f, _Dropped) for f in target.filters):
            target.addFilter(_Dropped(*parts))


class SweepProgress(tune.Callback):
    """Prints, for `label` ("search" or "confirm"), every trial's start, each evaluated epoch and its end.

    The sweep's state is read from Tune's own list of trials at each event, so a resumed sweep
    counts the trials it had finished before.
    """

    def __init__(self, label: str, epochs: int, objective: str, concurrency: int, budget_of: str | None = None):
        # Pickled with Tune's run config (tuner.pkl) and restored with it on --resume: plain values only.
        self.label, self.epochs, self.objective, self.concurrency = label, epochs, objective, max(1, concurrency)
        self.budget_of = budget_of  # the experiment folder whose time budget (laray.sweep.budget) the lines show
        self.setup()

    def setup(self, stop=None, num_samples=None, total_num_samples=None, **info):
        """At the start of every fit, a resumed one too: Tune says how many trials there will be."""
        self.n_trials = total_num_samples or num_samples or 0
        self.began = time.monotonic()
        self.epoch_s: list[float] = []  # seconds per LA epoch, every report so far
        self.reported: dict[str, int] = {}  # trial id -> the epoch of its last report seen here
        self.announced: set[str] | None = None  # trials whose end was said; None until the first step

    def _say(self, text: str) -> None:
        print(f"[{self.label} {duration(time.monotonic() - self.began)}] {text}", file=sys.stdout, flush=True)

    def _epoch(self, trial) -> int:
        return int((trial.last_result or {}).get("epoch", 0))

    def _state(self, trials) -> str:
        status = {t.trial_id: t.status for t in trials}
        ended = {t.trial_id for t in trials if status[t.trial_id] in ("TERMINATED", "ERROR")}

        def count(state, test=lambda t: True):
            return sum(status[t.trial_id] == state and test(t) for t in trials)

        counts = {
            "running": count("RUNNING"),
            "done": count("TERMINATED", lambda t: self._epoch(t) >= self.epochs),
            "stopped early": count("TERMINATED", lambda t: self._epoch(t) < self.epochs),
            "failed": count("ERROR"),
            "waiting": max(0, self.n_trials - len(trials)) + count("PENDING"),
        }
        total = max(self.n_trials, len(trials))
        text = f"{len(ended)}/{total} trials ended ({', '.join(f'{n} {k}' for k, n in counts.items() if n)})"
        if self.epoch_s:
            left = sum(self.epochs - self._epoch(t) for t in trials if t.trial_id not in ended)
            left += max(0, self.n_trials - len(trials)) * self.epochs
            text += f", up to ~{duration(left * statistics.median(self.epoch_s) / self.concurrency)} left"
        return text + self._budget()

    def _budget(self) -> str:
        if getattr(self, "budget_of", None) is None:  # the confirmation, or a sweep pickled by an older laray
            return ""
        from laray.sweep.budget import ended_search, left_s

        left = left_s(self.budget_of)
        if left is None:
            return ""
        return (
            "; time budget spent: no new trials"
            if ended_search(self.budget_of) or left <= 0
            else f"; time budget {duration(left)} left"
        )

    def on_trial_start(self, iteration, trials, trial, **info):
        # Where it starts from: 0, or a restored trial's last reported epoch (its checkpoint's), so that its first
        # report here counts the epochs since (eval_every 5: five of them)
        self.reported[trial.trial_id] = self._epoch(trial)
        self._say(f"trial {trial.trial_id} started; {self._state(trials)}")

    def on_trial_result(self, iteration, trials, trial, result, **info):
        epoch = int(result.get("epoch", 0))
        # Without its start seen: from 0 when this is its first report ever, else one epoch
        first = 0 if result.get("training_iteration") == 1 else epoch - 1
        before = self.reported.get(trial.trial_id, first)
        self.reported[trial.trial_id] = epoch
        if result.get("time_this_iter_s") and epoch > before:  # eval_every > 1 reports every few epochs
            self.epoch_s.append(result["time_this_iter_s"] / (epoch - before))
        score, held = result.get(self.objective), result.get(f"heldout_{self.objective}")
        speed = result.get("images_per_s")
        text = f"trial {trial.trial_id} epoch {epoch}/{self.epochs}"
        text += f"  {self.objective} {score:.3f}" if score is not None else ""
        text += f" (held-out {held:.3f})" if held is not None else ""
        text += f"  {speed:,.0f} img/s" if speed else ""
        self._say(f"{text}; {self._state(trials)}")

    def on_step_end(self, iteration, trials, **info):
        # Trials that ASHA stops end without on_trial_complete: every ending is announced from here.
        if self.announced is None:  # those a resumed sweep had finished before are not news
            self.announced = {t.trial_id for t in trials if t.status in ("TERMINATED", "ERROR")}
        for t in trials:
            if t.status in ("TERMINATED", "ERROR") and t.trial_id not in self.announced:
                self.announced.add(t.trial_id)
                epoch = self._epoch(t)
                how = (
                    "FAILED (its error.txt says why)"
                    if t.status == "ERROR"
                    else "finished"
                    if epoch >= self.epochs
                    else f"stopped by {self._stopper(t.trial_id)} after {epoch}/{self.epochs} epochs"
                )
                self._say(f"trial {t.trial_id} {how}; {self._state(trials)}")

    def _stopper(self, trial_id: str) -> str:
        if getattr(self, "budget_of", None) is not None:
            from laray.sweep.budget import stopped_by_budget

            if stopped_by_budget(self.budget_of, trial_id):
                return "the time budget"
        return "ASHA"

    def on_experiment_end(self, trials, **info):
        from laray.interrupt import requested

        if not requested():  # stopped by a signal: Tune's cleanup marks unfinished trials ended, the saved state not
            self.on_step_end(0, trials)
