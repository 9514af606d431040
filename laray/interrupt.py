"""SIGTERM is Ctrl-C: a stop signal ends a command cleanly, with one line and the shell's exit status.

SLURM (at a time limit, with `--signal`, or on preemption), `scancel`, `timeout`, Kubernetes and
cloud spot reclaims all stop a job with SIGTERM. Python's default for it is to die on the spot,
and Ray's C++ failure-signal handler prints a stack dump first. Under `handling_stop_signals()`
SIGINT and SIGTERM both raise `StopRequested` in the main thread, or, while Ray Tune's `fit` runs
(`tune_fit_stops_on_signal()`), ask Tune to stop: Tune then saves its experiment state one last
time, with every running trial's last reported checkpoint, and `fit` returns; the caller checks
`requested()` and raises `StopRequested` itself. The CLI turns it into one line and exit status
128 + the signal number (130 for SIGINT, 143 for SIGTERM), as a shell reports a killed command.
A second signal stops at once, unless it comes within ECHO_S of the first: `scancel` signals
every process of a job, and slurm/laray.sbatch forwards its own SIGTERM too.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from contextlib import contextmanager

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
TUNE_SIGINT = "TUNE_DISABLE_SIGINT_HANDLER"


class StopRequested(KeyboardInterrupt):
    """A stop signal arrived. A KeyboardInterrupt, so that libraries treat it as they treat Ctrl-C."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum

    @property
    def exit_status(self) -> int:
        return 128 + self.signum


_received: int | None = None  # the first stop signal's number
_received_at = 0.0  # and when it came (time.monotonic)
ECHO_S = 2.0  # a second signal this soon after the first is the same stop, not an "at once"
_tune_fit_running = False
_handling = False  # inside handling_stop_signals()


def requested() -> int | None:
    """The number of the stop signal received under handling_stop_signals(), else None."""
    return _received


def raise_if_requested() -> None:
    """Inside handling_stop_signals(), once a stop signal came: raise. Outside, never (a library's caller decides)."""
    if _handling and _received is not None:
        raise StopRequested(_received)


def _on_signal(signum: int, frame) -> None:
    global _received, _received_at
    first = _received is None
    if not first and time.monotonic() - _received_at < ECHO_S:
        return  # the same stop sent twice (scancel signals every process and the batch script forwards it)
    if first:
        _received, _received_at = signum, time.monotonic()
    if first and _tune_fit_running:
        # Tune's own stop: its SIGUSR1 handler, installed by every fit (ray.tune.tune._setup_signal_catching),
        # sets the event that ends fit's loop after a last save of the experiment state.
        tune_stop = signal.getsignal(signal.SIGUSR1)
        if callable(tune_stop):
            tune_stop(signal.SIGUSR1, frame)
            return
    raise StopRequested(_received)


@contextmanager
def handling_stop_signals():
    """SIGINT and SIGTERM stop the body cleanly (see the module's docstring); the handlers before are restored."""
    global _received, _handling
    if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
        yield
        return
    env_before = os.environ.get(TUNE_SIGINT)
    os.environ[TUNE_SIGINT] = "1"  # Tune would take SIGINT over; SIGTERM it leaves alone
    before = {s: signal.getsignal(s) for s in STOP_SIGNALS}
    _received, _handling = None, True
    take_signals_back()
    try:
        yield
    finally:
        _handling = False
        for s, handler in before.items():
            signal.signal(s, handler)
        if env_before is None:
            del os.environ[TUNE_SIGINT]
        else:
            os.environ[TUNE_SIGINT] = env_before


def take_signals_back() -> None:
    """Inside handling_stop_signals(): the handlers again, after ray.init set its own (SIGTERM: sys.exit)."""
    if _handling and threading.current_thread() is threading.main_thread():
        for s in STOP_SIGNALS:
            signal.signal(s, _on_signal)


@contextmanager
def tune_fit_stops_on_signal():
    """Around Tuner.fit(): a stop signal asks Tune to stop instead of raising; raised after fit returns."""
    global _tune_fit_running
    raise_if_requested()
    if threading.current_thread() is not threading.main_thread():  # a library caller's thread: no signals here
        yield
        return
    # Until this fit installs its handler, a signal raises: the handler an earlier fit left would stop nothing.
    before = signal.signal(signal.SIGUSR1, signal.SIG_DFL)
    _tune_fit_running = True
    try:
        yield
    finally:
        _tune_fit_running = False
        signal.signal(signal.SIGUSR1, before)
    raise_if_requested()
