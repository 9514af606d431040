"""Experiment tracking with MLflow (laray.sweep.tracking): sweeps recorded in the real MLflow on SQLite, read back.

Skipped when mlflow is not installed (it is the optional extra laray[tracking], which CI does not
install). Tracked sweeps of 2 trials on 120 of the embedded digits with a tiny VGG (like
tests/sweep/test_sweep.py), one with a confirmation of the best and the recipe over 1 seed: their runs,
params, per-epoch metrics, ends and tags read back from STORAGE/NAME/mlflow.db; resumes that add no run,
one with Tune's real restore after a killed driver (slow); `laray dashboard` serving them (slow).
"""

import json
import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from conftest import write_digit_folder

from laray.data.dataset import describe
from laray.errors import LarayError, SweepError
from laray.settings.space import parse_space

mlflow = pytest.importorskip("mlflow")

from laray.sweep import tracking as tr  # noqa: E402  (after the skip: it needs Ray's MLflow integration)
from laray.sweep.driver import SweepRun, run_sweep  # noqa: E402

N, SEED = 120, 0
AE = {"arch": "vgg11_bn", "width": 0.125, "image_size": 32, "epochs": 1, "batch_size": 32}
SEARCH = {"temperature": {"loguniform": [0.05, 0.5]}, "mixing_rate": {"uniform": [0.3, 0.9]}}
RECIPE = {"temperature": 0.1, "mixing_rate": 0.5}


def raw_space(num_samples=2, max_concurrent=2, confirm_top=1, confirm_seeds=1, la_epochs=2, track=None) -> dict:
    raw = {
        "num_samples": num_samples,
        "max_concurrent": max_concurrent,
        "grace_period": 1,
        "confirm_top": confirm_top,
        "confirm_seeds": confirm_seeds,
        "fixed": {
            "autoencoder": dict(AE),
            "la": {"epochs": la_epochs, "batch_size": 32, "k_neighbours": 10, "n_centroids": 12},
        },
        "search": dict(SEARCH),
        "recipe": dict(RECIPE),
    }
    return raw if track is None else {**raw, "track": track}


@pytest.fixture(scope="module")
def sub(tmp_path_factory):
    return describe(str(write_digit_folder(tmp_path_factory.mktemp("digits"), N)), 32)


def client_of(experiment: Path):
    return mlflow.MlflowClient(tracking_uri=f"sqlite:///{experiment / tr.MLFLOW_DB}")


def runs_of(experiment: Path, name: str) -> list:
    client = client_of(experiment)
    found = client.get_experiment_by_name(name)
    assert found is not None, f"no MLflow experiment {name}"
    return client.search_runs([found.experiment_id], max_results=1000)


def by_phase(runs: list, phase: str) -> list:
    return [r for r in runs if r.data.tags.get(tr.PHASE) == phase]


# --------------------------------------------------------------------------------------------------
# The choice of store, without a sweep


def test_tracking_is_off_the_sweep_folder_or_a_uri(tmp_path):
    assert tr.sweep_tracking(None, tmp_path, "s", resume=False) is None
    local = tr.sweep_tracking("mlflow", tmp_path, "s", resume=False)
    assert local.uri == f"sqlite:///{tmp_path / 'mlflow.db'}" and local.experiment_name == "s"
    server = tr.sweep_tracking("http://mlflow.example:5000", tmp_path, "s", resume=False)
    assert server.uri == "http://mlflow.example:5000" and server.sweep_id != local.sweep_id


def test_a_resume_keeps_the_store_the_sweep_began_with(tmp_path):
    began = tr.sweep_tracking("mlflow", tmp_path, "s", resume=False)
    began.record(tmp_path)
    assert tr.sweep_tracking(None, tmp_path, "s", resume=True) == began  # as recorded
    assert tr.sweep_tracking("mlflow", tmp_path, "s", resume=True) == began
    with pytest.raises(SweepError, match="records its runs at sqlite:///.*mlflow.db; resume it with that"):
        tr.sweep_tracking("http://elsewhere:5000", tmp_path, "s", resume=True)
    # stopped in stage 1, before Tune saved anything: the driver starts the search afresh (resume False), same store
    assert tr.sweep_tracking(None, tmp_path, "s", resume=False) == began
    untracked = tmp_path / "untracked"
    assert tr.sweep_tracking(None, untracked, "s", resume=True) is None
    with pytest.raises(SweepError, match="began without tracking"):
        tr.sweep_tracking("mlflow", untracked, "s", resume=True)


def test_without_mlflow_one_line_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "mlflow", None)  # import mlflow raises ImportError
    with pytest.raises(LarayError) as error:
        tr.sweep_tracking("mlflow", tmp_path, "s", resume=False)
    assert str(error.value) == '--track mlflow needs the package mlflow: pip install "laray[tracking]"'


def test_a_tracking_server_that_does_not_answer_is_one_line_before_the_sweep_starts(tmp_path):
    with socket.socket() as closed:  # a port that nothing listens on
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    tracking = tr.sweep_tracking(f"http://127.0.0.1:{port}", tmp_path, "s", resume=False)
    with pytest.raises(
        LarayError, match=f"--track: MLflow cannot record the sweep's runs at http://127.0.0.1:{port}: "
    ):
        tracking.record(tmp_path)
    assert not (tmp_path / tr.RECORD).exists()


class FakeTrial:
    """What the callback reads of a Tune trial."""

    def __init__(self, trial_id: str, config: dict, experiment_tag: str = ""):
        self.trial_id, self.config, self.experiment_tag = trial_id, config, experiment_tag

    def __str__(self):
        return f"train_trial_{self.trial_id}"


def test_a_restarted_callback_reopens_the_trials_run_and_logs_only_new_epochs(tmp_path):
    """What `laray sweep --resume` does to the callback (Tune restores a fresh one): no second run, no epoch twice."""
    tracking = tr.sweep_tracking("mlflow", tmp_path, "resumed", resume=False)
    trial = FakeTrial("abc12", {"temperature": 0.2, "mixing_rate": 0.4}, "2_mixing_rate=0.4,temperature=0.2")

    first = tracking.callback("search", list(SEARCH), SEED, epochs=3)
    first.setup()
    first.log_trial_start(trial)
    first.log_trial_result(1, trial, {"epoch": 1, "purity": 0.5, "loss": 2.0})
    first.log_trial_result(2, trial, {"epoch": 2, "purity": 0.6, "loss": 1.5})  # then the driver dies

    again = tracking.callback("search", list(SEARCH), SEED, epochs=3)
    again.setup()
    again.log_trial_start(trial)
    again.log_trial_result(1, trial, {"epoch": 2, "purity": 0.61, "loss": 1.4})  # re-run from epoch 1's checkpoint
    again.log_trial_result(2, trial, {"epoch": 3, "purity": 0.7, "loss": 1.0})
    again.log_trial_end(trial)

    (run,) = runs_of(tmp_path, "resumed")
    assert run.info.run_name == "search 2 (trial abc12)" and run.info.status == "FINISHED"
    assert run.data.params == {"temperature": "0.2", "mixing_rate": "0.4", "seed": "0"}
    history = client_of(tmp_path).get_metric_history(run.info.run_id, "purity")
    assert sorted((m.step, m.value) for m in history) == [(1, 0.5), (2, 0.6), (3, 0.7)]
    assert run.data.tags[tr.STOPPED_BY] == "none" and run.data.tags[tr.EPOCHS_RUN] == "3"


def test_the_run_of_a_trial_that_tune_lost_is_deleted_on_resume(tmp_path):
    """A trial started after Tune's last save of its state is unknown to the resumed sweep, which runs another."""
    tracking = tr.sweep_tracking("mlflow", tmp_path, "lost", resume=False)
    saved, lost = FakeTrial("aaa", {"temperature": 0.2}, "1_t"), FakeTrial("bbb", {"temperature": 0.3}, "2_t")
    first = tracking.callback("search", ["temperature"], SEED, epochs=2)
    first.setup()
    for trial in (saved, lost):
        first.log_trial_start(trial)
        first.log_trial_result(1, trial, {"epoch": 1, "purity": 0.5})

    again = tracking.callback("search", ["temperature"], SEED, epochs=2)
    again.setup()
    again.on_step_begin(0, [saved])  # the trials Tune restored
    again.on_step_begin(1, [saved, FakeTrial("ccc", {"temperature": 0.3}, "3_t")])  # checked once only
    assert [r.data.tags[tr.TRIAL_ID] for r in runs_of(tmp_path, "lost")] == ["aaa"]
    client = client_of(tmp_path)
    (deleted,) = client.search_runs([client.get_experiment_by_name("lost").experiment_id], run_view_type=2)
    assert deleted.data.tags[tr.TRIAL_ID] == "bbb" and deleted.data.tags[tr.STOPPED_BY].startswith("lost: ")
    assert deleted.info.status == "KILLED"


# --------------------------------------------------------------------------------------------------
# Tracked sweeps, read back: the search alone (2 trials), then with its confirmation


def check_search_runs(experiment: Path, name: str, result) -> list:
    """Each search trial's run: its name, settings, epochs, end; the sweep's id on every run. The search's runs."""
    from ray.tune import ExperimentAnalysis

    runs = runs_of(experiment, name)
    search = by_phase(runs, "search")
    sweep_id = json.loads((experiment / tr.RECORD).read_text())["sweep_id"]
    assert {r.data.tags[tr.SWEEP_ID] for r in runs} == {sweep_id}
    tune_trials = {t.trial_id: t for t in ExperimentAnalysis(str(experiment)).trials}
    assert len(search) == result.n_trials and {r.data.tags[tr.TRIAL_ID] for r in search} == set(tune_trials)
    client = client_of(experiment)
    for run in search:
        trial = tune_trials[run.data.tags[tr.TRIAL_ID]]
        assert run.info.run_name == f"search {trial.experiment_tag.split('_')[0]} (trial {trial.trial_id})"
        assert run.info.status == "FINISHED" and run.data.tags[tr.SEED] == "0"
        assert run.data.params == {**{k: str(v) for k, v in trial.config.items()}, "seed": "0"}
        assert json.loads(run.data.tags[tr.SETTINGS]) == trial.config
        epochs = [m.step for m in client.get_metric_history(run.info.run_id, "purity")]
        assert epochs == list(range(1, len(epochs) + 1)) and 1 <= len(epochs) <= 2  # ASHA may stop one after 1
        assert run.data.metrics["purity"] == pytest.approx(trial.last_result["purity"])
        assert run.data.tags[tr.STOPPED_BY] == ("none" if len(epochs) == 2 else "ASHA")
        assert run.data.tags[tr.EPOCHS_RUN] == str(len(epochs))
        assert {"nmi", "acc", "heldout_purity", "loss", "epoch"} <= set(run.data.metrics)
    return search


@pytest.fixture(scope="module")
def searched(ray_session, sub, tmp_path_factory):
    """A tracked sweep without confirmation, the store chosen by the space's `track`: about 20 s on 2 idle cores."""
    storage = tmp_path_factory.mktemp("searched")
    space = parse_space(raw_space(confirm_top=0, confirm_seeds=0, track="mlflow"))
    result = run_sweep(sub, space, run=SweepRun(str(storage), "searched", seed=SEED, verbose=0, tracking=space.track))
    return storage, space, result


def test_every_search_trial_is_an_mlflow_run_and_the_best_is_tagged(searched):
    storage, _, result = searched
    experiment = storage / "searched"
    search = check_search_runs(experiment, "searched", result)
    runs = runs_of(experiment, "searched")
    assert len(runs) == len(search) + 1  # and the summary
    # no confirmation: the search's best is the winner
    assert [json.loads(r.data.tags[tr.SETTINGS]) for r in runs if r.data.tags.get(tr.WINNER) == "true"] == [
        result.best_config
    ]
    best = json.loads((experiment / "best.json").read_text())
    (summary,) = by_phase(runs, "summary")
    assert summary.data.metrics["baseline/raw_pixels/purity"] == pytest.approx(
        best["baselines"]["raw_pixels"]["purity"]
    )
    assert summary.data.metrics["baseline/autoencoder/nmi"] == pytest.approx(best["baselines"]["autoencoder"]["nmi"])
    assert summary.data.metrics["search_best/purity"] == pytest.approx(best["best_metrics"]["purity"])
    tags = client_of(experiment).get_experiment_by_name("searched").tags
    assert tags[tr.VERDICT].startswith("no verdict") and tags[tr.BEAT_RECIPE] == "false"


def test_a_resume_of_a_finished_tracked_sweep_adds_no_run(searched, sub):
    storage, space, _ = searched
    experiment = storage / "searched"
    before = {r.info.run_id: r.data.metrics for r in runs_of(experiment, "searched")}
    run_sweep(sub, space, run=SweepRun(str(storage), "searched", seed=SEED, resume=True, verbose=0))
    assert {r.info.run_id: r.data.metrics for r in runs_of(experiment, "searched")} == before
    with pytest.raises(SweepError, match="records its runs at sqlite:///"):
        run_sweep(sub, space, run=SweepRun(str(storage), "searched", resume=True, verbose=0, tracking="http://x:5000"))


def test_a_confirmed_sweep_tags_its_winner_and_verdict(ray_session, sub, tmp_path):
    """2 trials, then the best and the recipe over 1 fresh seed: about 25 s on 2 idle cores."""
    storage = tmp_path / "results"
    space = parse_space(raw_space(confirm_top=1, confirm_seeds=1))
    result = run_sweep(sub, space, run=SweepRun(str(storage), "confirmed", seed=SEED, verbose=0, tracking="mlflow"))
    experiment = storage / "confirmed"
    check_search_runs(experiment, "confirmed", result)
    runs = runs_of(experiment, "confirmed")
    confirm = by_phase(runs, "confirm")
    assert sorted(r.info.run_name for r in confirm) == ["confirm #1 seed 1", "the recipe seed 1"]
    client = client_of(experiment)
    for run in confirm:
        assert run.info.status == "FINISHED" and run.data.tags[tr.SEED] == "1"
        assert run.data.params["seed"] == "1" and set(run.data.params) == {*SEARCH, "seed"}  # the settings' own names
        assert run.data.tags[tr.CONFIG] == ("recipe" if run.info.run_name.startswith("the recipe") else "#1")
        assert [m.step for m in client.get_metric_history(run.info.run_id, "purity")] == [1, 2]  # no ASHA here

    winner = result.confirmed[0]["config"]
    winners = [r for r in runs if r.data.tags.get(tr.WINNER) == "true"]
    assert [r.data.tags[tr.CONFIG] for r in by_phase(winners, "confirm")] == ["#1"]  # its confirmation run
    assert len(by_phase(winners, "search")) >= 1  # and the search trial it came from
    assert all(json.loads(r.data.tags[tr.SETTINGS]) == pytest.approx(winner) for r in winners)

    best = json.loads((experiment / "best.json").read_text())
    tags = client.get_experiment_by_name("confirmed").tags
    assert tags[tr.VERDICT] == best["verdict"] and tags[tr.BEAT_RECIPE] == str(best["beat_recipe"]).lower()
    assert tags[tr.MARGIN_OVER_RECIPE].startswith("purity ")
    (summary,) = by_phase(runs, "summary")
    metrics = summary.data.metrics
    assert metrics["baseline/raw_pixels/purity"] == pytest.approx(best["baselines"]["raw_pixels"]["purity"])
    assert metrics["confirm_baseline/raw_pixels/purity_mean"] == pytest.approx(
        best["confirmed_baselines"]["raw_pixels"]["purity_mean"]
    )
    assert metrics["winner/purity_mean"] == pytest.approx(best["confirmed"][0]["purity_mean"])
    assert metrics["recipe/purity_mean"] == pytest.approx(best["recipe"]["purity_mean"])
    assert metrics["margin_over_recipe/purity_mean"] == pytest.approx(best["margin_over_recipe"]["purity_mean"])
    assert summary.data.tags[tr.VERDICT] == best["verdict"]
    assert summary.data.params["winner/temperature"] == str(winner["temperature"])


# --------------------------------------------------------------------------------------------------
# A driver killed mid-search, resumed: Tune restores the trials and a fresh callback, no run twice

DRIVER = textwrap.dedent("""
    import json, os, sys
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    import ray
    from laray.data.dataset import describe
    from laray.settings.space import parse_space
    from laray.sweep.driver import SweepRun, run_sweep

    address, storage, name, raw, folder = sys.argv[1:6]
    ray.init(address=address)  # the tests' Ray: a killed driver leaves no Ray processes behind
    run_sweep(describe(folder, 32), parse_space(json.loads(raw)), SweepRun(storage, name, verbose=0, tracking="mlflow"))
""")


@pytest.mark.slow
def test_a_killed_tracked_sweep_resumes_into_the_same_runs(ray_session, sub, tmp_path):
    """SIGKILL once a trial has finished and the next has logged an epoch, then --resume: about 25 s on 2 idle cores."""
    raw = {**raw_space(num_samples=3, max_concurrent=1, confirm_top=0, confirm_seeds=0, la_epochs=3), "grace_period": 3}
    storage, name = tmp_path / "results", "killed"
    experiment = storage / name
    script, log = tmp_path / "driver.py", tmp_path / "driver.log"
    script.write_text(DRIVER)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    address = ray_session.get_runtime_context().gcs_address
    argv = [sys.executable, str(script), address, str(storage), name, json.dumps(raw), sub.spec]
    with open(log, "w") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env)

    def finished_and_open() -> bool:
        """A finished run, and an open one with an epoch logged whose trial Tune has saved as running."""
        from laray.results.scores import tune_trial_states

        try:
            runs, saved = runs_of(experiment, name), tune_trial_states(experiment)
        except Exception:  # the store or Tune's state being created or written
            return False
        running = {t.get("trial_id") for t in saved if t.get("status") == "RUNNING"}
        finished = any(r.info.status == "FINISHED" for r in runs)
        return finished and any(
            r.info.status == "RUNNING" and r.data.metrics.get("epoch", 0) >= 1 and r.data.tags[tr.TRIAL_ID] in running
            for r in runs
        )

    try:
        deadline = time.monotonic() + 300
        while not finished_and_open() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert proc.poll() is None, log.read_text()[-3000:]
        proc.kill()
    finally:
        proc.wait(timeout=60)
    before = runs_of(experiment, name)
    assert any(r.info.status == "RUNNING" for r in before)  # the killed driver left its trial's run open

    result = run_sweep(sub, parse_space(raw), run=SweepRun(str(storage), name, seed=SEED, resume=True, verbose=0))
    runs = runs_of(experiment, name)
    search = by_phase(runs, "search")
    assert len(search) == result.n_trials == 3 and len({r.data.tags[tr.TRIAL_ID] for r in search}) == 3
    assert {r.info.run_id for r in before} <= {r.info.run_id for r in runs}  # the open run went on, not a new one
    client = client_of(experiment)
    for run in search:
        assert run.info.status == "FINISHED" and run.data.tags[tr.STOPPED_BY] == "none"
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "purity")]
        assert steps == [1, 2, 3]  # each epoch once


def test_mlflow_is_imported_by_the_tracking_module_only():
    """laray works without the 'tracking' extra: mlflow is imported in laray.sweep.tracking only, inside functions."""
    import ast

    package = Path(tr.__file__).parents[1]
    found = []
    for path in package.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            names += [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            if any(name.split(".")[0] == "mlflow" for name in names):
                found.append((path.relative_to(package.parent).as_posix(), node.col_offset > 0))
    assert found and {path for path, _ in found} == {"laray/sweep/tracking.py"}
    assert all(inside for _, inside in found)  # none at the top of the module


# --------------------------------------------------------------------------------------------------
# The command line and the space; the MLflow UI in `laray dashboard`


def test_track_takes_mlflow_or_a_uri_on_the_command_line_and_in_the_space(capsys):
    from laray.cli import main as cli
    from laray.settings.space import SpaceError

    with pytest.raises(SystemExit) as exit:
        cli.main(["sweep", "--track", "wandb"])
    assert exit.value.code == 2
    assert "argument --track: not 'mlflow' nor an MLflow tracking URI" in capsys.readouterr().err
    assert parse_space(raw_space(track="http://mlflow.example:5000")).track == "http://mlflow.example:5000"
    assert parse_space(raw_space()).track is None
    with pytest.raises(SpaceError, match="track must be 'mlflow' or an MLflow tracking URI"):
        parse_space(raw_space(track="yes"))


def test_dashboard_starts_the_mlflow_ui_when_the_sweep_has_its_store(tmp_path, monkeypatch):
    from laray.results import dashboards

    started = []

    class Recorder:
        def __init__(self, argv, **kwargs):
            started.append(argv)
            self.pid = 0

        def poll(self):
            return 0

    monkeypatch.setattr(dashboards, "tool", lambda name, install=dashboards.INSTALL: f"/bin/{name}")
    monkeypatch.setattr(dashboards.subprocess, "Popen", Recorder)
    with dashboards.Dashboards(tmp_path, 1, 2) as plain:
        assert [c.name for c in plain.children] == ["optuna-dashboard", "TensorBoard"]
    started.clear()
    with dashboards.Dashboards(tmp_path, 1, 2, 3) as tracked:
        assert [c.name for c in tracked.children][-1] == "MLflow UI" and tracked.children[-1].url.endswith(":3")
    assert started[-1] == ["/bin/mlflow", "ui", "--backend-store-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"] + [
        "--host",
        "127.0.0.1",
        "--port",
        "3",
        "--workers",
        "1",
    ]


@pytest.mark.slow
def test_laray_dashboard_serves_the_tracked_runs(searched):
    """`laray dashboard` on a tracked sweep: the MLflow UI's address printed, its API listing the sweep's runs."""
    import re
    import signal
    import urllib.request

    storage, _, result = searched
    experiment = storage / "searched"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "laray.cli.main", "dashboard", str(experiment)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    try:
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("serving"):
                break
        urls = {name: url for name, url in (re.match(r"(.+?):\s+(http://\S+)", x).groups() for x in lines[:-1])}
        assert set(urls) == {"optuna-dashboard", "TensorBoard", "MLflow UI"}, lines
        base, page = urls["MLflow UI"].split("/#/")
        assert page == "experiments/1/runs?workflowType=machine_learning"  # the sweep's runs, Model training view
        query = json.dumps({"experiment_ids": ["1"], "max_results": 100}).encode()
        request = urllib.request.Request(
            f"{base}/api/2.0/mlflow/runs/search", query, {"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=30) as answer:
            runs = json.loads(answer.read())["runs"]
        assert len(runs) == result.n_trials + 1  # the search's trials and the summary
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
