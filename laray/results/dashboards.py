"""optuna-dashboard and TensorBoard (and the MLflow UI) on a sweep's folder, as child processes; and where the
sweep's Ray dashboard is.

`laray dashboard STORAGE/NAME` (laray.cli.dashboard) runs them, while the sweep runs or after:
optuna-dashboard on STORAGE/NAME/optuna.db, TensorBoard with STORAGE/NAME as its logdir (Ray
Tune writes each trial's event files into its folder, the confirmation's under confirm/), and the
MLflow UI on STORAGE/NAME/mlflow.db when the sweep has one (`laray sweep --track mlflow`,
laray.sweep.tracking). All listen on 127.0.0.1 only. The Ray dashboard belongs to the sweep's driver (`laray sweep
--dashboard`), which records where it is in STORAGE/NAME/RAY_DASHBOARD_FILE (laray.sweep.ray_setup).

The children run in a session of their own, so that a Ctrl-C in the terminal reaches laray
alone, which stops them in order (SIGTERM to each one's process group, SIGKILL after
STOP_WAIT_S); on Linux they also get SIGTERM if laray dies without stopping them
(PR_SET_PDEATHSIG). Their output goes to log files in a temporary folder, removed after: it is
shown only when one of them fails, as the last line of its log.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from laray.errors import LarayError

OPTUNA_DB = "optuna.db"  # the sweep's study, as laray.sweep.warm_start.OPTUNA_DB names it
RAY_DASHBOARD_FILE = "ray_dashboard.json"  # {"url", "token", "host", "pid"}: the driver's Ray dashboard
MLFLOW_DB = "mlflow.db"  # the sweep's MLflow runs, as laray.sweep.tracking.MLFLOW_DB names it
INSTALL = 'pip install "laray[dashboard]"'
INSTALL_TRACKING = 'pip install "laray[tracking]"'  # the MLflow UI
HOST = "127.0.0.1"
READY_S = 180.0  # TensorBoard takes 5-20 s to answer on a busy 2-core machine
STOP_WAIT_S = 10.0


TOKEN_COMMAND = "ray get-auth-token"  # prints the token a Ray dashboard asks for (Ray 2.60's token authentication)


def ray_login(token: bool) -> str:
    """How to log in to a Ray dashboard, for the console."""
    return f"log in with the token that `{TOKEN_COMMAND}` prints" if token else "no login: token authentication is off"


class DashboardError(LarayError):
    """A dashboard that cannot start: not a sweep's folder, a tool not installed, a port in use, a child that died."""


def sweep_folder(path: str) -> Path:
    """STORAGE/NAME, checked: a folder holding a sweep's study."""
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise DashboardError(f"{path}: no such folder; give a sweep's folder, STORAGE/NAME")
    if not (folder / OPTUNA_DB).is_file():
        raise DashboardError(
            f"{path}: not a sweep's folder (no {OPTUNA_DB}); give STORAGE/NAME, the folder `laray sweep` names"
        )
    return folder.resolve()


def tool(name: str, install: str = INSTALL) -> str:
    """The executable `name`: the one installed beside this Python (laray's environment, even when not activated),
    else the first on PATH; `install` says how to get it."""
    beside = Path(sys.executable).parent / name
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which(name)
    if found is None:
        raise DashboardError(f"{name} is not installed: {install}")
    return found


def free_port() -> int:
    """A port nothing listens on at HOST now (the kernel's choice)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def check_port(port: int, option: str) -> int:
    """`port` if it can be bound at HOST, else a one-line error naming the option."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((HOST, port))
        except OSError as exc:
            raise DashboardError(f"{option} {port}: cannot listen on {HOST}:{port} ({exc.strerror})") from None
    return port


def _answers(url: str, timeout: float = 2.0) -> bytes | None:
    """The body at `url`, or None when nothing (or an HTTP error) answers."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.read()
    except (urllib.error.URLError, OSError, ValueError):
        return None


def mlflow_runs_page(folder: Path) -> str:
    """The MLflow UI's page of the sweep's runs, after its address: its experiment (named like the sweep's folder,
    laray.sweep.tracking) in the Model training view (MLflow 3's UI opens on its GenAI view); "" when none is found."""
    import sqlite3

    try:
        with sqlite3.connect(f"file:{folder / MLFLOW_DB}?mode=ro", uri=True) as db:
            found = db.execute("SELECT experiment_id FROM experiments WHERE name = ?", (folder.name,)).fetchone()
    except sqlite3.Error:
        return ""
    return f"/#/experiments/{found[0]}/runs?workflowType=machine_learning" if found else ""


def ray_dashboard_of(folder: Path) -> dict | None:
    """The sweep's Ray dashboard, {"url", "token"}, when its driver runs here and the dashboard answers; else None."""
    try:
        record = json.loads((folder / RAY_DASHBOARD_FILE).read_text())
        url, pid = str(record["url"]), int(record["pid"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if record.get("host") != socket.gethostname() or not _alive(pid):  # an earlier driver's, or another host's
        return None
    answer = _answers(f"{url}/api/authentication_mode")  # open to all, and says whether a token is needed
    if answer is None:
        return None
    try:
        token = json.loads(answer).get("authentication_mode") == "token"
    except ValueError:
        token = bool(record.get("token"))
    return {"url": url, "token": token}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def _die_with_parent() -> None:  # pragma: no cover - runs in the child, between fork and exec
    """Linux: the child gets SIGTERM when laray dies without stopping it (a SIGKILL, say)."""
    try:
        import ctypes

        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


@dataclass
class Child:
    name: str  # as the user knows it: "optuna-dashboard", "TensorBoard", "MLflow UI"
    argv: list[str]
    url: str
    log: Path
    process: subprocess.Popen | None = None

    def last_line(self) -> str:
        try:
            lines = [line.strip() for line in self.log.read_text(errors="replace").splitlines() if line.strip()]
        except OSError:
            return ""
        return lines[-1] if lines else ""


@dataclass
class Dashboards:
    """optuna-dashboard and TensorBoard on `folder`, and the MLflow UI when `mlflow_port` is given (the folder has
    MLFLOW_DB), started by `with`, stopped when it ends, however it ends."""

    folder: Path
    optuna_port: int
    tensorboard_port: int
    mlflow_port: int | None = None
    children: list[Child] = field(default_factory=list)

    def __enter__(self) -> "Dashboards":
        optuna_dashboard, tensorboard = tool("optuna-dashboard"), tool("tensorboard")  # all found, or none started
        mlflow = None if self.mlflow_port is None else tool("mlflow", INSTALL_TRACKING)
        self._logs = tempfile.mkdtemp(prefix="laray-dashboard-")
        optuna_url, tensorboard_url = f"http://{HOST}:{self.optuna_port}", f"http://{HOST}:{self.tensorboard_port}"
        storage = f"sqlite:///{self.folder / OPTUNA_DB}"
        self.children = [
            Child(
                "optuna-dashboard",
                [optuna_dashboard, storage, "--host", HOST, "--port", str(self.optuna_port)],
                optuna_url,
                Path(self._logs) / "optuna-dashboard.log",
            ),
            Child(
                "TensorBoard",
                [
                    tensorboard,
                    "--logdir",
                    str(self.folder),
                    "--host",
                    HOST,
                    "--port",
                    str(self.tensorboard_port),
                ],
                tensorboard_url,
                Path(self._logs) / "tensorboard.log",
            ),
        ]
        if mlflow is not None:
            self.children.append(
                Child(
                    "MLflow UI",
                    # the runs only: the sweep logs no artifacts (laray.sweep.tracking), and nothing is written
                    [mlflow, "ui", "--backend-store-uri", f"sqlite:///{self.folder / MLFLOW_DB}"]
                    + ["--host", HOST, "--port", str(self.mlflow_port), "--workers", "1"],
                    f"http://{HOST}:{self.mlflow_port}",
                    Path(self._logs) / "mlflow.log",
                )
            )
        try:
            for child in self.children:
                with open(child.log, "wb") as log:
                    child.process = subprocess.Popen(
                        child.argv,
                        stdin=subprocess.DEVNULL,
                        stdout=log,
                        stderr=subprocess.STDOUT,
                        start_new_session=True,  # a terminal's Ctrl-C reaches laray only, which stops them in order
                        preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
                    )
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def wait_ready(self, child: Child, timeout: float = READY_S) -> None:
        """Until `child` answers over HTTP; a DashboardError with its last log line if it exits or stays silent."""
        deadline = time.monotonic() + timeout
        while _answers(child.url) is None:
            self.check(child)
            if time.monotonic() > deadline:
                raise DashboardError(f"{child.name} did not answer at {child.url} within {timeout:.0f} s")
            time.sleep(0.25)

    def check(self, child: Child) -> None:
        """A DashboardError, with its last log line, when `child` has exited."""
        code = child.process.poll() if child.process else None
        if code is not None:
            said = child.last_line()
            raise DashboardError(f"{child.name} exited with status {code}" + (f": {said}" if said else ""))

    def stop(self) -> None:
        """SIGTERM to each child's process group (TensorBoard's data server with it), SIGKILL after STOP_WAIT_S."""
        running = [c.process for c in self.children if c.process is not None and c.process.poll() is None]
        for process in running:
            _signal_group(process, signal.SIGTERM)
        deadline = time.monotonic() + STOP_WAIT_S
        for process in running:
            try:
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _signal_group(process, signal.SIGKILL)
                process.wait()
        for process in running:  # what the child left in its group (a data server): gone with it
            _signal_group(process, signal.SIGKILL)
        shutil.rmtree(getattr(self, "_logs", ""), ignore_errors=True)


def _signal_group(process: subprocess.Popen, signum: int) -> None:
    try:
        os.killpg(process.pid, signum)  # its own session: the group's id is its pid
    except (ProcessLookupError, PermissionError):
        pass
