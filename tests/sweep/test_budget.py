"""laray.sweep.budget: durations and a real tiny Tune search cut by its budget, then resumed."""

import json
import tempfile
import time
from pathlib import Path

import pytest

from laray.results.scores import tune_trial_states
from laray.settings.duration import BudgetError, parse_duration
from laray.sweep.budget import BUDGET_FILE, budget_parts, ended_search, left_s, resume_budget

BUDGET_S, EPOCH_S, EPOCHS = 6.0, 0.2, 20


@pytest.mark.parametrize(
    "text, seconds",
    [("45s", 45), ("90m", 5400), ("6h", 21600), ("2d", 172800), ("1h30m", 5400), ("1.5h", 5400), (" 1h 30M ", 5400)],
)
def test_parse_duration(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["90", "", "0s", "1m30", "-5m", "1y", "h", "6 hours"])
def test_parse_duration_refuses(text):
    with pytest.raises(BudgetError, match=f"bad time budget {text!r}: .*45s, 90m, 6h"):
        parse_duration(text)


def test_resume_budget_rules(tmp_path):
    with pytest.raises(BudgetError, match="started without time budgets"):
        resume_budget(60, tmp_path)  # no budget.json: a sweep from before budgets
    resume_budget(None, tmp_path)  # no --time-budget: nothing to do
    (tmp_path / BUDGET_FILE).write_text(json.dumps({"budget_s": 60, "spent_s": 20.0, "ended_search": False}))
    resume_budget(600, tmp_path)  # the new value wins; the spent time stays
    assert json.loads((tmp_path / BUDGET_FILE).read_text()) == {"budget_s": 600, "spent_s": 20.0, "ended_search": False}
    assert left_s(tmp_path) == 580 and not ended_search(tmp_path)
    (tmp_path / BUDGET_FILE).write_text(json.dumps({"budget_s": 60, "spent_s": 61.0, "ended_search": True}))
    with pytest.raises(BudgetError, match="does not reopen"):
        resume_budget(600, tmp_path)
    resume_budget(60, tmp_path)  # the same command again is fine
    assert left_s(tmp_path) == 0 and ended_search(tmp_path)


def make_trainable():
    """Defined in a function: cloudpickle sends it by value, as Ray's workers cannot import this test module."""
    epoch_s, epochs = EPOCH_S, EPOCHS

    def trainable(config):
        """EPOCHS epochs of EPOCH_S s, each reported with its checkpoint; a restored trial goes on from it."""
        from ray import tune

        epoch = 0
        if tune.get_checkpoint():
            with tune.get_checkpoint().as_directory() as folder:
                epoch = json.loads((Path(folder) / "state.json").read_text())
        while epoch < epochs:
            time.sleep(epoch_s)
            epoch += 1
            with tempfile.TemporaryDirectory() as folder:
                (Path(folder) / "state.json").write_text(json.dumps(epoch))
                tune.report(
                    {"epoch": epoch, "score": config["x"] * epoch, "at": time.time()},
                    checkpoint=tune.Checkpoint.from_directory(folder),
                )

    return trainable


def test_budget_ends_a_real_search_and_survives_a_resume(ray_session, tmp_path):
    import optuna
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.optuna import OptunaSearch

    experiment = tmp_path / "sweep"
    trainable = make_trainable()
    experiment.mkdir()
    db = f"sqlite:///{experiment / 'optuna.db'}"
    optuna_search = OptunaSearch(
        metric="score",
        mode="max",
        sampler=optuna.samplers.TPESampler(seed=0),
        study_name="sweep",
        storage=optuna.storages.RDBStorage(db),
    )
    searcher, stopper, clock = budget_parts(BUDGET_S, experiment, optuna_search)

    class StartTime(tune.Callback):  # set up just before the budget's clock: its start, a little early
        def setup(self, **info):
            self.at = time.time()

    start = StartTime()
    tuner = tune.Tuner(
        trainable,
        param_space={"x": tune.uniform(0, 1)},
        tune_config=tune.TuneConfig(
            search_alg=searcher,
            metric="score",
            mode="max",
            num_samples=20,
            max_concurrent_trials=2,
            scheduler=ASHAScheduler(time_attr="epoch", max_t=EPOCHS, grace_period=1),
        ),
        run_config=tune.RunConfig(
            name="sweep", storage_path=str(tmp_path), stop=stopper, callbacks=[start, clock], verbose=0
        ),
    )
    results = tuner.fit()
    spent_at = start.at + BUDGET_S  # the budget was spent no earlier than this

    # The search ended early, every trial TERMINATED with its last epoch's checkpoint.
    assert 2 <= len(results) < 20
    assert {t["status"] for t in tune_trial_states(experiment)} == {"TERMINATED"}
    for result in results:
        assert result.error is None
        with result.checkpoint.as_directory() as folder:
            assert json.loads((Path(folder) / "state.json").read_text()) == result.metrics["epoch"]
        # A trial running when the budget ran out stopped at its first epoch end after it.
        assert sum(row > spent_at + 0.05 for row in result.metrics_dataframe["at"]) <= 1
    # Optuna was asked for no trial after the budget was spent, and each asked trial ran.
    study = optuna.load_study(study_name="sweep", storage=db)
    asked = [trial.datetime_start.timestamp() for trial in study.trials]
    assert len(asked) == len(results) and max(asked) <= spent_at
    assert {t.state for t in study.trials} == {optuna.trial.TrialState.COMPLETE}
    assert max(r.metrics["at"] for r in results) > spent_at  # the budget, not the samples, ended it
    state = json.loads((experiment / BUDGET_FILE).read_text())
    assert state["ended_search"] and ended_search(experiment)
    assert BUDGET_S <= state["spent_s"] < BUDGET_S + 15 and left_s(experiment) == 0

    # A resume of the finished search: no new trial, the spent time kept (and a little added).
    resume_budget(None, experiment)
    restored = tune.Tuner.restore(str(experiment), trainable=trainable, resume_unfinished=True, resume_errored=False)
    again = restored.fit()
    assert len(again) == len(results) and len(optuna.load_study(study_name="sweep", storage=db).trials) == len(asked)
    after = json.loads((experiment / BUDGET_FILE).read_text())
    assert after["ended_search"] and after["budget_s"] == BUDGET_S and after["spent_s"] >= state["spent_s"]


def test_a_budget_given_on_resume_counts_from_the_time_spent_before(ray_session, tmp_path):
    """Ctrl-C a search without a budget, resume it with one: the restored parts read the new budget, spent goes on."""
    import os
    import signal

    import optuna
    from ray import tune
    from ray.tune.search.optuna import OptunaSearch

    experiment, trainable = tmp_path / "sweep", make_trainable()
    experiment.mkdir()
    db = f"sqlite:///{experiment / 'optuna.db'}"
    optuna_search = OptunaSearch(metric="score", mode="max", study_name="sweep", storage=optuna.storages.RDBStorage(db))
    searcher, stopper, clock = budget_parts(None, experiment, optuna_search)
    pressed = tmp_path / "ctrl-c"

    class CtrlC(tune.Callback):  # the restore un-pickles it again from tuner.pkl: the file makes it press once only
        def on_trial_result(self, iteration, trials, trial, result, **info):
            if result["epoch"] == 3 and not pressed.exists():
                pressed.touch()
                os.kill(os.getpid(), signal.SIGINT)  # what Ctrl-C does: Tune saves its state and returns

    tune.Tuner(
        trainable,
        param_space={"x": tune.uniform(0, 1)},
        tune_config=tune.TuneConfig(
            search_alg=searcher, metric="score", mode="max", num_samples=20, max_concurrent_trials=2
        ),
        run_config=tune.RunConfig(
            name="sweep", storage_path=str(tmp_path), stop=stopper, callbacks=[CtrlC(), clock], verbose=0
        ),
    ).fit()
    before = json.loads((experiment / BUDGET_FILE).read_text())
    assert before["budget_s"] is None and before["spent_s"] > 0 and left_s(experiment) is None
    asked = len(optuna.load_study(study_name="sweep", storage=db).trials)

    # One second more than spent: it runs out while the restored trials restart from their checkpoints.
    resume_budget(before["spent_s"] + 1.0, experiment)
    results = tune.Tuner.restore(
        str(experiment), trainable=trainable, resume_unfinished=True, resume_errored=False
    ).fit()
    after = json.loads((experiment / BUDGET_FILE).read_text())
    assert after["ended_search"] and after["budget_s"] == before["spent_s"] + 1.0
    assert after["spent_s"] >= after["budget_s"] and left_s(experiment) == 0
    assert len(optuna.load_study(study_name="sweep", storage=db).trials) == asked == len(results) < 20
    assert {t["status"] for t in tune_trial_states(experiment)} == {"TERMINATED"}
    assert all(r.error is None and r.metrics["epoch"] < EPOCHS for r in results)  # stopped by the budget
