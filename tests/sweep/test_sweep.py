"""The sweep layer: search spaces, Ray Tune + Optuna sweeps, stage-1 reuse, resume, faults, `laray sweep`.

Sweeps run on 120 of the embedded digits, written as PNG files in species folders (so trials
decode them through the real data path), with a tiny VGG (vgg11_bn at width 0.125, 32 px),
one stage-1 epoch and two or three LA epochs, on a local Ray instance with 2 CPUs (the
session fixture `ray_session` in conftest.py). Each sweep takes 10-30 s on 2 cores.
"""

import json
import os
import re
import socket
import sqlite3
import subprocess
import sys
import textwrap
import time
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from conftest import tensorboard_hparams, write_digit_folder, write_vgg_weights

from laray.data.dataset import describe
from laray.errors import SweepError
from laray.scoring.confirm import contenders, verdict
from laray.scoring.metrics import purity
from laray.settings.config import LAConfig, replace
from laray.settings.space import SEARCHABLE, SpaceError, load_space, parse_space
from laray.sweep.driver import OPTUNA_DB, SweepRun, TrialResources, run_sweep
from laray.sweep.hparams import shown
from laray.sweep.trainable import NONFINITE_MARKER, ignore_exit_in_callbacks
from laray.sweep.tune_space import tune_space
from laray.training import store as ae_store
from laray.training.store import store_key

N = 120
SEED = 0
AE = {"arch": "vgg11_bn", "width": 0.125, "image_size": 32, "epochs": 1, "batch_size": 32}
LA = {"epochs": 2, "batch_size": 32}
SEARCH = {
    "temperature": {"loguniform": [0.05, 0.5]},
    "mixing_rate": {"uniform": [0.3, 0.9]},
    "k_neighbours": {"int": [5, 50]},
    "clustering_repeats": {"int": [1, 3]},
    "n_centroids": {"fraction": [0.05, 0.2]},  # 6 to 24 at N = 120
}
FIVE = tuple(SEARCH)
RANGES = {"k_neighbours": (5, 50), "clustering_repeats": (1, 3), "n_centroids": (6, 24)}
ROOT = Path(__file__).resolve().parents[2]
# What `laray train` would run with raw_space: the sweeps' first trial, inside SEARCH's ranges
RECIPE = {"temperature": 0.1, "mixing_rate": 0.5, "k_neighbours": 20, "clustering_repeats": 2, "n_centroids": 12}


def raw_space(
    num_samples=3, max_concurrent=2, grace_period=1, la_epochs=2, search=None, confirm_top=0, confirm_seeds=0
) -> dict:
    """No confirmation unless asked: the tests of the search would pay for it without looking at it."""
    return {
        "num_samples": num_samples,
        "max_concurrent": max_concurrent,
        "grace_period": grace_period,
        "confirm_top": confirm_top,
        "confirm_seeds": confirm_seeds,
        "fixed": {"autoencoder": dict(AE), "la": {**LA, "epochs": la_epochs}},
        "search": {**SEARCH, **(search or {})},
        "recipe": dict(RECIPE),
    }


@pytest.fixture(scope="module")
def sub(tmp_path_factory):
    """The data sets' reference: what trials receive (ray_session points every node's cache at a temporary folder)."""
    return describe(str(write_digit_folder(tmp_path_factory.mktemp("digits"), N)), 32)


def optuna_storage(experiment: Path) -> str:
    return f"sqlite:///{experiment / OPTUNA_DB}"


def only_study(experiment: Path, name: str):
    """The single Optuna study in the sweep's optuna.db (asserting there is exactly one, named `name`)."""
    import optuna

    summaries = optuna.get_all_study_summaries(storage=optuna_storage(experiment))
    assert [s.study_name for s in summaries] == [name]
    return optuna.load_study(study_name=name, storage=optuna_storage(experiment))


def analysis_of(experiment: Path):
    from ray.tune import ExperimentAnalysis

    return ExperimentAnalysis(str(experiment))


def rows(folder: Path) -> pd.DataFrame:
    """The trial's reported results (progress.csv), empty when it reported nothing."""
    path = Path(folder) / "progress.csv"
    return pd.read_csv(path) if path.exists() and path.read_text().strip() else pd.DataFrame()


def failures(folder: Path) -> list[str]:
    """The failure tracebacks Ray Tune appended to the trial's error.txt, one string per failure."""
    path = Path(folder) / "error.txt"
    return re.split(r"^Failure # \d+", path.read_text(), flags=re.M)[1:] if path.exists() else []


def la_history(metrics: dict) -> list[dict]:
    return [h for h in metrics["history"] if h["stage"] == "local_aggregation"]


def only_store_key(experiment: Path, space, data) -> str:
    store = experiment / "autoencoders"
    keys = sorted(p.name for p in store.iterdir() if p.is_dir())
    assert keys == [store_key(data.key, space.ae, SEED)]
    return keys[0]


# --------------------------------------------------------------------------------------------------
# A 3-trial sweep, shared by the tests that only read what it left


class Sweep:
    def __init__(self, storage: Path, name: str, space, result):
        self.storage, self.name, self.space, self.result = storage, name, space, result
        self.experiment = storage / name


@pytest.fixture(scope="module")
def sweep(ray_session, sub, tmp_path_factory):
    storage = tmp_path_factory.mktemp("sweeps")
    space = parse_space(raw_space(num_samples=3, max_concurrent=2))
    result = run_sweep(sub, space, run=SweepRun(str(storage), "three", seed=SEED, verbose=0))
    return Sweep(storage, "three", space, result)


def test_sweep_runs_every_trial_and_records_it(sweep, sub):
    exp = sweep.experiment
    assert sweep.result.experiment == exp
    assert sweep.result.n_trials == 3
    assert sweep.result.n_errored == 0

    import optuna

    study = only_study(exp, "three")
    assert len(study.trials) == 3
    for trial in study.trials:
        assert trial.state == optuna.trial.TrialState.COMPLETE
        assert set(trial.params) == set(FIVE)
        assert 0.05 <= trial.params["temperature"] <= 0.5
        assert 0.3 <= trial.params["mixing_rate"] <= 0.9
        for name, (low, high) in RANGES.items():
            assert trial.params[name] == int(trial.params[name]) and low <= trial.params[name] <= high, name

    analysis = analysis_of(exp)
    assert len(analysis.trials) == 3
    final_purity, configs = {}, []
    expected_labels = [sub.class_names[label] for label in sub.labels]
    for trial in analysis.trials:
        assert trial.status == "TERMINATED"
        assert set(trial.config) == set(FIVE)
        configs.append(trial.config)
        progress = analysis.trial_dataframes[trial.trial_id]
        assert 1 <= len(progress) <= LA["epochs"]  # ASHA (grace period 1) may stop a trial after one epoch
        assert progress["training_iteration"].tolist() == list(range(1, len(progress) + 1))
        assert progress["epoch"].tolist() == list(range(1, len(progress) + 1))  # LA epochs only

        folder = Path(trial.path)
        assert folder.parent == exp
        assignments = pd.read_csv(folder / "assignments.csv", dtype={"label": str})
        assert list(assignments.columns) == ["idx", "path", "label", "cluster", "heldout"]
        assert len(assignments) == N
        assert assignments["idx"].tolist() == list(range(N))
        assert assignments["path"].tolist() == list(sub.paths)
        assert assignments["label"].tolist() == expected_labels
        metrics = json.loads((folder / "metrics.json").read_text())
        # The objective counts the selection half; the held-out half is scored apart (holdout 0.5 by default).
        selection, held = assignments[~assignments["heldout"]], assignments[assignments["heldout"]]
        assert len(held) == pytest.approx(N / 2, abs=10)
        assert metrics["purity"] == pytest.approx(purity(selection["label"], selection["cluster"]))
        assert metrics["heldout_purity"] == pytest.approx(purity(held["label"], held["cluster"]))
        assert metrics["config"]["la"]["holdout"] == 0.5 and metrics["config"]["la"]["holdout_seed"] == SEED
        assert metrics["purity"] == pytest.approx(progress["purity"].iloc[-1])  # outputs of the last report
        assert [h["epoch"] for h in la_history(metrics)] == progress["epoch"].tolist()
        assert metrics["n_images"] == N
        codes = np.load(folder / "codes.npy")
        assert codes.dtype == np.float32 and codes.shape[0] == N
        final_purity[trial.trial_id] = progress["purity"].iloc[-1]

    # Optuna was told each trial's last score
    assert sorted(t.value for t in study.trials) == pytest.approx(sorted(final_purity.values()))

    best = json.loads((exp / "best.json").read_text())
    assert best["n_trials"] == 3 and best["n_errored"] == 0
    assert best["best_metrics"]["purity"] == pytest.approx(max(final_purity.values()))
    assert best["best_config"] in configs
    assert sweep.result.best_config == best["best_config"]


def test_the_study_names_its_objective_and_how_each_trial_ended(sweep):
    """optuna-dashboard shows "purity", not "Objective 0", and which trials ASHA stopped (laray.sweep.study)."""
    from laray.sweep.study import EPOCHS_RUN, STOPPED_BY

    study = only_study(sweep.experiment, "three")
    assert study.metric_names == ["purity"]
    epochs_run = {json.dumps(t.config, sort_keys=True): len(rows(t.path)) for t in analysis_of(sweep.experiment).trials}
    for trial in study.trials:
        ran = epochs_run[json.dumps(trial.params, sort_keys=True)]
        assert trial.user_attrs[EPOCHS_RUN] == ran
        assert trial.user_attrs[STOPPED_BY] == ("none" if ran == LA["epochs"] else "ASHA")  # no time budget here


def test_tensorboard_hparams_show_every_search_trials_settings(sweep):
    """One experiment summary in the sweep's folder names the settings; each trial's session gives all of them."""
    found = tensorboard_hparams(sweep.experiment)
    assert [run for run, parts in found.items() if "experiment" in parts] == ["."]
    assert set(found["."]["experiment"]) == {*FIVE, "seed"}
    assert set(found["."]["differs"]) == set(FIVE)  # TensorBoard lists the searched settings first
    trials = {str(Path(t.path).relative_to(sweep.experiment)): t for t in analysis_of(sweep.experiment).trials}
    assert set(found) - {"."} == set(trials)
    for run, trial in trials.items():
        # integer settings as text, as TensorBoard shows them (laray.sweep.hparams.shown)
        assert found[run]["session_start_info"] == pytest.approx(
            {k: shown(v) for k, v in {**trial.config, "seed": SEED}.items()}
        )
        assert "session_end_info" in found[run]


def test_stage1_is_trained_once_for_the_whole_sweep(sweep, sub):
    """Two trials at a time, one auto-encoder: a Ray task trains it before the trials, which get it by value."""
    assert sweep.space.max_concurrent == 2
    store = sweep.experiment / "autoencoders"
    key = only_store_key(sweep.experiment, sweep.space, sub)
    assert ae_store.trainings(store, key) == 1
    assert len((store / key / "trainings.log").read_text().splitlines()) == 1
    assert (store / key / "autoencoder.pt").exists()
    metrics = [
        json.loads((folder / "metrics.json").read_text())
        for folder in sweep.experiment.glob("train_trial_*")
        if folder.is_dir()
    ]
    assert len(metrics) == 3
    assert all(
        m["autoencoder"] == {"key": key, "source": "object store", "trained_in_this_run": False} for m in metrics
    )
    assert all(len([h for h in m["history"] if h["stage"] == "autoencoder"]) == AE["epochs"] for m in metrics)
    stored = json.loads(next((store / key).glob("baselines_mean_*.json")).read_text())
    assert all(m["baselines"] == stored for m in metrics)  # scored once, by the stage-1 task
    best = json.loads((sweep.experiment / "best.json").read_text())
    assert best["baselines"] == stored == sweep.result.baselines


def test_trials_open_the_data_by_reference(sweep, sub):
    """Every trial mapped the decode cache that the stage-1 task wrote; nobody decoded twice."""
    records = [
        json.loads((folder / "worker.json").read_text())
        for folder in sweep.experiment.glob("train_trial_*")
        if folder.is_dir()
    ]
    assert len(records) == 3
    assert not any(r["decoded_here"] for r in records)  # the stage-1 task decoded on this one node
    cache = Path(records[0]["cache_dir"])
    assert {r["cache_dir"] for r in records} == {str(cache)}
    decodes = [line for line in (cache / "decodes.log").read_text().splitlines() if sub.key in line]
    assert len(decodes) == 1
    assert all(r["peak_rss_mb"] > 0 and r["startup_s"] >= 0 and r["open_data_s"] >= 0 for r in records)


def test_new_sweep_over_an_existing_one_is_refused(sweep, sub):
    with pytest.raises(SweepError, match="resume"):
        run_sweep(sub, sweep.space, run=SweepRun(str(sweep.storage), sweep.name, seed=SEED, verbose=0))
    study = only_study(sweep.experiment, sweep.name)  # untouched: still one study of 3 trials
    assert len(study.trials) == 3
    assert len(analysis_of(sweep.experiment).trials) == 3


def test_resume_without_a_sweep_is_refused(sub, tmp_path):
    space = parse_space(raw_space())
    with pytest.raises(SweepError, match="no sweep to resume"):
        run_sweep(sub, space, run=SweepRun(str(tmp_path), "nothing", resume=True, verbose=0))
    assert not list(tmp_path.iterdir())  # a refused resume leaves nothing behind


def test_resume_refuses_a_new_number_of_trials(sweep, sub):
    # Tuner.restore keeps the stored num_samples; a different one must not be ignored silently.
    with pytest.raises(SweepError, match="cannot change when it is resumed"):
        run_sweep(sub, sweep.space, run=SweepRun(str(sweep.storage), sweep.name, num_samples=5, resume=True, verbose=0))
    assert len(only_study(sweep.experiment, sweep.name).trials) == 3


def test_warm_start_hands_the_earlier_trials_to_tpe_and_runs_new_ones_on_top(sweep, sub, tmp_path):
    from laray.errors import LarayError
    from laray.sweep.warm_start import WarmStartError

    storage = tmp_path / "results"
    other_stage1 = parse_space({**raw_space(num_samples=1), "fixed": {"autoencoder": {**AE, "epochs": 2}, "la": LA}})
    with pytest.raises(
        WarmStartError,
        match=rf"warm start from {sweep.experiment}: autoencoder\.epochs is 1 there, "
        r"2 here; its objective values are not comparable",
    ):
        run_sweep(
            sub,
            other_stage1,
            run=SweepRun(str(storage), "refused", seed=SEED, verbose=0, warm_start=[str(sweep.experiment)]),
        )
    assert not list((storage / "refused").glob("autoencoders/*/autoencoder.pt"))  # refused before stage 1

    result = run_sweep(
        sub,
        parse_space(raw_space(num_samples=1)),
        run=SweepRun(str(storage), "warm", seed=SEED, verbose=0, warm_start=[str(sweep.experiment)]),
    )
    assert result.n_trials == 1  # num_samples new trials on top
    study = only_study(storage / "warm", "warm")
    earlier = only_study(sweep.experiment, sweep.name)
    taken = [t for t in study.trials if t.user_attrs.get("warm_start_from") == str(sweep.experiment)]
    assert sorted(t.value for t in taken) == sorted(t.value for t in earlier.trials if t.value is not None)
    assert len(study.trials) == len(taken) + 1
    best = json.loads((storage / "warm" / "best.json").read_text())
    assert best["warm_start"] == {
        "trials": len(taken),
        "from": [{"dir": str(sweep.experiment), "taken": len(taken), "outside": 0}],
    }
    with pytest.raises(LarayError, match="--warm-start: .* not on --resume"):
        run_sweep(
            sub,
            parse_space(raw_space(num_samples=1)),
            run=SweepRun(str(storage), "warm", seed=SEED, resume=True, verbose=0, warm_start=[str(sweep.experiment)]),
        )


@pytest.mark.slow  # in -m slow since the default suite passed 15 min (docs/testing.md)
def test_time_budget_stops_the_search_and_the_confirmation_follows(ray_session, sub, tmp_path):
    """A budget of 1 s is spent while the first two trials start: each stops at its first epoch's end."""
    raw = raw_space(num_samples=4, max_concurrent=2, la_epochs=3, confirm_top=1, confirm_seeds=1)
    space = parse_space({**raw, "time_budget": "1s"})
    result = run_sweep(sub, space, run=SweepRun(str(tmp_path / "results"), "budget", seed=SEED, verbose=0))
    experiment = tmp_path / "results" / "budget"
    assert 1 <= result.n_trials <= 2 and result.n_errored == 0  # no trial started after the budget was spent
    searched = [f for f in experiment.glob("*_trial_*") if f.is_dir()]
    assert [len(rows(f)) for f in searched] == [1] * len(searched)  # stopped at their next epoch end
    assert all(any(f.glob("checkpoint_*")) for f in searched)  # with that epoch's checkpoint
    best = json.loads((experiment / "best.json").read_text())
    assert best["ended_by_time_budget"] is True and best["time_budget_s"] == 1
    assert len(result.confirmed) == 1 and result.confirmed[0]["seeds"] == [1]  # the confirmation ran as usual
    assert [len(rows(f)) for f in (experiment / "confirm").glob("*_trial_*") if f.is_dir()] == [3, 3]  # and the recipe
    # the study says who stopped them (laray.sweep.study)
    assert [
        (t.user_attrs["stopped_by"], t.user_attrs["epochs_run"]) for t in only_study(experiment, "budget").trials
    ] == [("time budget", 1)] * len(searched)
    # TensorBoard's HPARAMS: the confirmation's runs under the search's names, with their own seed
    found = tensorboard_hparams(experiment)
    assert found["."]["experiment"] == found["confirm"]["experiment"]  # whichever TensorBoard reads first
    confirm_runs = [found[run]["session_start_info"] for run in found if run.startswith("confirm/")]
    confirmed = {k: shown(v) for k, v in {**result.confirmed[0]["config"], "seed": 1}.items()}
    assert pytest.approx(confirmed) in confirm_runs and len(confirm_runs) == 2
    searched_runs = {run for run in found if run not in (".", "confirm") and not run.startswith("confirm/")}
    assert searched_runs == {f.name for f in searched}


# --------------------------------------------------------------------------------------------------
# Resume after a real interruption of the driver: Ctrl-C (SIGINT), and a hard kill (SIGKILL)

DRIVER = textwrap.dedent("""
    import json, os, sys
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    import numpy as np
    import ray
    from laray.data.dataset import describe
    from laray.settings.space import parse_space
    from laray.sweep.driver import SweepRun, run_sweep

    address, storage, name, raw, folder = sys.argv[1:6]
    sub = describe(folder, 32)
    ray.init(address=address)  # joins the tests' Ray instance: a killed driver leaves no Ray processes behind
    result = run_sweep(sub, parse_space(json.loads(raw)), SweepRun(storage, name, seed=0, verbose=0))
    print("driver returned", result.n_trials, flush=True)
""")
RESUMED_RAW = raw_space(num_samples=3, max_concurrent=1)


def _start_driver(ray_session, tmp_path: Path, storage: Path, name: str, raw: dict, sub_folder: str):
    script, log = tmp_path / "driver.py", tmp_path / "driver.log"
    script.write_text(DRIVER)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    address = ray_session.get_runtime_context().gcs_address
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, str(script), address, str(storage), name, json.dumps(raw), sub_folder],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=tmp_path,
        )
    return proc, log


def _wait_until(condition, proc, log: Path, what: str, timeout: float = 600):
    # A generous deadline, not a measured interval: it failed once at 240 s on a machine at load 10, and a driver
    # that dies ends the wait at once (proc.poll)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = condition()
        if found:
            return found
        if proc.poll() is not None:
            pytest.fail(f"the driver exited ({proc.returncode}) before {what}:\n{log.read_text()[-3000:]}")
        time.sleep(0.05)
    pytest.fail(f"not {what} within {timeout} s:\n{log.read_text()[-3000:]}")


def _stop(proc) -> int:
    try:
        return proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _finished_trial(experiment: Path, epochs: int):
    return next((f for f in experiment.glob("*_trial_*") if len(rows(f)) >= epochs), None)


def _recorded_finished(experiment: Path) -> bool:
    """Tune's saved experiment state lists a TERMINATED trial."""
    from laray.results.scores import tune_trial_states

    try:
        return any(t.get("status") == "TERMINATED" for t in tune_trial_states(experiment))
    except (OSError, ValueError):  # being written right now
        return False


def _optuna_trial_count(experiment: Path) -> int:
    try:
        with sqlite3.connect(f"file:{experiment / OPTUNA_DB}?mode=ro", uri=True) as db:
            return db.execute("SELECT count(*) FROM trials").fetchone()[0]
    except sqlite3.Error:  # not created yet
        return 0


def _check_resumed(result, experiment: Path, name: str, before, first: Path, first_progress: str, sub):
    """What a resumed sweep must show whatever stopped it: the requested trials, each trained once."""
    assert result.n_trials == 3 and result.n_errored == 0
    after = analysis_of(experiment)
    assert len(after.trials) == 3
    assert all(t.status == "TERMINATED" for t in after.trials)
    assert {t.trial_id for t in before.trials} <= {t.trial_id for t in after.trials}
    for trial in after.trials:  # none trained twice: iterations count up from 1 once, without a restart at 1
        progress = rows(trial.path)
        assert 1 <= len(progress) <= LA["epochs"]
        assert progress["training_iteration"].tolist() == list(range(1, len(progress) + 1))
        assert progress["epoch"].tolist() == list(range(1, len(progress) + 1))
    assert (first / "progress.csv").read_text() == first_progress  # the finished trial was not run again

    import optuna

    study = only_study(experiment, name)  # the resumed sweep went on with the same study
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(complete) == 3
    assert all(set(t.params) == set(FIVE) for t in complete)
    assert sorted(json.dumps(t.params, sort_keys=True) for t in complete) == sorted(
        json.dumps(t.config, sort_keys=True) for t in after.trials
    )  # Optuna's trials are Tune's
    key = only_store_key(experiment, parse_space(RESUMED_RAW), sub)
    assert ae_store.trainings(experiment / "autoencoders", key) == 1  # stage 1 not retrained on resume either
    assert json.loads((experiment / "best.json").read_text())["n_trials"] == 3
    return study


def test_more_confirmation_seeds_on_resume_run_the_same_contenders_over_the_new_seeds_only(ray_session, sub, tmp_path):
    """A verdict the seeds could not settle gets more of them without another search: --resume with a larger
    confirm_seeds runs the confirmed contenders over the new seeds, beside the runs kept; fewer keeps them all. The
    sweep here lost its confirmation.json first, as one confirmed before that file existed."""
    from laray.results.scores import confirmed_table

    raw = raw_space(num_samples=2, max_concurrent=2, la_epochs=1, confirm_top=1, confirm_seeds=1)
    storage, experiment = tmp_path / "results", tmp_path / "results" / "more"
    first = run_sweep(sub, parse_space(raw), run=SweepRun(str(storage), "more", seed=SEED, verbose=0))
    assert first.confirmed[0]["seeds"] == [1] and first.recipe["seeds"] == [1]
    # each epoch's result with its time stamp: a run again would write others (a restore copies the files anew)
    kept = {p: p.read_text() for p in (experiment / "confirm").glob("*/result.json")}
    assert len(kept) == 2  # the search's best and the recipe, seed 1
    (experiment / "confirmation.json").unlink()

    def resumed(seeds: int):
        space = parse_space({**raw, "confirm_seeds": seeds})
        return run_sweep(sub, space, run=SweepRun(str(storage), "more", seed=SEED, resume=True, verbose=0))

    more = resumed(3)
    assert more.confirmed[0]["config"] == first.confirmed[0]["config"] and more.n_trials == first.n_trials
    assert more.confirmed[0]["seeds"] == [1, 2, 3] and more.recipe["seeds"] == [1, 2, 3]
    assert more.margin_over_recipe["seeds"] == [1, 2, 3]
    assert more.confirmed[0]["purity"][0] == first.confirmed[0]["purity"][0]  # seed 1's run is kept...
    assert {p: p.read_text() for p in kept} == kept  # ...not run again
    added = [p.parent / "params.json" for p in (experiment / "confirm-seeds-2-3").glob("*/metrics.json")]
    assert sorted(json.loads(p.read_text())["seed"] for p in added) == [2, 2, 3, 3]
    record = json.loads((experiment / "confirmation.json").read_text())
    assert [(e["name"], e["seeds"]) for e in record["experiments"]] == [("confirm", [1]), ("confirm-seeds-2-3", [2, 3])]
    assert json.loads((experiment / "best.json").read_text())["recipe"]["seeds"] == [1, 2, 3]

    fewer = resumed(1)  # runs nothing: every seed run before stays in the answer
    assert fewer.confirmed[0]["seeds"] == [1, 2, 3] and fewer.confirmed[0]["purity"] == more.confirmed[0]["purity"]
    assert sorted(p.name for p in experiment.glob("confirm*") if p.is_dir()) == ["confirm", "confirm-seeds-2-3"]
    table = confirmed_table(experiment)  # laray analyze: every seed of both contenders
    assert sorted(table["seed"]) == [1, 1, 2, 2, 3, 3] and table["recipe"].sum() == 3


@pytest.mark.slow  # in -m slow since the default suite passed 15 min (docs/testing.md)
def test_second_driver_and_resume_of_a_running_sweep_are_refused(ray_session, sub, tmp_path):
    """Two drivers on one sweep once ran side by side into one Optuna study: now the second is refused."""
    from ray import tune

    from laray.sweep.lock import LOCK_NAME, SweepRunningError

    name, storage = "busy", tmp_path / "results"
    experiment = storage / name
    proc, log = _start_driver(ray_session, tmp_path, storage, name, RESUMED_RAW, sub.spec)
    try:
        _wait_until(lambda: tune.Tuner.can_restore(str(experiment)), proc, log, "the sweep saved its state")
        holder = f"pid {proc.pid} on {socket.gethostname()}"
        with pytest.raises(SweepRunningError, match=holder):
            run_sweep(sub, parse_space(RESUMED_RAW), run=SweepRun(str(storage), name, seed=SEED, verbose=0))
        with pytest.raises(SweepRunningError, match=holder):
            run_sweep(
                sub, parse_space(RESUMED_RAW), run=SweepRun(str(storage), name, seed=SEED, resume=True, verbose=0)
            )
    finally:
        rc = _stop(proc)
    assert rc == 0, log.read_text()[-3000:]
    assert len(list(experiment.glob("experiment_state-*.json"))) == 1  # one driver's state, not two
    assert len(only_study(experiment, name).trials) == 3  # the 3 requested, not 3 per driver
    assert json.loads((experiment / "best.json").read_text())["n_trials"] == 3
    assert (experiment / LOCK_NAME).read_text() == ""  # released at the end


def test_trials_that_no_node_can_hold_are_refused_before_anything_is_created(ray_session, sub, tmp_path, monkeypatch):
    from laray.errors import LarayError
    from laray.sweep.ray_setup import check_resources

    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/ray_bootstrap_config.yaml: no autoscaler
    space, storage = parse_space(raw_space()), tmp_path / "results"
    with pytest.raises(LarayError, match=r"--gpus-per-trial 1: .*the most is 0.*no autoscaler"):
        run_sweep(sub, space, run=SweepRun(str(storage), "gpu", verbose=0), trial=TrialResources(gpus=1))
    with pytest.raises(LarayError, match=r"--cpus-per-trial 3: .*the most is 2"):
        run_sweep(sub, space, run=SweepRun(str(storage), "cpu", verbose=0), trial=TrialResources(cpus=3))
    with pytest.raises(LarayError, match=r"--device cuda .*--gpus-per-trial > 0"):
        run_sweep(sub, space, run=SweepRun(str(storage), "cuda", verbose=0), trial=TrialResources(device="cuda"))
    assert not storage.exists()
    (tmp_path / "ray_bootstrap_config.yaml").write_text("cluster_name: autoscaling\n")
    check_resources(4, 1, "cuda")  # an autoscaler may add such a node: nothing refused


@pytest.fixture(scope="module")
def killed_sweep(ray_session, sub, tmp_path_factory):
    """A sweep whose driver was SIGKILLed just after Optuna was asked for its second trial, then resumed."""
    tmp_path = tmp_path_factory.mktemp("killed")
    name, storage = "killed", tmp_path / "results"
    experiment = storage / name
    proc, log = _start_driver(ray_session, tmp_path, storage, name, RESUMED_RAW, sub.spec)
    try:
        # The first trial's results reach STORAGE with Tune's next snapshot, which on a loaded machine can
        # come after the second trial was sampled: wait for both.
        _wait_until(
            lambda: _optuna_trial_count(experiment) >= 2 and _finished_trial(experiment, LA["epochs"]),
            proc,
            log,
            "a second trial was sampled and the first one's results saved",
        )
        proc.kill()  # no chance to save anything: Tune's experiment state is whatever it last wrote
    finally:
        _stop(proc)
    first = _finished_trial(experiment, LA["epochs"])
    assert first is not None
    first_progress = (first / "progress.csv").read_text()
    before = analysis_of(experiment)
    if len(before.trials) >= _optuna_trial_count(experiment):
        pytest.skip("Tune saved its state after the second trial was sampled: the kill lost nothing")

    result = run_sweep(
        sub, parse_space(RESUMED_RAW), run=SweepRun(str(storage), name, seed=SEED, resume=True, verbose=0)
    )
    return result, experiment, name, before, first, first_progress, sub


def test_killed_sweep_resumes_to_the_requested_trials(killed_sweep):
    _check_resumed(*killed_sweep)


def test_killed_sweep_leaves_no_orphan_optuna_trial(killed_sweep):
    result, experiment, name = killed_sweep[:3]
    study = only_study(experiment, name)
    states = [t.state.name for t in study.trials]
    assert "RUNNING" not in states  # the sweep is over: nothing in its study may still be running
    assert set(states) <= {"COMPLETE", "FAIL"} and states.count("COMPLETE") == result.n_trials == 3


def test_a_kill_that_tore_tunes_state_is_resumed_from_the_copy_kept(ray_session, sub, tmp_path):
    """A driver killed while Tune copied its state into STORAGE/NAME leaves those files torn, and Tune's own
    restore fails on them; the resume sets them aside and takes the copy laray kept after Tune's last save."""
    from laray.sweep.tune_state import KEPT_FILE, is_tune_state, repair_tune_state

    name, storage = "torn", tmp_path / "results"
    experiment = storage / name
    proc, log = _start_driver(ray_session, tmp_path, storage, name, RESUMED_RAW, sub.spec)
    try:
        _wait_until(
            lambda: _recorded_finished(experiment) and (experiment / KEPT_FILE).exists(),
            proc,
            log,
            "a finished trial recorded and Tune's state kept",
        )
        proc.kill()
    finally:
        _stop(proc)
    torn = sorted(p for p in experiment.iterdir() if is_tune_state(p.name) and p.name != "tuner.pkl")
    assert any(p.name.startswith("experiment_state-") for p in torn) and any(p.suffix == ".pkl" for p in torn)
    for path in torn:  # what a kill in the middle of Tune's copy leaves: the first part of each file
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    result = run_sweep(
        sub, parse_space(RESUMED_RAW), run=SweepRun(str(storage), name, seed=SEED, resume=True, verbose=0)
    )
    assert result.n_trials == 3 and result.n_errored == 0
    after = analysis_of(experiment)
    assert len(after.trials) == 3 and all(t.status == "TERMINATED" for t in after.trials)
    assert sorted(p.name for p in experiment.glob("*.torn")) == [p.name + ".torn" for p in torn]
    with zipfile.ZipFile(experiment / KEPT_FILE) as archive:  # the copy kept is Tune's last save
        assert all(archive.read(n) == (experiment / n).read_bytes() for n in archive.namelist())
    assert repair_tune_state(experiment) == []  # a whole sweep: nothing set aside or taken


@pytest.mark.slow  # in -m slow since the default suite passed 15 min (docs/testing.md)
def test_confirmation_reruns_the_top_configurations_with_fresh_seeds(ray_session, sub, tmp_path):
    """Search, then the 2 best configurations x 2 fresh seeds; the driver is killed during the
    confirmation and resumed: the finished runs are kept, the rest run, one answer."""
    raw = raw_space(num_samples=3, max_concurrent=1, confirm_top=2, confirm_seeds=2)
    space, storage = parse_space(raw), tmp_path / "sweeps"
    exp = storage / "confirmed"
    proc, log = _start_driver(ray_session, tmp_path, storage, "confirmed", raw, sub.spec)
    try:  # killed once Tune has recorded a finished confirmation run, so that a resume must keep it
        _wait_until(lambda: _recorded_finished(exp / "confirm"), proc, log, "a confirmation run was recorded")
        proc.kill()
    finally:
        _stop(proc)
    first = _finished_trial(exp / "confirm", LA["epochs"])
    first_progress = (first / "progress.csv").read_text()
    assert len(list((exp / "confirm").glob("*/metrics.json"))) < 6  # killed before the confirmation ended
    result = run_sweep(sub, space, run=SweepRun(str(storage), "confirmed", seed=SEED, resume=True, verbose=0))
    assert (first / "progress.csv").read_text() == first_progress  # not run again
    best = json.loads((exp / "best.json").read_text())
    assert len(result.confirmed) == 2 and best["confirmed"] == json.loads(json.dumps(result.confirmed))

    # the search's two best (complete trials first), each re-run with seeds 1 and 2, both stages seeded
    searched = [
        (json.loads((f / "params.json").read_text()), rows(f).iloc[-1].to_dict())
        for f in exp.glob("train_trial_*")
        if f.is_dir()
    ]
    top = contenders(searched, RECIPE, "purity", "max", LA["epochs"], 2)[:2]  # the recipe's own trial aside
    assert sorted(json.dumps(e["config"], sort_keys=True) for e in result.confirmed) == sorted(
        json.dumps(c, sort_keys=True) for c in top
    )
    runs = [json.loads(f.read_text()) for f in (exp / "confirm").glob("*/metrics.json")]
    assert len(runs) == 6 and sorted(m["seed"] for m in runs) == [1, 1, 1, 2, 2, 2]  # the recipe beside the two
    # every run that reported ran every epoch: no ASHA here (a run the kill cut off before its first
    # report restarts in a new folder and leaves an empty one)
    assert all(len(rows(f.parent)) == LA["epochs"] for f in (exp / "confirm").glob("*/metrics.json"))
    stage1_keys = sorted(p.name for p in (exp / "autoencoders").iterdir() if p.is_dir())
    assert stage1_keys == sorted(store_key(sub.key, space.ae, s) for s in (0, 1, 2))
    for m in runs:
        assert m["autoencoder"]["key"] == store_key(sub.key, space.ae, m["seed"])
        assert m["config"]["la"]["holdout_seed"] == SEED  # one held-out split for every run

    # each entry's values are its runs', in seed order; summaries computed from them; best mean first
    for entry in result.confirmed:
        mine = sorted(
            (m for m in runs if all(m["config"]["la"][k] == v for k, v in entry["config"].items())),
            key=lambda m: m["seed"],
        )
        assert entry["seeds"] == [1, 2] == [m["seed"] for m in mine]
        assert entry["purity"] == [m["purity"] for m in mine]
        assert entry["purity_mean"] == pytest.approx(np.mean(entry["purity"]))
        assert entry["purity_sd"] == pytest.approx(np.std(entry["purity"], ddof=1))
        lo, hi = entry["purity_ci95"]
        assert lo <= entry["purity_mean"] <= hi
        assert entry["heldout_purity_mean"] == pytest.approx(np.mean([m["heldout_purity"] for m in mine]))
        assert {"nmi_mean", "ari_ci95", "acc_sd"} <= set(entry)
    assert result.confirmed[0]["purity_mean"] >= result.confirmed[1]["purity_mean"]

    # the baselines over the same seeds, as each seed's stage 1 scored them
    baselines = result.confirmed_baselines
    assert baselines["raw_pixels"]["seeds"] == [1, 2]
    per_seed = [next(m["baselines"] for m in runs if m["seed"] == s) for s in (1, 2)]
    assert baselines["autoencoder"]["purity"] == [b["autoencoder"]["purity"] for b in per_seed]
    assert "heldout_purity_mean" in baselines["raw_pixels"]

    # the winner's margin over raw pixels, by hand: each seed's run minus that seed's raw-pixel k-means
    winner_runs = sorted(
        (m for m in runs if all(m["config"]["la"][k] == v for k, v in result.confirmed[0]["config"].items())),
        key=lambda m: m["seed"],
    )
    differences = [m["purity"] - m["baselines"]["raw_pixels"]["purity"] for m in winner_runs]
    held_differences = [m["heldout_purity"] - m["baselines"]["raw_pixels"]["heldout_purity"] for m in winner_runs]
    half = 12.706 * np.std(differences, ddof=1) / np.sqrt(2)  # t(0.975, 1 degree of freedom)
    margin = best["margin_over_raw_pixels"]
    assert margin == json.loads(json.dumps(result.margin)) and margin["seeds"] == [1, 2]
    assert margin["purity"] == pytest.approx(differences)
    assert margin["purity_mean"] == pytest.approx(np.mean(differences))
    assert margin["purity_ci95"] == pytest.approx([np.mean(differences) - half, np.mean(differences) + half], rel=1e-3)
    assert margin["heldout_purity_mean"] == pytest.approx(np.mean(held_differences))

    # the winner's margin over the recipe, by hand: each seed's run minus the recipe's run on that seed
    recipe_runs = sorted(
        (m for m in runs if all(m["config"]["la"][k] == v for k, v in RECIPE.items())), key=lambda m: m["seed"]
    )
    assert best["recipe"]["seeds"] == [1, 2] and best["recipe"]["purity"] == [m["purity"] for m in recipe_runs]
    over = [w["purity"] - r["purity"] for w, r in zip(winner_runs, recipe_runs)]
    assert best["margin_over_recipe"]["purity"] == pytest.approx(over)
    assert best["margin_over_recipe"]["heldout_purity_mean"] == pytest.approx(
        np.mean([w["heldout_purity"] - r["heldout_purity"] for w, r in zip(winner_runs, recipe_runs)])
    )
    assert best["verdict"] == verdict(result.confirmed[0], result.margin_over_recipe, "purity")[1]

    # laray analyze: confirmed.csv (one row per configuration and seed), its picture, the report's lead
    from laray.results.report import analyze

    text = analyze(exp, tmp_path / "analysis").read_text()
    table = pd.read_csv(tmp_path / "analysis" / "confirmed.csv")
    assert len(table) == 6 and sorted(table["rank"]) == [1, 1, 2, 2, 3, 3]
    assert table[table["recipe"]]["rank"].tolist() == [3, 3]  # the recipe after the search's configurations
    for entry, rank in zip(result.confirmed, (1, 2)):
        assert table[table["rank"] == rank]["purity"].tolist() == pytest.approx(entry["purity"])
    assert {"seed", "heldout_purity", "raw_pixels_purity", "autoencoder_heldout_purity"} <= set(table.columns)
    assert (tmp_path / "analysis" / "confirmed.png").stat().st_size > 0
    assert text.index("## Confirmed winner") < text.index("## Best trial of the search")
    assert "k-means on raw pixels (same seeds)" in text and f"{result.confirmed[0]['purity_mean']:.3f}" in text
    assert f"Winner minus k-means on raw pixels, paired by seed: purity {np.mean(differences):+.3f}" in text
    assert "the recipe (`laray train`'s settings, same seeds)" in text
    assert f"**Verdict**: {best['verdict'][0].upper()}{best['verdict'][1:]}." in text


@pytest.mark.slow
def test_a_sweep_from_pretrained_weights_carries_the_pretrained_baseline_everywhere(ray_session, sub, tmp_path, capsys):
    """Stage 1 from a local vgg11_bn state_dict: the pretrained encoder's k-means baseline in the store, every
    trial's metrics, best.json, the confirmation's baselines over seeds, the final tables and the report."""
    from laray.cli.tables import print_confirmed, print_search_best
    from laray.results.report import analyze
    from laray.sweep.stage1 import sweep_stage1
    from laray.training.run import baselines_path

    weights = write_vgg_weights(tmp_path / "vgg11_bn.pth")
    # 2 trials: the recipe (the first) and one other, the confirmation's contender beside the recipe
    raw = raw_space(num_samples=2, max_concurrent=1, la_epochs=1, confirm_top=1, confirm_seeds=1)
    raw["fixed"]["autoencoder"].update(width=1.0, pretrained=str(weights))  # pretrained weights need width 1.0
    space, storage = parse_space(raw), tmp_path / "sweeps"
    result = run_sweep(sub, space, run=SweepRun(str(storage), "pretrained", seed=SEED, verbose=0))
    exp = storage / "pretrained"
    best = json.loads((exp / "best.json").read_text())
    assert list(best["baselines"]) == ["raw_pixels", "autoencoder", "pretrained"]
    key, holdout = store_key(sub.key, space.ae, SEED), (space.la.holdout, SEED)  # the search's stage 1
    stored_path = baselines_path(exp / "autoencoders", key, "mean", sub.labels_key, holdout)
    assert best["baselines"] == json.loads(stored_path.read_text()) == result.baselines
    searched = [json.loads(p.read_text()) for p in exp.glob("train_trial_*/metrics.json")]
    assert len(searched) == 2 and all(trial["baselines"] == best["baselines"] for trial in searched)

    # the confirmation's stage 1 (seed 1) scored its own, summarised over its seeds; the margin stays over raw pixels
    confirm_runs = {  # the contender's run and the recipe's, told apart by the recipe's mark in their settings
        "is_recipe" in json.loads((p.parent / "params.json").read_text())["la"]: json.loads(p.read_text())
        for p in (exp / "confirm").glob("*/metrics.json")
    }
    confirm_run = confirm_runs[False]
    over_seeds = best["confirmed_baselines"]
    assert list(over_seeds) == ["raw_pixels", "autoencoder", "pretrained"] and over_seeds["pretrained"]["seeds"] == [1]
    assert over_seeds["pretrained"]["purity"] == [confirm_run["baselines"]["pretrained"]["purity"]]
    assert best["margin_over_raw_pixels"]["purity"] == pytest.approx(
        [confirm_run["purity"] - confirm_run["baselines"]["raw_pixels"]["purity"]]
    )

    # the console's final tables
    print_search_best(result, space)
    print_confirmed(result, space)
    printed = capsys.readouterr().out
    header = next(line for line in printed.splitlines() if "best trial" in line and "k-means" in line)
    assert header.rstrip().endswith("on the pretrained encoder")
    purity_row = next(line for line in printed.splitlines() if line.split()[:1] == ["purity"])
    assert purity_row.split()[-1] == f"{best['baselines']['pretrained']['purity']:.3f}"
    confirmed_row = next(line for line in printed.splitlines() if "k-means on the pretrained encoder's codes" in line)
    assert confirmed_row.split("codes")[1].split()[0] == f"{over_seeds['pretrained']['purity_mean']:.3f}"

    # laray analyze: the baselines' table, the best trial's comparison, the confirmed winner's
    text = analyze(exp, tmp_path / "analysis").read_text()
    table = pd.read_csv(tmp_path / "analysis" / "baselines.csv").set_index("baseline")
    assert list(table.index) == ["raw_pixels", "autoencoder", "pretrained"]
    assert table.loc["pretrained", "purity"] == pytest.approx(best["baselines"]["pretrained"]["purity"])
    assert "| k-means on the pretrained encoder's codes | " in text.split("## Best trial")[1]
    assert "| k-means on the pretrained encoder's codes (same seeds) | " in text.split("## Best trial")[0]

    # a store entry an earlier laray left without the pretrained baseline: scored again (a Ray task), rewritten
    stored_path.write_text(json.dumps({k: v for k, v in best["baselines"].items() if k != "pretrained"}))
    rescored, _ = sweep_stage1(
        sub, space.ae, ["mean"], SEED, exp / "autoencoders", {"cpu": 1, "gpu": 0}, "cpu", 1, None, holdout
    )
    assert rescored["mean"] == {name: pytest.approx(scores) for name, scores in best["baselines"].items()}
    assert json.loads(stored_path.read_text()) == rescored["mean"]


def test_eval_every_reports_only_evaluated_epochs(ray_session, sub, tmp_path):
    """eval_every 2 over 3 LA epochs: Tune sees epochs 2 and 3, and ASHA counts LA epochs, not reports."""
    raw = raw_space(num_samples=1, max_concurrent=1, grace_period=3, la_epochs=3)
    raw["fixed"]["la"]["eval_every"] = 2
    result = run_sweep(sub, parse_space(raw), run=SweepRun(str(tmp_path), "every2", seed=SEED, verbose=0))
    assert result.n_trials == 1 and result.n_errored == 0
    (trial,) = analysis_of(tmp_path / "every2").trials
    progress = rows(trial.path)
    assert progress["epoch"].tolist() == [2, 3]
    assert trial.status == "TERMINATED"  # ran to max_t = 3 epochs although it reported twice
    metrics = json.loads((Path(trial.path) / "metrics.json").read_text())
    assert [("purity" in h) for h in la_history(metrics)] == [False, True, True]


# --------------------------------------------------------------------------------------------------
# Faults


CRASH_MARKER = "injected_crash.txt"


def trial_whose_worker_dies_after_epoch_1(config, **kwargs):
    """laray's trial, whose worker process dies right after reporting LA epoch 1, once per trial.

    Runs in the trial's worker: the test monkeypatches laray.sweep.driver.train_trial with it, and Ray's cloudpickle
    ships it by value (this module is not importable there).
    """
    from ray import tune

    from laray.sweep.trainable import train_trial

    out, report = Path(tune.get_context().get_trial_dir()), tune.report

    def report_then_die(metrics, checkpoint=None):
        report(metrics, checkpoint=checkpoint)
        if metrics["epoch"] == 1 and not (out / CRASH_MARKER).exists():
            (out / CRASH_MARKER).write_text("worker killed after LA epoch 1\n")
            os._exit(1)  # as if its node had gone away

    tune.report = report_then_die
    train_trial(config, **kwargs)


def test_trial_whose_worker_dies_continues_from_its_checkpoint(ray_session, sub, tmp_path, monkeypatch):
    from ray import cloudpickle  # Ray's own copy, which pickles what Tune ships to the workers

    from laray.sweep import driver as sweep

    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    monkeypatch.setattr(sweep, "train_trial", trial_whose_worker_dies_after_epoch_1)
    space = parse_space(raw_space(num_samples=2, max_concurrent=2, grace_period=3, la_epochs=3))
    try:
        result = run_sweep(sub, space, run=SweepRun(str(tmp_path), "crash", seed=SEED, max_failures=2, verbose=0))
    finally:
        cloudpickle.unregister_pickle_by_value(sys.modules[__name__])
    assert result.n_trials == 2
    assert result.n_errored == 0
    assert not list(tmp_path.glob("crash/*/checkpoints/.report-*"))  # the dead attempts' report folders removed

    experiment = tmp_path / "crash"
    analysis = analysis_of(experiment)
    assert len(analysis.trials) == 2
    for trial in analysis.trials:
        folder = Path(trial.path)
        assert trial.status == "TERMINATED"
        assert "after LA epoch 1" in (folder / CRASH_MARKER).read_text()  # the worker did die
        assert len(failures(folder)) == 1  # ... once, and the restart went through
        progress = rows(folder)
        assert progress["training_iteration"].tolist() == [1, 2, 3]
        assert progress["epoch"].tolist() == [1, 2, 3]  # no LA epoch recomputed after the restart
        assert progress["iterations_since_restore"].tolist() == [1, 1, 2]  # restored after epoch 1
        pids = progress["pid"].tolist()
        assert pids[0] != pids[1] == pids[2]  # epochs 2 and 3 in a new worker
        metrics = json.loads((folder / "metrics.json").read_text())
        history = la_history(metrics)
        assert [h["epoch"] for h in history] == [1, 2, 3]
        # epoch 1's record came back from the checkpoint rather than from training it again
        assert history[0]["loss"] == pytest.approx(progress["loss"].iloc[0])
        assert metrics["autoencoder"]["trained_in_this_run"] is False  # the restart loaded stage 1
        assert metrics["purity"] == pytest.approx(progress["purity"].iloc[-1])
    key = only_store_key(experiment, space, sub)
    assert ae_store.trainings(experiment / "autoencoders", key) == 1

    import optuna

    study = only_study(experiment, "crash")
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.COMPLETE] * 2


def test_trial_with_non_finite_loss_ends_errored_and_the_sweep_goes_on(ray_session, sub, tmp_path):
    max_failures = 1
    space = parse_space(
        raw_space(
            num_samples=3, max_concurrent=2, grace_period=2, la_epochs=2, search={"lr": {"categorical": [0.01, 1.0e30]}}
        )
    )
    result = run_sweep(
        sub, space, run=SweepRun(str(tmp_path), "nonfinite", seed=SEED, max_failures=max_failures, verbose=0)
    )

    experiment = tmp_path / "nonfinite"
    analysis = analysis_of(experiment)
    assert len(analysis.trials) == 3
    diverged = [t for t in analysis.trials if t.config["lr"] == 1.0e30]
    finite = [t for t in analysis.trials if t.config["lr"] == 0.01]
    assert diverged and finite, "the sampler's seed must draw both learning rates"
    assert len(diverged) + len(finite) == 3
    assert result.n_trials == 3
    assert result.n_errored == len(diverged)

    for trial in diverged:
        folder = Path(trial.path)
        assert trial.status == "ERROR"
        reason = (folder / NONFINITE_MARKER).read_text()
        assert "non-finite loss" in reason
        bad_epoch = int(re.search(r"epoch (\d+)", reason).group(1))
        assert len(rows(folder)) <= bad_epoch - 1  # only the epochs completed before the loss diverged
        tracebacks = failures(folder)
        assert len(tracebacks) == max_failures + 1  # FailureConfig restarted it ...
        assert all("NonFiniteLossError" in tb for tb in tracebacks)
        assert "finetune_la" in tracebacks[0]
        assert not any("finetune_la" in tb for tb in tracebacks[1:])  # ... and the restart failed before training

    for trial in finite:
        folder = Path(trial.path)
        assert trial.status == "TERMINATED"
        assert not (folder / NONFINITE_MARKER).exists()
        assert rows(folder)["epoch"].tolist() == [1, 2]
        assert not failures(folder)

    study = only_study(experiment, "nonfinite")
    states = sorted((t.params["lr"], t.state.name) for t in study.trials)
    assert states == sorted([(0.01, "COMPLETE")] * len(finite) + [(1.0e30, "FAIL")] * len(diverged))
    best = json.loads((experiment / "best.json").read_text())
    assert best["best_config"]["lr"] == 0.01
    assert best["n_errored"] == len(diverged)


# --------------------------------------------------------------------------------------------------
# Search spaces (no Ray)


def test_bundled_spaces_parse():
    demo = load_space("demo")
    assert demo.source.endswith("demo.yaml")
    assert demo.objective == "purity" and demo.mode == "max" and demo.data == "digits"
    assert set(demo.search) == {"lr", "mixing_rate", "k_neighbours"}  # what moved purity (docs/landscape.md)
    assert (demo.la.holdout, demo.confirm_top, demo.confirm_seeds) == (0.5, 1, 5)
    default = load_space(ROOT / "search_spaces" / "default.yaml")
    assert (default.la.holdout, default.confirm_top, default.confirm_seeds) == (0.5, 3, 5)
    assert set(default.search) >= set(FIVE)
    assert default.ae.arch == "vgg16_bn" and default.ae.pretrained == "imagenet"
    assert default.search["n_centroids"].kind == "fraction" and default.search["n_centroids"].log is True


def _with(raw: dict, path: tuple, value) -> dict:
    raw = json.loads(json.dumps(raw))
    node = raw
    for key in path[:-1]:
        node = node.setdefault(key, {})
    node[path[-1]] = value
    return raw


BAD_SPACES = {
    "unknown top-level key": (("epochs",), 3, "epochs"),
    "unknown objective": (("objective",), "accuracy", "objective"),
    "unknown mode": (("mode",), "maximise", "mode"),
    "num_samples < 1": (("num_samples",), 0, "num_samples"),
    "search key that is not an LA setting": (("search", "dropout"), {"uniform": [0.1, 0.5]}, "dropout"),
    "two kinds": (("search", "temperature"), {"uniform": [0.1, 0.2], "loguniform": [0.1, 0.2]}, "search.temperature"),
    "unknown kind": (("search", "temperature"), {"normal": [0.1, 0.2]}, "search.temperature"),
    "low > high": (("search", "mixing_rate"), {"uniform": [0.9, 0.3]}, "search.mixing_rate"),
    "loguniform with low 0": (("search", "temperature"), {"loguniform": [0, 0.3]}, "search.temperature"),
    "loguniform with low < 0": (("search", "temperature"), {"loguniform": [-0.1, 0.3]}, "search.temperature"),
    "int with fractions": (("search", "clustering_repeats"), {"int": [1.5, 3]}, "search.clustering_repeats"),
    "fraction of a size-independent parameter": (
        ("search", "mixing_rate"),
        {"fraction": [0.1, 0.2]},
        "search.mixing_rate",
    ),
    "fraction above 1": (("search", "n_centroids"), {"fraction": [0.1, 1.5]}, "search.n_centroids"),
    "categorical value invalid for LAConfig": (("search", "merger"), {"categorical": ["max"]}, "merger"),
    "range outside LAConfig's limits": (("search", "mixing_rate"), {"uniform": [0.5, 1.5]}, "mixing_rate"),
    "fixed.la with an unknown key": (("fixed", "la", "momentun"), 0.9, "momentun"),
    "fixed.autoencoder invalid": (("fixed", "autoencoder", "arch"), "resnet50", "arch"),
    "unknown fixed section": (("fixed", "optimizer"), {"lr": 0.1}, "fixed"),
    "holdout of 1": (("holdout",), 1.0, "holdout"),
    "holdout as text": (("holdout",), "half", "holdout"),
    "holdout in fixed.la": (("fixed", "la", "holdout"), 0.3, "holdout"),
    "negative confirm_top": (("confirm_top",), -1, "confirm_top"),
    "fractional confirm_seeds": (("confirm_seeds",), 2.5, "confirm_seeds"),
}


@pytest.mark.parametrize("case", list(BAD_SPACES))
def test_malformed_space_file_names_the_key(case, tmp_path):
    path, value, named = BAD_SPACES[case]
    file = tmp_path / "space.yaml"
    file.write_text(yaml.safe_dump(_with(raw_space(), path, value)))
    with pytest.raises(SpaceError) as info:
        load_space(file)
    assert named in str(info.value)
    assert "\n" not in str(info.value)


def test_a_folder_named_like_a_bundled_space_does_not_hide_it(tmp_path, monkeypatch):
    (tmp_path / "demo").mkdir()  # e.g. the results of a run called demo, where the user works
    monkeypatch.chdir(tmp_path)
    assert load_space("demo").source.endswith("search_spaces/demo.yaml")
    done = subprocess.run(
        [sys.executable, "-m", "laray", "sweep", "--help"], capture_output=True, text=True, cwd=tmp_path, timeout=120
    )
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr


def test_space_file_that_cannot_be_read(tmp_path):
    with pytest.raises(
        SpaceError,
        match=r"no search space file .*missing\.yaml'; the bundled spaces are "
        r"default, demo, photos-cpu \(--space NAME\)",
    ):
        load_space(tmp_path / "missing.yaml")
    (tmp_path / "broken.yaml").write_text("search: {temperature: [\n")
    with pytest.raises(SpaceError, match="cannot read search space"):
        load_space(tmp_path / "broken.yaml")
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    with pytest.raises(SpaceError):
        load_space(tmp_path / "list.yaml")
    (tmp_path / "empty_search.yaml").write_text("objective: nmi\n")
    with pytest.raises(SpaceError, match="search"):
        load_space(tmp_path / "empty_search.yaml")


def _draws(domain, n=300):
    return domain.sample(size=n) if hasattr(domain, "sample") else [domain] * n


def test_tune_space_resolves_size_dependent_ranges():
    space = parse_space(
        {
            "search": {
                "k_neighbours": {"int": [5, 500], "log": True},
                "n_centroids": {"fraction": [0.02, 0.5]},
                "clustering_repeats": {"int": [1, 3]},
                "temperature": {"loguniform": [0.05, 0.5]},
            }
        }
    )
    for n in (40, 120):
        param_space = tune_space(space, n)
        k = _draws(param_space["k_neighbours"])
        assert all(isinstance(v, (int, np.integer)) and 5 <= v <= n - 1 for v in k)
        assert max(k) > n // 2  # the range reaches up to N-1, not just below it
        c = _draws(param_space["n_centroids"])
        assert all(isinstance(v, (int, np.integer)) and 1 <= v <= n for v in c)
        assert min(c) >= max(1, round(0.02 * n)) and max(c) <= round(0.5 * n)
        r = _draws(param_space["clustering_repeats"])
        assert set(r) == {1, 2, 3}  # integer ranges include their upper end
        t = _draws(param_space["temperature"])
        assert all(0.05 <= v <= 0.5 for v in t)
        for kk, cc, rr, tt in zip(k, c, r, t):
            cfg = replace(
                LAConfig(), k_neighbours=int(kk), n_centroids=int(cc), clustering_repeats=int(rr), temperature=float(tt)
            )
            cfg.check_data_size(n)  # every draw makes a valid LAConfig for this N

    # ranges entirely above the limits collapse to the limit; fractions never go below 1
    clipped = parse_space(
        {"search": {"k_neighbours": {"int": [200, 500]}, "n_centroids": {"fraction": [0.001, 0.002]}}}
    )
    param_space = tune_space(clipped, 120)
    assert set(_draws(param_space["k_neighbours"])) == {119}
    assert set(_draws(param_space["n_centroids"])) == {1}
    big = parse_space({"search": {"n_centroids": {"int": [50, 500]}, "k_neighbours": {"categorical": [10, 500]}}})
    param_space = tune_space(big, 40)
    assert set(_draws(param_space["n_centroids"])) == {40}
    assert set(_draws(param_space["k_neighbours"])) == {10}  # categorical choices beyond N-1 are dropped


def test_check_data_size_checks_fixed_values_only():
    fixed_k = parse_space(
        {
            "fixed": {"la": {"k_neighbours": 120, "n_centroids": 10}},
            "search": {"temperature": {"loguniform": [0.05, 0.5]}},
        }
    )
    with pytest.raises(SpaceError, match="k_neighbours"):
        fixed_k.check_data_size(120)
    fixed_k.check_data_size(121)  # k = N-1 is allowed
    fixed_c = parse_space(
        {
            "fixed": {"la": {"k_neighbours": 10, "n_centroids": 121}},
            "search": {"temperature": {"loguniform": [0.05, 0.5]}},
        }
    )
    with pytest.raises(SpaceError, match="n_centroids"):
        fixed_c.check_data_size(120)
    # searched size-dependent parameters are clipped instead, so LAConfig's default k (500) does not matter
    searched = parse_space(raw_space())
    assert searched.la.k_neighbours == LAConfig().k_neighbours > N
    searched.check_data_size(N)


def test_continuous_distribution_over_an_integer_setting_is_refused():
    for kind in ("uniform", "loguniform"):
        with pytest.raises(SpaceError, match="k_neighbours"):
            parse_space({"search": {"k_neighbours": {kind: [5, 50]}}})


def test_continuous_draws_for_an_integer_setting_are_invalid_configs():
    """Why the test above matters: a float k_neighbours is not a valid LAConfig, so the trial would fail."""
    from laray.settings.config import ConfigError

    with pytest.raises(ConfigError, match="k_neighbours"):
        replace(LAConfig(), k_neighbours=23.7)


def test_yaml_exponent_numbers_are_numbers(tmp_path):
    # PyYAML reads 1e1 and 1e-2 as strings; the space reads them as the numbers they are.
    file = tmp_path / "space.yaml"
    file.write_text("search:\n  n_centroids: {categorical: [1e1, 20]}\n  temperature: {loguniform: [1e-2, 0.3]}\n")
    space = load_space(file)
    assert set(_draws(tune_space(space, 120)["n_centroids"])) == {10, 20}
    assert space.search["temperature"].args == (0.01, 0.3)


def test_every_la_field_is_searchable():
    assert set(FIVE) | {"lr", "merger", "augment"} <= set(SEARCHABLE)


# --------------------------------------------------------------------------------------------------
# `laray sweep`

PROBE = textwrap.dedent("""
    import json, sys
    from laray.cli.main import main
    rc = main(sys.argv[1:])
    ray = sys.modules.get("ray")
    print(json.dumps({"ray_initialized": bool(ray is not None and ray.is_initialized())}))
    sys.exit(rc)
""")


def _run(args, tmp_path, code=None):
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["HOME"] = str(tmp_path)  # a default --storage would land here, never in the real home
    command = [sys.executable, "-c", code, *args] if code else [sys.executable, "-m", "laray.cli.main", *args]
    return subprocess.run(command, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)


def test_cli_sweep_with_a_missing_space_fails_before_ray(tmp_path):
    done = _run(["sweep", "--space", "/nonexistent.yaml", "--storage", str(tmp_path / "results")], tmp_path)
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("laray: error:") and "/nonexistent.yaml" in lines[0]
    assert not (tmp_path / "results").exists()

    probe = _run(
        ["sweep", "--space", "/nonexistent.yaml", "--storage", str(tmp_path / "results")], tmp_path, code=PROBE
    )
    assert probe.returncode == 1
    assert json.loads(probe.stdout.strip().splitlines()[-1]) == {"ray_initialized": False}


IMPORTS = textwrap.dedent("""
    import json, sys, time
    began = time.perf_counter()
    from laray.cli.main import main
    rc = main(sys.argv[1:])
    print(json.dumps({"torch": "torch" in sys.modules, "ray": "ray" in sys.modules,
                      "seconds": time.perf_counter() - began}))
    sys.exit(rc)
""")


@pytest.mark.parametrize(
    "argv",
    [
        ["sweep", "--data", "/nonexistent/photos"],
        ["sweep", "--space", "nosuchspace"],
        ["sweep", "--device", "gpu"],
        ["sweep", "--holdout", "1.5"],
        ["train", "--data", "/nonexistent/photos", "--out", "run"],
        ["train", "--device", "cuda:x", "--out", "run"],
        ["train", "--temperature", "0", "--out", "run"],
    ],
    ids=lambda argv: " ".join(argv),
)
def test_usage_errors_come_before_torch_and_ray_are_imported(argv, tmp_path):
    done = _run([*argv, "--storage", str(tmp_path / "results")] if argv[0] == "sweep" else argv, tmp_path, code=IMPORTS)
    assert done.returncode in (1, 2), done.stderr  # 2: argparse's own usage errors
    (line,) = done.stderr.strip().splitlines()[-1:]
    assert "error:" in line
    probe = json.loads(done.stdout.strip().splitlines()[-1]) if done.stdout.strip() else None
    if probe is not None:  # argparse exits before the probe prints; then nothing was imported either
        assert probe["torch"] is False and probe["ray"] is False
        assert probe["seconds"] < 1.0  # measured 0.16 s for the whole process; the import alone is 1.5 s
    assert not (tmp_path / "results").exists() and not (tmp_path / "run").exists()


def test_cli_sweep_with_a_malformed_space_names_the_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(_with(raw_space(), ("search", "dropout"), {"uniform": [0.1, 0.5]})))
    probe = _run(["sweep", "--space", str(bad), "--storage", str(tmp_path / "results")], tmp_path, code=PROBE)
    assert probe.returncode == 1
    lines = probe.stderr.strip().splitlines()
    assert len(lines) == 1, probe.stderr
    assert lines[0].startswith("laray: error:") and "dropout" in lines[0]
    assert json.loads(probe.stdout.strip().splitlines()[-1]) == {"ray_initialized": False}


def test_cli_sweep_console_shows_laray_lines_and_not_rays_noise(sub, tmp_path):
    """A whole `laray sweep` in its own process, with its own Ray: what the user sees."""
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump(raw_space(num_samples=2, max_concurrent=2, confirm_top=1, confirm_seeds=1)))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(HOME=str(tmp_path), RAY_USAGE_STATS_ENABLED="0", LARAY_CACHE_DIR=str(tmp_path / "cache"))
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "laray.cli.main",
            "sweep",
            "--space",
            str(space),
            "--data",
            sub.spec,
            "--storage",
            str(tmp_path / "results"),
            "--name",
            "console",
            "--cpus-per-trial",
            "1",
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=600,
    )
    console = done.stdout + done.stderr
    assert done.returncode == 0, console[-3000:]
    lines = console.splitlines()
    assert (
        sum(re.match(r"\[search [^]]+\] trial \w+ epoch \d/2  purity \d\.\d{3}", line) is not None for line in lines)
        >= 2
    )
    # the confirmation: the search's best and the recipe, one seed each
    assert any(re.match(r"\[confirm [^]]+\] trial \w+ finished; 2/2 trials ended \(2 done\)", line) for line in lines)
    # announced in the console's format before its stage 1, whose lines name their seed; no logger-format line
    announced = "[confirm] 2 configuration(s), the recipe among them, with seeds [1]; first stage 1 for each seed"
    assert announced in done.stdout
    assert done.stdout.index(announced) < done.stdout.index("stage 1 (seed 1): epoch 1 loss")
    assert "stage 1 (seed 0): epoch 1 loss" in done.stdout  # the search's own
    assert "INFO: confirming" not in console
    assert any("up to ~" in line and "left" in line for line in lines)
    for noise in (
        "Checkpoint successfully created",
        "snapshotting has been triggered",
        "driver_artifacts",
        "Configuration for experiment",
        "A new study created",
        "Traceback",
        "\x1b[",
        "across cluster",
        "performance bottleneck",
    ):
        assert noise not in console, noise
    experiment = tmp_path / "results" / "console"
    assert f"laray analyze {experiment}" in done.stdout and f"laray dashboard {experiment}" in done.stdout
    # The plan came first, before stage 1, and the end says how far off it was.
    planned = next(i for i, line in enumerate(lines) if line.startswith("plan: timing each kind of step on cpu"))
    assert (
        planned < next(i for i, line in enumerate(lines) if line.startswith("[search")) and "expected wall" in console
    )
    plan = json.loads((experiment / "plan.json").read_text())
    assert plan["estimated_s"] > 0 and plan["trials"] == 2 and plan["concurrency"] <= 2
    assert re.search(r"^took .+; the plan said .+$", done.stdout, re.M)
    best = json.loads((experiment / "best.json").read_text())
    margin = best["margin_over_raw_pixels"]["purity_mean"]
    assert (
        f"winner minus k-means on raw pixels, paired by seed: purity {margin:+.3f}, held-out " in done.stdout
    ) and "one seed: no interval" in done.stdout
    # the recipe was the first trial
    recipe = RECIPE
    first = next(p for p in experiment.glob("train_trial_*_1_*") if p.is_dir())  # Tune numbers them from 1
    assert json.loads((first / "params.json").read_text()) == pytest.approx(recipe)
    # ... and was re-run beside the search's best over the same seed, its margin and the verdict recorded
    assert best["recipe"]["config"] == pytest.approx(recipe) and best["recipe"]["seeds"] == [1]
    over = best["margin_over_recipe"]
    assert over["purity"] == pytest.approx([best["confirmed"][0]["purity"][0] - best["recipe"]["purity"][0]])
    assert best["beat_recipe"] is False  # one seed: no interval, so no winner
    assert "the recipe (laray train's settings)" in done.stdout
    assert done.stdout.rstrip().splitlines()[-1] == f"verdict: {best['verdict']}"
    assert best["verdict"].startswith("the search's best is no better than the recipe (one seed: no interval)")


def test_cli_sweep_help():
    done = subprocess.run(
        [sys.executable, "-m", "laray.cli.main", "sweep", "--help"], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0
    for option in (
        "--space",
        "--num-samples",
        "--storage",
        "--name",
        "--resume",
        "--max-failures",
        "--cpus-per-trial",
        "--gpus-per-trial",
        "--holdout",
        "--confirm-top",
        "--confirm-seeds",
    ):
        assert option in done.stdout


def test_a_worker_ignores_an_exit_raised_in_a_callback_and_still_reports_other_ignored_errors(monkeypatch):
    """Ray's SystemExit landing in a garbage-collection callback printed a traceback on the console."""
    seen = []
    monkeypatch.setattr(sys, "unraisablehook", lambda unraisable: seen.append(type(unraisable.exc_value)))
    ignore_exit_in_callbacks()
    ignore_exit_in_callbacks()  # a reused worker installs it again: still one hook in front

    class RaisesOnDelete:
        def __init__(self, error):
            self.error = error

        def __del__(self):
            raise self.error

    obj = RaisesOnDelete(SystemExit(1))
    del obj  # Python cannot raise from __del__: it hands the exception to sys.unraisablehook
    obj = RaisesOnDelete(ValueError("a real one"))
    del obj
    assert seen == [ValueError]
