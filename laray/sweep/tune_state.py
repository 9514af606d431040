"""Tune's experiment state, kept whole across a driver killed while Tune copies it.

Tune saves its experiment state (trial statuses, the searcher, its own callbacks) into a staging folder on
the driver, then copies that folder into STORAGE/NAME in a background thread, file by file, in place. A
driver killed meanwhile (SIGKILL, the OOM killer, a lost node) leaves a torn file there, and Tuner.restore
then fails on it: the sweep could not be resumed. So after each of Tune's saves, `KeepTuneState` keeps
one whole copy of those files in one file replaced atomically (KEPT_FILE); before a resume,
`repair_tune_state` sets aside every state file that does not parse and takes it from that copy.

Tune's restore also copies every .json and .pkl of STORAGE/NAME into the staging folder, laray's own too
(asha.json, budget.json...), and each later save copies them back over the ones laray keeps writing
there: stale, and torn by a kill mid-copy. `KeepTuneState` takes laray's files out of the staging folder
before Tune's first save, so only Tune's own files make that trip.
"""

from __future__ import annotations

import fnmatch
import io
import json
import logging
import pickletools
import zipfile
from pathlib import Path

from ray.tune import Callback

from laray.checkpoint import write_atomic
from laray.errors import SweepError

log = logging.getLogger("laray.sweep.tune_state")

# The files of Tune's experiment state (ray.tune: TuneController, SearchGenerator, Searcher, CallbackList,
# BasicVariantGenerator, Tuner): Tuner.restore reads them all. The middle part of most is the driver's session.
TUNE_STATE = (
    "experiment_state-*.json",
    "search_gen_state-*.json",
    "basic-variant-state-*.json",
    "searcher-state-*.pkl",
    "callback-states-*.pkl",
    "tuner.pkl",
)
KEPT_FILE = "tune-state.zip"  # neither .json nor .pkl: Tune's restore leaves it where it is
TORN_SUFFIX = ".torn"


def is_tune_state(name: str) -> bool:
    return any(fnmatch.fnmatch(name, pattern) for pattern in TUNE_STATE)


def is_whole(data: bytes) -> bool:
    """Whether a state file's bytes are a whole pickle or JSON document (Tune pickles some of its .json files,
    so the first byte tells: a pickle of protocol 2 or later starts with 0x80, JSON never). A torn copy is a
    prefix: a pickle misses its STOP opcode (read without running it: no class is imported); JSON its
    closing bracket."""
    try:
        if not data[:1] == b"\x80":
            json.loads(data)
        else:
            ops = list(pickletools.genops(io.BytesIO(data)))
            if not ops or ops[-1][0].name != "STOP" or ops[-1][2] + 1 != len(data):
                return False
    except Exception:  # noqa: BLE001 - any parse failure means torn (json and pickletools raise several kinds)
        return False
    return True


def _session(name: str) -> str:
    """experiment_state-2026-12-07_06-36-40.json -> 2026-12-07_06-36-40; tuner.pkl -> tuner.pkl."""
    for pattern in TUNE_STATE:
        if "*" in pattern and fnmatch.fnmatch(name, pattern):
            head, tail = pattern.split("*")
            return name[len(head) : len(name) - len(tail)]
    return name


class KeepTuneState(Callback):
    """After each of Tune's saves (it writes the staging folder on this thread, just before on_step_end, and
    its last one before on_experiment_end), one whole copy of its state files in EXPERIMENT/KEPT_FILE;
    laray's own files out of the staging folder."""

    def __init__(self, experiment: str):
        self.experiment = experiment
        self._kept: tuple | None = None  # the staging files' (name, mtime, size) when last kept
        self._cleared: set[str] = set()  # staging folders already rid of laray's files

    def on_step_begin(self, iteration: int, trials: list, **info) -> None:
        staging = _staging(trials)
        if staging is None or str(staging) in self._cleared:
            return
        self._cleared.add(str(staging))
        for path in staging.iterdir():
            if path.is_file() and path.suffix in (".json", ".pkl") and not is_tune_state(path.name):
                path.unlink()  # a copy Tune's restore made: laray writes the one in STORAGE/NAME itself

    def on_step_end(self, iteration: int, trials: list, **info) -> None:
        self._keep(trials)

    def on_experiment_end(self, trials: list, **info) -> None:  # after Tune's last save, which no step follows
        self._keep(trials)

    def _keep(self, trials: list) -> None:
        staging = _staging(trials)
        if staging is None:
            return
        files = sorted(p for p in staging.iterdir() if p.is_file() and is_tune_state(p.name))
        stats = [p.stat() for p in files]
        stamp = tuple((p.name, st.st_mtime_ns, st.st_size) for p, st in zip(files, stats))
        if not files or stamp == self._kept:
            return
        packed = io.BytesIO()
        with zipfile.ZipFile(packed, "w", zipfile.ZIP_DEFLATED) as archive:
            for path in files:
                archive.writestr(path.name, path.read_bytes())
        write_atomic(Path(self.experiment) / KEPT_FILE, lambda file: file.write(packed.getvalue()))
        self._kept = stamp


def _staging(trials: list) -> Path | None:
    folder = Path(trials[0].local_experiment_path) if trials else None
    return folder if folder is not None and folder.is_dir() else None


def repair_tune_state(experiment: str | Path) -> list[str]:
    """Before a resume: set aside (NAME.torn) each of Tune's state files in `experiment` that does not parse,
    and take from the kept copy every state file of a session that had a torn one, and any that is missing.
    Returns the names taken from the kept copy. Raises SweepError when no whole experiment state is left."""
    experiment = Path(experiment)
    torn = []
    for path in sorted(experiment.iterdir()):
        if path.is_file() and is_tune_state(path.name) and not is_whole(path.read_bytes()):
            path.replace(path.with_name(path.name + TORN_SUFFIX))
            torn.append(path.name)
    taken = []
    kept = experiment / KEPT_FILE
    if kept.exists():
        torn_sessions = {_session(name) for name in torn}
        with zipfile.ZipFile(kept) as archive:
            for name in archive.namelist():
                target = experiment / name
                if _session(name) in torn_sessions or not target.exists():
                    data = archive.read(name)
                    write_atomic(target, lambda file, data=data: file.write(data))
                    taken.append(name)
    if torn:
        log.warning(
            "%s: Tune's %s torn by a driver killed while copying %s; taken from the copy laray kept: %s",
            experiment,
            ", ".join(torn),
            "it" if len(torn) == 1 else "them",
            ", ".join(taken) or "none",
        )
    if torn and not any(fnmatch.fnmatch(p.name, TUNE_STATE[0]) for p in experiment.iterdir()):
        raise SweepError(
            f"{experiment}: Tune's experiment state {', '.join(torn)} was torn by a driver killed while "
            f"copying it, and no whole copy was kept (sweeps begun before laray kept one): it cannot be resumed; "
            f"start a new sweep with --warm-start {experiment} to build on its finished trials"
        )
    return taken
