"""ASHA whose rungs survive a resume: Ray Tune saves its searcher's state with the experiment, not its scheduler's.

Tuner.restore brings the scheduler back as it was pickled when the sweep began (tuner.pkl), with
empty rungs. A resumed trial then records its next result at a rung it had passed before the
stop, with a later, better epoch's score, and raises that rung's cutoff: a sweep stopped by
SIGINT and resumed once stopped a trial that the same sweep left alone let run (seen in
tests/faults/test_stop_signals.py). This scheduler writes its rungs to STORAGE/NAME/asha.json after each
result and reads them back at its first call after a restore, so that a resumed sweep decides
as the uninterrupted one would.
"""

from __future__ import annotations

import json
from pathlib import Path

from ray.tune.schedulers import ASHAScheduler

from laray.training.run import write_json

STATE_FILE = "asha.json"


class ResumableASHA(ASHAScheduler):
    def __init__(self, experiment: str | Path, **kwargs):
        super().__init__(**kwargs)
        self.state_file = str(Path(experiment) / STATE_FILE)
        self._loaded = False  # pickled so into tuner.pkl: a restored copy loads the file at its first call

    def _load_once(self) -> None:
        if self._loaded:
            return
        self._loaded = True
        path = Path(self.state_file)
        if not path.exists():  # a new sweep
            return
        state = json.loads(path.read_text())
        for bracket, rungs in zip(self._brackets, state["rungs"]):
            bracket._rungs = [(milestone, dict(recorded)) for milestone, recorded in rungs]
        self._num_stopped = state["num_stopped"]

    def _save(self) -> None:
        write_json(
            Path(self.state_file),
            {"rungs": [[[m, r] for m, r in b._rungs] for b in self._brackets], "num_stopped": self._num_stopped},
        )

    def on_trial_add(self, tune_controller, trial) -> None:
        self._load_once()  # before a restored trial is given a bracket: the brackets as they were
        super().on_trial_add(tune_controller, trial)

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        self._load_once()
        action = super().on_trial_result(tune_controller, trial, result)
        self._save()
        return action

    def on_trial_complete(self, tune_controller, trial, result: dict) -> None:
        self._load_once()
        super().on_trial_complete(tune_controller, trial, result)
        self._save()
