"""One driver per sweep (laray.sweep.lock): refused while held, taken over from the dead, heartbeats."""

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import pytest

from laray.sweep.lock import LOCK_NAME, SweepLock, SweepRunningError

HOLDER = textwrap.dedent("""
    import sys, time
    from laray.sweep.lock import SweepLock
    with SweepLock(sys.argv[1], heartbeat_s=0.1):
        print("held", flush=True)
        time.sleep(60)
""")


def _record(folder):
    return json.loads((folder / LOCK_NAME).read_text())


@pytest.fixture
def holder(tmp_path):
    """A live process on this host holding tmp_path/sweep's lock."""
    folder = tmp_path / "sweep"
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(folder)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    yield folder, proc
    proc.kill()
    proc.wait()


def test_a_second_driver_is_refused_naming_the_holder(holder):
    folder, proc = holder
    with pytest.raises(SweepRunningError) as refused:
        with SweepLock(folder):
            pytest.fail("entered a lock that another driver holds")
    message = str(refused.value)
    assert f"pid {proc.pid} on {socket.gethostname()}" in message and str(folder) in message
    assert "\n" not in message
    assert _record(folder)["pid"] == proc.pid  # the refused driver changed nothing


def test_the_lock_of_a_killed_driver_is_taken_over_with_a_warning(holder, caplog):
    folder, proc = holder
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    with caplog.at_level(logging.WARNING, logger="laray.sweep.driver"):
        with SweepLock(folder):
            assert _record(folder)["pid"] == os.getpid()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and f"pid {proc.pid}" in warnings[0] and "gone" in warnings[0]


def test_a_driver_on_another_host_is_refused_while_it_beats_and_taken_over_when_it_stops(tmp_path, caplog):
    folder = tmp_path / "sweep"
    folder.mkdir()
    other = {"host": "gpu-node-7", "pid": 4242, "started": time.time() - 600}
    (folder / LOCK_NAME).write_text(json.dumps({**other, "heartbeat": time.time() - 5}))
    with pytest.raises(SweepRunningError, match="pid 4242 on gpu-node-7.*heartbeat 5 s ago"):
        with SweepLock(folder, stale_s=60):
            pass
    (folder / LOCK_NAME).write_text(json.dumps({**other, "heartbeat": time.time() - 120}))
    with caplog.at_level(logging.WARNING, logger="laray.sweep.driver"):
        with SweepLock(folder, stale_s=60):
            assert _record(folder)["host"] == socket.gethostname()
    assert any("gpu-node-7" in r.getMessage() and "no heartbeat for 120 s" in r.getMessage() for r in caplog.records)


def test_the_holder_beats_and_releasing_frees_the_lock(tmp_path):
    folder = tmp_path / "sweep"
    with SweepLock(folder, heartbeat_s=0.05):
        first = _record(folder)["heartbeat"]
        time.sleep(0.3)
        assert _record(folder)["heartbeat"] > first
    assert (folder / LOCK_NAME).read_text() == ""  # empty: free
    with SweepLock(folder):  # and free it is, without a warning
        pass


def test_an_unreadable_lock_file_is_taken_over(tmp_path, caplog):
    folder = tmp_path / "sweep"
    folder.mkdir()
    (folder / LOCK_NAME).write_text("{not json")
    with caplog.at_level(logging.WARNING, logger="laray.sweep.driver"):
        with SweepLock(folder):
            assert _record(folder)["pid"] == os.getpid()
    assert any("taking over" in r.getMessage() for r in caplog.records)
