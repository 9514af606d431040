"""A whole `laray sweep` process stopped by SIGTERM or Ctrl-C, then continued with the command it printed.

What a SLURM time limit, a preemption, `scancel` or `timeout` does to a sweep. The drivers join the
tests' Ray instance (`--address`), as a sweep on a cluster does. The default suite stops one sweep in
the middle of a trial; `pytest -m slow` stops one at each moment (stage 1, mid-trial by Ctrl-C, while
a checkpoint is written, during the confirmation) and checks that each ends with the same answer as
the same sweep left alone.
"""

import json
import os
import shlex
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml
from conftest import write_digit_folder

NOISE = (
    "Traceback",
    "SIGTERM received",
    "\x1b[",
    "Stop signal received",
    "performance bottleneck",
    "Trials did not complete",
)
N = 120


def sweep_space(la_epochs: int, confirm: bool, grace_period: int = 1) -> dict:
    search = {
        "temperature": {"loguniform": [0.05, 0.5]},
        "mixing_rate": {"uniform": [0.3, 0.9]},
        "k_neighbours": {"int": [5, 50]},
        "clustering_repeats": {"int": [1, 3]},
        "n_centroids": {"fraction": [0.05, 0.2]},
    }
    return {
        "num_samples": 3,
        "max_concurrent": 1,
        "grace_period": grace_period,
        "confirm_top": 1 if confirm else 0,
        "confirm_seeds": 1 if confirm else 0,
        "fixed": {
            "autoencoder": {"arch": "vgg11_bn", "width": 0.125, "image_size": 32, "epochs": 2, "batch_size": 32},
            "la": {"epochs": la_epochs, "batch_size": 32},
        },
        "search": search,
    }


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    return write_digit_folder(tmp_path_factory.mktemp("digits"), N)


class Driver:
    """`laray sweep` in its own process, joined to the tests' Ray instance; its console in a file."""

    def __init__(self, ray_session, tmp_path: Path, argv: list[str], label: str):
        self.log = tmp_path / f"{label}.log"
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        with open(self.log, "w") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "laray.cli.main", *argv],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=tmp_path,
            )

    def console(self) -> str:
        return self.log.read_text()

    def wait_until(self, condition, what: str, timeout: float = 600):  # a deadline for a loaded machine
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if condition():
                return
            if self.proc.poll() is not None:
                pytest.fail(f"the driver exited ({self.proc.returncode}) before {what}:\n{self.console()[-3000:]}")
            time.sleep(0.01)
        pytest.fail(f"not {what} within {timeout} s:\n{self.console()[-3000:]}")

    def stop(self, signum: int) -> tuple[int, float]:
        """(exit status, seconds from the signal to the exit)."""
        began = time.monotonic()
        self.proc.send_signal(signum)
        try:
            rc = self.proc.wait(timeout=120)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
        return rc, time.monotonic() - began

    def finish(self) -> int:
        try:
            return self.proc.wait(timeout=600)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()


def sweep_argv(ray_session, space: Path, digits: Path, storage: Path, name: str) -> list[str]:
    return [
        "sweep",
        "--address",
        ray_session.get_runtime_context().gcs_address,
        "--space",
        str(space),
        "--data",
        str(digits),
        "--storage",
        str(storage),
        "--name",
        name,
        "--seed",
        "0",
    ]


def reported_epochs(trial: Path) -> int:
    path = trial / "progress.csv"
    try:
        return len(pd.read_csv(path)) if path.exists() and path.read_text().strip() else 0
    except (pd.errors.EmptyDataError, pd.errors.ParserError):  # being written
        return 0


def trial_folders(folder: Path) -> list[Path]:
    return sorted((p for p in folder.glob("*_trial_*") if p.is_dir()), key=lambda p: p.stat().st_ctime)


def resume_command(console: str) -> list[str]:
    """The command the stopped driver printed, as argv for `python -m laray.cli.main`."""
    line = console.strip().splitlines()[-1]
    assert line.count("\n") == 0 and "; continue it with: laray sweep " in line, console[-3000:]
    argv = shlex.split(line.split("; continue it with: ", 1)[1])
    assert argv[0] == "laray" and "--resume" in argv
    return argv[1:]


def assert_clean_stop(console: str, signum: int) -> None:
    name = signal.Signals(signum).name
    lines = [line for line in console.splitlines() if line.startswith("laray: ")]
    assert lines == [
        f"laray: stopped by {name}; the sweep's state is saved; continue it with: "
        + lines[-1].split("continue it with: ", 1)[1]
    ], console[-3000:]  # one line, the last
    for noise in NOISE:
        assert noise not in console, (noise, console[-3000:])


def study_states(experiment: Path, name: str) -> list[str]:
    with sqlite3.connect(f"file:{experiment / 'optuna.db'}?mode=ro", uri=True) as db:
        studies = [row[0] for row in db.execute("SELECT study_name FROM studies")]
        assert studies == [name]  # one study, resumed, not a second one
        return [row[0] for row in db.execute("SELECT state FROM trials")]


def answer(experiment: Path) -> dict:
    """What a sweep concluded: the search's trials (settings and final score) and the confirmed winner."""
    best = json.loads((experiment / "best.json").read_text())
    trials = sorted(
        (
            json.dumps(json.loads((t / "params.json").read_text()), sort_keys=True),
            round(float(pd.read_csv(t / "progress.csv")["purity"].iloc[-1]), 6),
        )
        for t in trial_folders(experiment)
    )
    winner = best["confirmed"][0] if best["confirmed"] else None
    top = round(best["best_metrics"]["purity"], 6)
    return {
        "trials": trials,
        # the best score, and the best trial among those with it: two trials tied at the best score (it happened,
        # on 120 images) may come first either way from a restored experiment
        "best": (top, json.dumps(best["best_config"], sort_keys=True) in [c for c, score in trials if score == top]),
        "winner": winner and (winner["config"], round(winner["purity_mean"], 6)),
    }


def stop_and_resume(ray_session, tmp_path, digits, raw: dict, moment, signum: int):
    """Start a sweep, send `signum` when moment(experiment) holds, check the stop, run the printed command."""
    space, storage, name = tmp_path / "space.yaml", tmp_path / "results", "stopped"
    space.write_text(yaml.safe_dump(raw))
    experiment = storage / name
    driver = Driver(ray_session, tmp_path, sweep_argv(ray_session, space, digits, storage, name), "stopped")
    driver.wait_until(lambda: moment(experiment), "the moment to stop it")
    rc, seconds = driver.stop(signum)
    console = driver.console()
    assert rc == 128 + signum, console[-3000:]
    assert seconds < 60, seconds  # SLURM's default KillWait is 30 s; it took a few seconds here
    assert_clean_stop(console, signum)
    assert (experiment / "driver.lock").read_text() == ""  # released
    assert not (experiment / "best.json").exists()  # not finished: a requeued job resumes it
    return experiment, name, resume_command(console)


def resume(ray_session, tmp_path, argv: list[str], experiment: Path, name: str, confirm: bool) -> str:
    driver = Driver(ray_session, tmp_path, argv, "resumed")
    rc = driver.finish()
    console = driver.console()
    assert rc == 0, console[-3000:]
    for noise in NOISE:
        assert noise not in console, (noise, console[-3000:])
    best = json.loads((experiment / "best.json").read_text())
    assert best["n_trials"] == 3 and best["n_errored"] == 0
    assert study_states(experiment, name).count("COMPLETE") == 3 and "RUNNING" not in study_states(experiment, name)
    assert bool(best["confirmed"]) == confirm
    return console


def mid_trial(epochs: int):
    """The second trial has reported `epochs` epochs (the first has finished)."""

    def moment(experiment: Path) -> bool:
        trials = trial_folders(experiment)
        return len(trials) >= 2 and reported_epochs(trials[1]) >= epochs

    return moment


def test_sigterm_mid_trial_stops_in_one_line_and_the_printed_command_finishes_the_sweep(ray_session, digits, tmp_path):
    """The reported fault: stack dumps on SIGTERM, and a resume printing Tune's checkpoint-manager traceback.

    That traceback came from a checkpoint folder that the killed driver's bookkeeping still listed:
    removed here before the resume (the oldest of the stopped trial's two), so that the resumed trial's
    next checkpoint makes Tune delete it again.
    """
    raw = sweep_space(4, confirm=False, grace_period=4)  # no trial stopped early: the second one reaches epoch 2
    experiment, name, argv = stop_and_resume(ray_session, tmp_path, digits, raw, mid_trial(2), signal.SIGTERM)
    finished, stopped = trial_folders(experiment)[:2]
    finished_progress = (finished / "progress.csv").read_text()
    checkpoints = sorted(stopped.glob("checkpoint_*"))
    assert len(checkpoints) >= 2, checkpoints
    for path in checkpoints[0].iterdir():
        path.unlink()
    checkpoints[0].rmdir()
    resume(ray_session, tmp_path, argv, experiment, name, confirm=False)
    epochs = pd.read_csv(stopped / "progress.csv")["epoch"].tolist()
    assert epochs == [1, 2, 3, 4]  # continued from its checkpoint, each epoch reported once
    assert (finished / "progress.csv").read_text() == finished_progress  # the finished trial was not run again
    assert [len(log.read_text().splitlines()) for log in experiment.glob("autoencoders/*/trainings.log")] == [1]


# --------------------------------------------------------------------------------------------------
# Every moment, each against the same sweep left alone (pytest -m slow)


@pytest.fixture(scope="module")
def undisturbed(ray_session, digits, tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("undisturbed")
    space, storage = tmp_path / "space.yaml", tmp_path / "results"
    space.write_text(yaml.safe_dump(sweep_space(4, confirm=True)))
    driver = Driver(ray_session, tmp_path, sweep_argv(ray_session, space, digits, storage, "alone"), "alone")
    assert driver.finish() == 0, driver.console()[-3000:]
    return answer(storage / "alone")


def in_stage1(experiment: Path) -> bool:
    """Stage 1's task has begun training (the store's lock is there, no auto-encoder yet)."""
    return any(experiment.glob("autoencoders/*/lock")) and not any(experiment.glob("autoencoders/*/autoencoder.pt"))


def writing_checkpoint(experiment: Path) -> bool:
    """A trial's second checkpoint folder has just appeared: Tune is writing or registering it."""
    return any(experiment.glob("*_trial_*/checkpoint_000001"))


def in_confirmation(experiment: Path) -> bool:
    return any(reported_epochs(t) >= 1 for t in trial_folders(experiment / "confirm"))


@pytest.mark.slow
@pytest.mark.parametrize(
    "moment, signum",
    [
        (in_stage1, signal.SIGTERM),
        (mid_trial(1), signal.SIGINT),
        (writing_checkpoint, signal.SIGTERM),
        (in_confirmation, signal.SIGTERM),
    ],
    ids=["stage 1", "mid-trial, Ctrl-C", "writing a checkpoint", "confirmation"],
)
def test_a_sweep_stopped_at_any_moment_resumes_to_the_same_answer(
    ray_session, digits, tmp_path, undisturbed, moment, signum
):
    experiment, name, argv = stop_and_resume(
        ray_session, tmp_path, digits, sweep_space(4, confirm=True), moment, signum
    )
    resume(ray_session, tmp_path, argv, experiment, name, confirm=True)
    assert answer(experiment) == undisturbed  # seeded, one trial at a time: the same trials, scores and winner
