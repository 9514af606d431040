"""Stop signals (laray.interrupt) and the quiet console's filters (laray.sweep.console.quiet_ray), in this process.

The sweeps that a signal stops and that resume are in tests/faults/test_stop_signals.py.
"""

import logging
import os
import signal
import time

import pytest

from laray import interrupt
from laray.interrupt import StopRequested, handling_stop_signals, take_signals_back, tune_fit_stops_on_signal


@pytest.mark.parametrize("signum, status", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_stop_signal_raises_stop_requested_and_the_handlers_come_back(signum, status):
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    with pytest.raises(StopRequested) as stopped:
        with handling_stop_signals():
            os.kill(os.getpid(), signum)
            time.sleep(5)  # the handler raises as soon as the signal arrives
            pytest.fail("the signal did not stop the body")
    assert stopped.value.signum == signum and stopped.value.exit_status == status
    assert isinstance(stopped.value, KeyboardInterrupt)  # what libraries treat as Ctrl-C
    assert {s: signal.getsignal(s) for s in before} == before
    assert interrupt.requested() == signum


def test_inside_a_tune_fit_the_signal_asks_tune_to_stop_and_raises_after_it():
    """Tune's fit installs a SIGUSR1 handler that ends its loop after a last save; the signal must reach it."""
    asked = []
    with handling_stop_signals():
        with pytest.raises(StopRequested) as stopped:
            with tune_fit_stops_on_signal():
                signal.signal(signal.SIGUSR1, lambda s, f: asked.append(s))  # what Tune's fit does first
                os.kill(os.getpid(), signal.SIGTERM)  # no exception here: fit goes on to save and return
                asked_during_fit = list(asked)
        assert asked_during_fit == [signal.SIGUSR1]
        assert stopped.value.signum == signal.SIGTERM


def test_a_second_signal_inside_a_fit_stops_at_once_unless_it_echoes_the_first(monkeypatch):
    monkeypatch.setattr(interrupt, "ECHO_S", 0.2)
    with handling_stop_signals():
        with pytest.raises(StopRequested):
            with tune_fit_stops_on_signal():
                signal.signal(signal.SIGUSR1, lambda s, f: None)
                os.kill(os.getpid(), signal.SIGTERM)
                os.kill(os.getpid(), signal.SIGTERM)  # scancel's and the batch script's: the same stop
                time.sleep(0.3)
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(5)
                pytest.fail("the second signal did not raise")


def test_a_signal_before_the_fit_installed_its_handler_raises():
    """A handler that an earlier fit left behind would stop nothing: the signal raises instead."""
    signal.signal(signal.SIGUSR1, lambda s, f: pytest.fail("an earlier fit's handler was called"))
    try:
        with handling_stop_signals():
            with pytest.raises(StopRequested):
                with tune_fit_stops_on_signal():
                    os.kill(os.getpid(), signal.SIGTERM)
    finally:
        signal.signal(signal.SIGUSR1, signal.SIG_DFL)


def test_a_stop_outside_handling_stop_signals_is_not_raised_by_a_later_fit():
    """The signal of an earlier command (or test) in this process must not stop a library call's fit."""
    with pytest.raises(StopRequested):
        with handling_stop_signals():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)
    assert interrupt.requested() == signal.SIGTERM  # the CLI reads it after the handlers are gone
    with tune_fit_stops_on_signal():
        pass  # no StopRequested


def test_handlers_are_taken_back_after_ray_init_set_its_own():
    with handling_stop_signals():
        signal.signal(signal.SIGTERM, lambda s, f: None)  # ray.init's: sys.exit(15)
        take_signals_back()
        with pytest.raises(StopRequested):
            os.kill(os.getpid(), signal.SIGTERM)


def test_cli_prints_one_line_with_the_command_that_continues(monkeypatch, capsys):
    from laray.cli import main as cli
    from laray.cli import train as train_command

    def stopped_train(args):
        args.on_stop = "continue with: laray train --resume"
        raise StopRequested(signal.SIGTERM)

    monkeypatch.setattr(train_command, "_train", stopped_train)
    assert cli.main(["train", "--out", "somewhere"]) == 143
    err = capsys.readouterr().err
    assert err == "laray: stopped by SIGTERM; continue with: laray train --resume\n"


@pytest.mark.parametrize(
    "argv, drop, add, expected",
    [
        (
            ["sweep", "--data", "my photos", "--name", "a", "--num-samples", "8"],
            {"--name": 1, "--num-samples": 1, "--resume": 0},
            ["--resume", "--name", "a"],
            "laray sweep --data 'my photos' --resume --name a",
        ),
        (
            ["sweep", "--name=a", "--resume", "--seed", "3"],
            {"--name": 1, "--num-samples": 1, "--resume": 0},
            ["--resume", "--name", "a"],
            "laray sweep --seed 3 --resume --name a",
        ),
        (["train", "--out", "o", "--resume"], None, ["--resume"], "laray train --out o --resume"),
        (
            ["sweep", "--warm-start", "a", "b", "--seed", "3"],
            {"--warm-start": -1, "--resume": 0},
            ["--resume"],
            "laray sweep --seed 3 --resume",
        ),
    ],
)
def test_command_again(argv, drop, add, expected):
    from laray.cli.options import command_again

    assert command_again(argv, drop, add) == expected


class Records(logging.Handler):
    """Every record that passes a logger's filters (Ray's own handlers may hold a stream pytest swapped)."""

    def __init__(self):
        super().__init__()
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def test_quiet_console_drops_rays_bottleneck_warnings_and_colours(monkeypatch):
    """A loaded machine made Tune warn three times per report; --verbose (no quiet_ray) keeps the warnings."""
    from ray.tune.utils import util

    from laray.sweep.console import quiet_ray

    monkeypatch.setattr(util, "START_OF_TIME", time.time() - 120)  # Tune warns only after its first minute
    loggers = [
        logging.getLogger(name) for name in ("ray.tune.utils.util", "ray.tune.tune", "ray.train._internal.syncer")
    ]
    kept_filters = [list(logger.filters) for logger in loggers]
    records = Records()
    for logger in loggers:  # as in a driver that never called quiet_ray (another test here may have)
        logger.filters[:] = [f for f in logger.filters if type(f).__name__ not in ("_Dropped", "_VanishedFile")]
        logger.addHandler(records)

    def slow_step():
        with util.warn_if_slow("process_trial_result", threshold=0.01):
            time.sleep(0.02)

    try:
        slow_step()
        assert any("may be a performance bottleneck" in m for m in records.messages)  # verbose: Ray's warning
        records.messages.clear()
        monkeypatch.delenv("RAY_COLOR_PREFIX", raising=False)
        quiet_ray()
        slow_step()
        loggers[1].warning("Stop signal received (e.g. via SIGINT/Ctrl+C), ending Ray Tune run.")
        loggers[2].warning(
            "Last sync command failed with the following error:\nTraceback (most recent call last):\n"
            "FileNotFoundError: [Errno 2] Failed to open local file '/tmp/ray/.../driver_artifacts/x'"
        )
        loggers[0].warning("something else")  # other warnings still show
        assert records.messages == ["something else"]
        assert os.environ["RAY_COLOR_PREFIX"] == "0"  # Ray's prefix of forwarded task lines without ANSI codes
    finally:
        for logger, filters in zip(loggers, kept_filters):
            logger.filters[:] = filters
            logger.removeHandler(records)


def test_cli_names_the_signal_when_a_library_turned_it_into_a_plain_keyboard_interrupt(monkeypatch, capsys):
    """Ray's get, interrupted by SIGTERM during stage 1, raised KeyboardInterrupt: still 143, for SLURM's requeue."""
    from laray.cli import main as cli
    from laray.cli import train as train_command

    def stage1_in_ray_get(args):
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)
        except StopRequested:
            raise KeyboardInterrupt from None

    monkeypatch.setattr(train_command, "_train", stage1_in_ray_get)
    assert cli.main(["train", "--out", "somewhere"]) == 143
    assert capsys.readouterr().err.startswith("laray: stopped by SIGTERM")
