"""One driver per sweep: a lock file in STORAGE/NAME that names its holder and carries a heartbeat.

Two guards, because a sweep's folder may sit on a node's own disk or on storage that several
nodes share:
- an flock on the file, which the kernel drops when its holder dies, so a second driver on the
  same host is refused and a dead one's lock is taken over at once;
- the holder's host, pid and a heartbeat (rewritten every HEARTBEAT_S seconds) in the file, for
  drivers on other hosts, which flock on a shared file system cannot be trusted to see: a lock
  whose heartbeat is older than STALE_S is taken over, with a warning.
Releasing empties the file; an empty file is a free lock.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import threading
import time
from pathlib import Path

from laray.errors import LarayError

LOCK_NAME = "driver.lock"
HEARTBEAT_S = 10.0
STALE_S = 60.0  # six missed heartbeats: the holder's node is gone (or its clock is far off)
log = logging.getLogger("laray.sweep.driver")


class SweepRunningError(LarayError):
    """Another driver holds the sweep's lock."""


def _describe(holder: dict) -> str:
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("started", 0)))
    return f"pid {holder.get('pid')} on {holder.get('host')}, started {started}"


class SweepLock:
    """Hold STORAGE/NAME's driver lock for the body of a `with`; refuses with SweepRunningError when held."""

    def __init__(self, folder: str | Path, heartbeat_s: float = HEARTBEAT_S, stale_s: float = STALE_S):
        self.path = Path(folder) / LOCK_NAME
        self.heartbeat_s, self.stale_s = heartbeat_s, stale_s
        self._fd: int | None = None
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None
        self._me = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time()}

    def _running(self, holder: dict, detail: str = "") -> SweepRunningError:
        return SweepRunningError(
            f"the sweep in {self.path.parent} is running: its driver is {_describe(holder)}"
            f"{detail}; wait for it to end, or choose another --name"
        )

    def _read(self) -> dict | None:
        text = self.path.read_text() if self.path.exists() else ""
        try:
            return json.loads(text) if text.strip() else None
        except ValueError:  # caught mid-rewrite, or garbage: treat as a holder that never beat
            return {"host": "?", "pid": -1, "started": 0, "heartbeat": 0}

    def _write(self) -> None:
        record = json.dumps({**self._me, "heartbeat": time.time()}).encode()
        os.ftruncate(self._fd, 0)  # in place: a rename would leave the flock on the old file
        os.pwrite(self._fd, record, 0)
        os.fsync(self._fd)  # other nodes read it through the shared file system

    def __enter__(self) -> "SweepLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise self._running(self._read() or {}) from None
        holder = self._read()
        if holder is not None:
            age = time.time() - holder.get("heartbeat", 0)
            elsewhere = holder.get("host") != self._me["host"]
            if elsewhere and age < self.stale_s:
                fcntl.flock(fd, fcntl.LOCK_UN)
                os.close(fd)
                raise self._running(holder, f" (heartbeat {age:.0f} s ago)")
            why = f"no heartbeat for {age:.0f} s" if elsewhere else "its process is gone"
            log.warning("taking over the sweep lock %s left by %s: %s", self.path, _describe(holder), why)
        self._fd = fd
        self._write()
        self._beat = threading.Thread(target=self._beating, name="laray-sweep-lock", daemon=True)
        self._beat.start()
        return self

    def _beating(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            self._write()

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._beat.join()
        os.ftruncate(self._fd, 0)  # empty: free
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None
