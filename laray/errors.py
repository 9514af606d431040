"""Failures laray expects (bad files, full disks, a sweep already running): one line for the user, no traceback.

The CLI prints `laray: error: <first line>` for any LarayError and exits 1; `--debug` shows the traceback.
"""
from __future__ import annotations

import errno
from contextlib import contextmanager
from pathlib import Path


class LarayError(Exception):
    """An expected failure whose message says what went wrong and what to do."""


class DiskFullError(LarayError):
    """A write hit ENOSPC; the message names the folder. Writes are atomic, so earlier files are intact."""


@contextmanager
def naming_full_disk(folder: str | Path, what: str):
    """Turn ENOSPC inside the body into a DiskFullError naming `folder` and what was being written."""
    try:
        yield
    except OSError as exc:
        if exc.errno != errno.ENOSPC:
            raise
        raise DiskFullError(f"no space left on the device of {folder} while writing {what}; "
                            "free some space there and run the same command again (earlier files are intact)") from exc
