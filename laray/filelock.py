"""An exclusive lock on a file: one process at a time does the work the lock guards, the others wait."""

from __future__ import annotations

import fcntl
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def exclusive(lock_path: str | Path):
    """Hold an exclusive flock on lock_path (created if absent) for the body; blocks while another holds it.

    The kernel drops the lock when its holder dies, so a killed process never leaves a stale lock.
    """
    with open(lock_path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
