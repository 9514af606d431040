"""Experiment tracking with MLflow (`laray sweep --track mlflow`, or `track:` in the space): every search trial and
confirmation run as an MLflow run, the winner and the verdict tagged when the sweep ends.

Where: `--track mlflow` keeps the runs in a SQLite store in the sweep's folder, STORAGE/NAME/MLFLOW_DB
(`laray dashboard STORAGE/NAME` starts the MLflow UI on it); `--track URI` sends them to that MLflow
tracking server (a team's: http://..., or any URI MLflow takes). One MLflow experiment per sweep,
named like the sweep (NAME), the search's trials and the confirmation's runs both in it:

    run "search 3 (trial 5f0c2_00002)"  tags laray.phase=search, laray.trial_id, laray.seed, laray.stopped_by
    run "confirm #1 seed 2"             tags laray.phase=confirm, laray.config=#1, laray.seed=2, ...
    run "the recipe seed 2"             the recipe (what `laray train` runs) re-run beside them, laray.config=recipe
    run "summary"                       laray.phase=summary: the baselines, the winner's scores and margins,
                                        the verdict; written when the sweep ends

Each trial's run holds its settings as params (a confirmation run's LA settings under their own names, like a
search trial's, and its seed), each reported epoch's scores as metrics (step: the LA epoch), how it ended
(its status: FINISHED, FAILED, KILLED by a stop signal; laray.stopped_by: ASHA, time budget or none).
When the sweep ends, the winner's runs get laray.winner=true and the experiment the tags laray.verdict,
laray.beat_recipe and laray.margin_over_recipe (best.json's).

Ray Tune's MLflowLoggerCallback does the logging; `SweepRuns` changes how it finds a trial's run. Tune's keeps
them in memory, and `laray sweep --resume` (Tuner.restore) starts with a fresh callback: each resumed trial
would get a second run. SweepRuns looks a trial's run up in the store by its tags (laray.sweep_id, the sweep's
own id, and laray.trial_id, which Tune keeps across a resume), reopens it and logs only the epochs it lacks;
the run of a trial that Tune had not saved when its driver died is deleted (SweepRuns.on_step_begin).
The choice of store is made when a sweep starts and kept in STORAGE/NAME/RECORD: Tune keeps its callbacks
with the experiment (tuner.pkl) and a resumed search logs where the sweep began.

mlflow is imported here only, and only when tracking is on: a missing package is one line naming the extra.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import sys
import time
import uuid
from pathlib import Path

from ray.air.integrations.mlflow import MLflowLoggerCallback

from laray.errors import LarayError, SweepError
from laray.scoring.confirm import RECIPE_MARK, same_config, without_mark
from laray.sweep.trainable import REPORTED

MLFLOW = "mlflow"  # --track mlflow: the SQLite store in the sweep's folder
MLFLOW_DB = "mlflow.db"  # STORAGE/NAME/mlflow.db
RECORD = "tracking.json"  # STORAGE/NAME/tracking.json: where the sweep's runs go, and its id in them
INSTALL = 'pip install "laray[tracking]"'

SWEEP_ID, PHASE, TRIAL_ID, SEED = "laray.sweep_id", "laray.phase", "laray.trial_id", "laray.seed"
CONFIG, SETTINGS, STOPPED_BY, EPOCHS_RUN = "laray.config", "laray.settings", "laray.stopped_by", "laray.epochs_run"
WINNER, VERDICT, BEAT_RECIPE, MARGIN_OVER_RECIPE = (
    "laray.winner",
    "laray.verdict",
    "laray.beat_recipe",
    ("laray.margin_over_recipe"),
)
SEARCH, CONFIRM, SUMMARY = "search", "confirm", "summary"
RECIPE = "recipe"  # laray.config of the recipe's confirmation runs
LOST = "lost: its driver died before Tune saved the trial; the resumed sweep ran another in its place"
METRICS = (*REPORTED, "time_total_s")  # what each result logs, when reported
# MLflow 3's tag for what an experiment holds: model training, not GenAI traces (the UI's view of it is picked by
# its address's ?workflowType=machine_learning, laray.results.dashboards.mlflow_runs_page)
EXPERIMENT_KIND, MODEL_TRAINING = "mlflow.experimentKind", "custom_model_development"


def check_installed() -> None:
    """A LarayError in one line when mlflow is not installed."""
    try:
        import mlflow  # noqa: F401
    except ImportError:
        raise LarayError(f"--track mlflow needs the package mlflow: {INSTALL}") from None


def tracking_uri(tracking: str, experiment: Path) -> str:
    """--track's value as MLflow's tracking URI: "mlflow" is the sweep's own SQLite store."""
    return f"sqlite:///{Path(experiment) / MLFLOW_DB}" if tracking == MLFLOW else tracking


@dataclasses.dataclass(frozen=True)
class Tracking:
    """Where a sweep's runs go (`uri`, MLflow experiment `experiment_name`) and its id in them (`sweep_id`)."""

    uri: str
    experiment_name: str
    sweep_id: str

    def record(self, experiment: Path) -> None:
        """A new sweep's store opened (its experiment created: a tracking server that does not answer is one line
        now, not after stage 1), then its choice recorded in RECORD."""
        import os

        import mlflow

        from laray.training.run import write_json

        _quiet_mlflow()
        retries = os.environ.get("MLFLOW_HTTP_REQUEST_MAX_RETRIES")
        os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "1"  # MLflow's default, 7, waits minutes for a dead server
        try:
            _experiment_id(mlflow.MlflowClient(tracking_uri=self.uri), self.experiment_name, self.uri)
        except Exception as exc:  # MlflowException, an unknown scheme, a server that does not answer
            said = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise LarayError(f"--track: MLflow cannot record the sweep's runs at {self.uri}: {said}") from None
        finally:
            if retries is None:
                os.environ.pop("MLFLOW_HTTP_REQUEST_MAX_RETRIES", None)
            else:
                os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = retries
        write_json(Path(experiment) / RECORD, dataclasses.asdict(self))

    def callback(
        self,
        phase: str,
        names: list[str],
        seed: int,
        epochs: int,
        budget_of: str | None = None,
        contenders: list[dict] | None = None,
    ) -> "SweepRuns":
        """The Tune callback of the search (phase SEARCH) or the confirmation (CONFIRM, with its `contenders`)."""
        return SweepRuns(self, phase, names, seed, epochs, budget_of, contenders)

    def end_of_sweep(self, summary: dict, objective: str) -> None:
        """The winner's runs tagged, the verdict on the experiment, the baselines and margins in a "summary" run.

        After best.json is written: a tracking server that fails now costs these tags, not the sweep's answer,
        and is one line on stderr.
        """
        try:
            self._end_of_sweep(summary, objective)
        except Exception as exc:  # MlflowException, a server gone, a full disk: best.json holds it all
            said = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            print(
                f"laray: MLflow at {self.uri}: the winner and the verdict were not recorded ({said})", file=sys.stderr
            )

    def _end_of_sweep(self, summary: dict, objective: str) -> None:
        import mlflow
        from mlflow.entities import Metric, Param, RunTag

        _quiet_mlflow()
        client = mlflow.MlflowClient(tracking_uri=self.uri)
        experiment_id = _experiment_id(client, self.experiment_name, self.uri)
        runs = _runs(client, experiment_id, self.sweep_id)
        confirmed = summary.get("confirmed") or []
        winner = confirmed[0]["config"] if confirmed else summary.get("best_config")
        if winner is not None:
            for run in runs:
                settings = run.data.tags.get(SETTINGS)
                if run.data.tags.get(PHASE) in (SEARCH, CONFIRM) and settings is not None:
                    if same_config(json.loads(settings), winner) and run.data.tags.get(CONFIG) != RECIPE:
                        client.set_tag(run.info.run_id, WINNER, "true")
        verdict_tags = {
            VERDICT: summary.get("verdict") or "no verdict: nothing was confirmed",
            BEAT_RECIPE: str(bool(summary.get("beat_recipe"))).lower(),
            MARGIN_OVER_RECIPE: _describe(summary.get("margin_over_recipe"), objective),
        }
        for key, value in verdict_tags.items():
            client.set_experiment_tag(experiment_id, key, value)

        metrics = _summary_metrics(summary)
        existing = [r for r in runs if r.data.tags.get(PHASE) == SUMMARY]
        if existing:  # a sweep resumed after its end: the same run, only what changed logged again
            run_id, logged = existing[0].info.run_id, existing[0].data.metrics
            metrics = {k: v for k, v in metrics.items() if not _same(logged.get(k), v)}
        else:
            run_id = client.create_run(
                experiment_id, run_name=SUMMARY, tags={SWEEP_ID: self.sweep_id, PHASE: SUMMARY}
            ).info.run_id
            params = {"winner/" + k: v for k, v in without_mark(winner or {}).items()}
            params.update(n_trials=summary.get("n_trials"), n_errored=summary.get("n_errored"))
            params.update(holdout=summary.get("holdout"), time_budget_s=summary.get("time_budget_s"))
            client.log_batch(run_id, params=[Param(k, _param(v)) for k, v in params.items()])
        now = int(time.time() * 1000)
        client.log_batch(
            run_id,
            metrics=[Metric(k, v, now, 0) for k, v in metrics.items()],
            tags=[RunTag(k, v) for k, v in verdict_tags.items()],
        )
        client.set_terminated(run_id, "FINISHED")


def sweep_tracking(tracking: str | None, experiment: Path, name: str, resume: bool) -> Tracking | None:
    """The sweep's Tracking, or None when it tracks nothing; checked before the sweep starts (or goes on).

    tracking: None (off; on --resume: as the sweep began), MLFLOW, or an MLflow tracking URI. A new sweep
    records its choice (RECORD); a resumed one keeps it: Tune restores the search's callback as it was. resume:
    whether Tune restores the search (a sweep stopped in stage 1 starts its search afresh, in the same store).
    """
    recorded = _recorded(experiment)
    if recorded is not None and not resume and tracking is None:
        # begun here and stopped before its search (in stage 1), resumed: no run recorded yet, the same store
        check_installed()
        return recorded
    if recorded is not None and resume:
        if tracking is not None and tracking_uri(tracking, experiment) != recorded.uri:
            raise SweepError(
                f"--track {tracking}: this sweep records its runs at {recorded.uri}; resume it with that "
                "--track or without one"
            )
        check_installed()
        return recorded
    if tracking is None:
        return None
    if resume:
        raise SweepError(f"--track {tracking}: this sweep began without tracking, which is chosen when a sweep starts")
    check_installed()
    return Tracking(tracking_uri(tracking, experiment), name, uuid.uuid4().hex[:12])


def _recorded(experiment: Path) -> Tracking | None:
    try:
        raw = json.loads((Path(experiment) / RECORD).read_text())
        return Tracking(str(raw["uri"]), str(raw["experiment_name"]), str(raw["sweep_id"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None


class SweepRuns(MLflowLoggerCallback):
    """Ray Tune's MLflow callback, one run per trial even across resumes (see the module), laray's names and tags.

    Plain values only, like laray's other callbacks: Tune pickles them with the run config (tuner.pkl).
    """

    def __init__(
        self,
        tracking: Tracking,
        phase: str,
        names: list[str],
        seed: int,
        epochs: int,
        budget_of: str | None = None,
        contenders: list[dict] | None = None,
    ):
        super().__init__(
            tracking_uri=tracking.uri,
            experiment_name=tracking.experiment_name,
            tags={SWEEP_ID: tracking.sweep_id, PHASE: phase},
            save_artifact=False,
        )
        self.sweep_id, self.phase, self.names, self.seed = tracking.sweep_id, phase, list(names), seed
        self.epochs, self.budget_of, self.contenders = epochs, budget_of, list(contenders or [])

    def setup(self, *args, **kwargs):
        import mlflow

        _quiet_mlflow()
        _experiment_id(mlflow.MlflowClient(tracking_uri=self.tracking_uri), self.experiment_name, self.tracking_uri)
        super().setup(*args, **kwargs)  # the tracking URI set, the experiment found
        self._client = self.mlflow_util._get_client()
        # The runs this sweep's phase already has (a resume): trial id -> (run id, last epoch logged)
        self._stored = {
            run.data.tags[TRIAL_ID]: (run.info.run_id, int(run.data.metrics.get("epoch", 0)))
            for run in _runs(self._client, self.mlflow_util.experiment_id, self.sweep_id, self.phase)
            if TRIAL_ID in run.data.tags
        }
        self._last_step: dict = {}
        self._ended: set = set()
        self._lost_checked = not self._stored

    def on_step_begin(self, iteration, trials, **info):
        """Once, on a resume: the runs of trials that Tune did not save before its driver died are deleted.

        Tune saves its state every few seconds; a trial started since is unknown to the resumed sweep, whose
        searcher asks for another in its place (Optuna's trial is failed, laray.sweep.driver). Its run, kept,
        would stand beside its successor's as a second run of one trial. MLflow's deletion can be undone:
        the run stays in the store, listed under the UI's "Deleted" runs, tagged laray.stopped_by=LOST.
        """
        if self._lost_checked:
            return
        self._lost_checked = True
        known = {t.trial_id for t in trials}
        for trial_id, (run_id, _) in self._stored.items():
            if trial_id not in known:
                self._client.set_tag(run_id, STOPPED_BY, LOST)
                self._client.set_terminated(run_id, status="KILLED")
                self._client.delete_run(run_id)

    def settings(self, config: dict) -> dict:
        """A trial's settings: a confirmation run's LA settings under their own names, like a search trial's."""
        return without_mark(config["la"]) if self.phase == CONFIRM else dict(config)

    def _seed(self, config: dict) -> int:
        return int(config.get("seed", self.seed)) if self.phase == CONFIRM else self.seed

    def _label(self, config: dict) -> str | None:
        """A confirmation run's configuration: "#1" (the search's best), "#2"..., or RECIPE."""
        if self.phase != CONFIRM:
            return None
        if config["la"].get(RECIPE_MARK):
            return RECIPE
        searched = [c for c in self.contenders if not c.get(RECIPE_MARK)]
        found = [i for i, c in enumerate(searched) if same_config(c, config["la"])]
        return f"#{found[0] + 1}" if found else "#?"

    def run_name(self, trial) -> str:
        if self.phase == CONFIRM:
            label, seed = self._label(trial.config), self._seed(trial.config)
            return f"the recipe seed {seed}" if label == RECIPE else f"confirm {label} seed {seed}"
        number = str(getattr(trial, "experiment_tag", "")).split("_", 1)[0]  # Tune's count: "3_mixing_rate=..."
        return f"search {number} (trial {trial.trial_id})" if number.isdigit() else f"search trial {trial.trial_id}"

    def log_trial_start(self, trial) -> None:
        from mlflow.entities import Param

        if trial in self._trial_runs:  # restarted after a failure (max_failures): the same run goes on
            return
        stored = self._stored.get(trial.trial_id)
        if stored is not None:  # a resumed sweep: its run goes on, with the epochs it lacks
            run_id, last = stored
            self._client.update_run(run_id, status="RUNNING")
            self._trial_runs[trial], self._last_step[trial] = run_id, last
            return
        settings = self.settings(trial.config)
        tags = {
            **self.tags,
            TRIAL_ID: trial.trial_id,
            SEED: str(self._seed(trial.config)),
            SETTINGS: json.dumps(settings, sort_keys=True, default=str),
            "trial_name": str(trial),
        }
        if self.phase == CONFIRM:
            tags[CONFIG] = self._label(trial.config)
        run = self._client.create_run(self.mlflow_util.experiment_id, run_name=self.run_name(trial), tags=tags)
        self._trial_runs[trial], self._last_step[trial] = run.info.run_id, 0
        params = {**_flat(settings), "seed": self._seed(trial.config)}
        self._client.log_batch(run.info.run_id, params=[Param(k, _param(v)) for k, v in params.items()])

    def log_trial_result(self, iteration: int, trial, result: dict) -> None:
        from mlflow.entities import Metric

        if trial not in self._trial_runs:
            self.log_trial_start(trial)
        step = int(result.get("epoch") or result.get("training_iteration") or 0)
        if step <= self._last_step.get(trial, 0):  # logged before the driver stopped
            return
        self._last_step[trial] = step
        now = int(time.time() * 1000)
        metrics = [Metric(k, float(result[k]), now, step) for k in METRICS if _number(result.get(k))]
        self._client.log_batch(self._trial_runs[trial], metrics=metrics)

    def log_trial_end(self, trial, failed: bool = False) -> None:
        from laray.interrupt import requested

        if trial not in self._trial_runs or trial in self._ended:
            return
        self._ended.add(trial)
        run_id = self._trial_runs[trial]
        epochs_run = self._last_step.get(trial, 0)
        if failed:
            status, how = "FAILED", "error"
        elif requested():  # a stop signal: Tune ends it now, and a --resume goes on with it
            status, how = "KILLED", "stop signal"
        else:
            status, how = "FINISHED", self._stopped_by(trial, epochs_run)
        self._client.set_tag(run_id, STOPPED_BY, how)
        self._client.set_tag(run_id, EPOCHS_RUN, str(epochs_run))
        self._client.set_terminated(run_id, status=status)

    def _stopped_by(self, trial, epochs_run: int) -> str:
        from laray.sweep.budget import stopped_by_budget
        from laray.sweep.study import stopped_by

        budget = self.budget_of is not None and stopped_by_budget(self.budget_of, trial.trial_id)
        return stopped_by(epochs_run, self.epochs, budget)

    def on_experiment_end(self, trials, **info):
        """Stopped by a signal: the runs Tune did not end are KILLED (a --resume reopens them)."""
        from laray.interrupt import requested

        if requested():
            for trial in list(self._trial_runs):
                if trial not in self._ended:
                    self._ended.add(trial)
                    self._client.set_terminated(self._trial_runs[trial], status="KILLED")


def _runs(client, experiment_id: str, sweep_id: str, phase: str | None = None) -> list:
    """The sweep's runs in the experiment (of one phase), every page."""
    query = f"tags.`{SWEEP_ID}` = '{sweep_id}'" + (f" and tags.`{PHASE}` = '{phase}'" if phase else "")
    runs, token = [], None
    while True:
        page = client.search_runs([experiment_id], filter_string=query, max_results=1000, page_token=token)
        runs += list(page)
        token = page.token
        if not token:
            return runs


def _experiment_id(client, name: str, uri: str) -> str:
    """The MLflow experiment `name`, created if need be; in the sweep's own store with its artifact location in the
    sweep's folder (MLflow's default is ./mlruns in the current folder; laray logs no artifacts there, nor anywhere)."""
    found = client.get_experiment_by_name(name)
    if found is not None:
        if EXPERIMENT_KIND not in found.tags:
            client.set_experiment_tag(found.experiment_id, EXPERIMENT_KIND, MODEL_TRAINING)
        return found.experiment_id
    local = uri.startswith("sqlite:///") and uri.endswith(f"/{MLFLOW_DB}")
    location = (Path(uri.removeprefix("sqlite:///")).parent / "mlartifacts").as_uri() if local else None
    return client.create_experiment(name, artifact_location=location, tags={EXPERIMENT_KIND: MODEL_TRAINING})


def _summary_metrics(summary: dict) -> dict[str, float]:
    """The numbers of best.json worth a chart: the baselines (k-means on raw pixels, on the auto-encoder's codes),
    the search's best trial, the confirmed winner's and the recipe's means, the winner's margins; flat keys."""
    out = {}

    def add(prefix: str, scores: dict | None, suffix: str = "") -> None:
        for key, value in (scores or {}).items():
            if key.endswith(suffix) and _number(value):
                out[f"{prefix}/{key}"] = float(value)

    for name, scores in (summary.get("baselines") or {}).items():
        add(f"baseline/{name}", scores)
    for name, scores in (summary.get("confirmed_baselines") or {}).items():
        add(f"confirm_baseline/{name}", scores, "_mean")
    add("search_best", summary.get("best_metrics"))
    confirmed = summary.get("confirmed") or []
    if confirmed:
        add("winner", confirmed[0], "_mean")
    add("recipe", summary.get("recipe"), "_mean")
    add("margin_over_raw_pixels", summary.get("margin_over_raw_pixels"), "_mean")
    add("margin_over_recipe", summary.get("margin_over_recipe"), "_mean")
    return out


def _describe(margin: dict | None, objective: str) -> str:
    """The winner minus the recipe on the objective: its mean and 95 % interval, as best.json has them."""
    if not margin or f"{objective}_mean" not in margin:
        return "none: the recipe was not re-run beside the winner"
    ci = margin.get(f"{objective}_ci95")
    text = f"{objective} {margin[f'{objective}_mean']:+.4f}"
    return text + (f" [{ci[0]:+.4f}, {ci[1]:+.4f}]" if ci else "")


def _flat(settings: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in settings.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}/"))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _param(value) -> str:
    return str(value)[:6000]  # MLflow's limit on a param's value


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value)


def _same(logged, value: float) -> bool:
    return logged is not None and math.isclose(logged, value, rel_tol=1e-12, abs_tol=0.0)


def _quiet_mlflow() -> None:
    """No INFO lines from MLflow's SQL store (alembic's migrations when mlflow.db is created) in the sweep's console."""
    for name in ("alembic", "mlflow"):
        logging.getLogger(name).setLevel(logging.WARNING)
