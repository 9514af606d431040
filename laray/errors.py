"""Failures laray expects (bad files, full disks, a sweep already running): one line for the user, no traceback.

Every failure a user can cause or meet is a LarayError subclass here. The CLI prints `laray: error:
<first line>` for those and for OSError from the file system, and exits 1; one raised inside a Ray task
comes as one line naming its cause. Anything else is a bug and shows its traceback; `--debug` shows it
for all.
"""

from __future__ import annotations

import errno
from contextlib import contextmanager
from pathlib import Path


class LarayError(Exception):
    """An expected failure whose message says what went wrong and what to do."""


# ValueError as well, for callers that caught these as ValueError before they were LarayErrors.
class ConfigError(LarayError, ValueError):
    """A setting out of range or unknown; the message names the field."""


class SpaceError(ConfigError):
    """A malformed search space; the message names the key."""


class DataError(LarayError, ValueError):
    """A data set that cannot be used, with a one-line reason; `.skipped` lists any bad files, all of them."""

    def __init__(self, message: str, skipped: list[tuple[str, str]] | None = None):
        super().__init__(message)
        self.skipped = list(skipped or [])


class DecodeError(LarayError):
    """A file that is not a fully decodable image; the message says why in a few words."""


class CheckpointError(LarayError):
    """A checkpoint that cannot be used (unreadable, or of other settings); the message says what to do."""


class SweepError(LarayError):
    """A sweep that cannot start or resume as asked (none to resume, one already there, a changed count)."""


class BadEntry(LarayError):
    """A stored entry (decode cache, auto-encoder store) that fails verification: which file, what is wrong.

    Caught where it is found: the entry is removed, with one warning naming the file, and built again.
    """

    def __init__(self, path, problem: str):
        super().__init__(f"{path}: {problem}")


class DataWarning(UserWarning):
    """Files were skipped while loading a data set (the CLI shows it as one log line, not Python's two)."""


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
        raise DiskFullError(
            f"no space left on the device of {folder} while writing {what}; "
            "free some space there and run the same command again (earlier files are intact)"
        ) from exc
