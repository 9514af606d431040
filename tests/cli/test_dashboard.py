"""`laray dashboard STORAGE/NAME`: optuna-dashboard and TensorBoard on a sweep, and where its Ray dashboard is.

The default suite runs no real server: its failures (not a sweep's folder, a tool not installed, a
port in use, a child that dies at once, with the other one stopped) and the Ray dashboard's record.
`pytest -m slow` runs a tiny sweep with `--dashboard` and `laray dashboard` beside it, over HTTP.
"""

import http.server
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml
from conftest import write_digit_folder

from laray.cli import main as cli
from laray.results import dashboards
from laray.results.dashboards import OPTUNA_DB, RAY_DASHBOARD_FILE, ray_dashboard_of

INSTALL = 'pip install "laray[dashboard]"'


def one_error_line(capsys) -> str:
    """Lines the test session's Ray forwards go to the file descriptors, not capsys (tests/conftest.py)."""
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


@pytest.fixture
def sweep_folder(tmp_path) -> Path:
    """What `laray dashboard` checks a sweep's folder by: its study's file (the servers never start here)."""
    folder = tmp_path / "results" / "demo-1"
    folder.mkdir(parents=True)
    (folder / OPTUNA_DB).write_bytes(b"")
    return folder


@pytest.fixture
def tools(tmp_path, monkeypatch):
    """An environment whose Python has no tools beside it and a PATH with none: tests put fakes in the folder.

    The servers' logs go to a temporary folder of this test's, which must be gone afterwards, however it ended.
    """
    bin_dir, temporary = tmp_path / "bin", tmp_path / "tmp"
    bin_dir.mkdir()
    temporary.mkdir()
    monkeypatch.setattr(sys, "executable", str(bin_dir / "python"))
    monkeypatch.setattr(dashboards.shutil, "which", lambda name: None)
    monkeypatch.setattr(dashboards.tempfile, "tempdir", str(temporary))
    yield bin_dir
    assert list(temporary.iterdir()) == []


def fake_tool(bin_dir: Path, name: str, script: str) -> None:
    path = bin_dir / name
    path.write_text("#!/bin/sh\n" + script + "\n")
    path.chmod(0o755)


def test_a_folder_that_is_not_a_sweep_is_one_line(tmp_path, capsys):
    assert cli.main(["dashboard", str(tmp_path)]) == 1
    assert one_error_line(capsys) == (
        f"laray: error: {tmp_path}: not a sweep's folder (no optuna.db); give STORAGE/NAME, the folder "
        "`laray sweep` names"
    )
    assert cli.main(["dashboard", str(tmp_path / "gone")]) == 1
    assert (
        one_error_line(capsys)
        == f"laray: error: {tmp_path / 'gone'}: no such folder; give a sweep's folder, STORAGE/NAME"
    )


def test_tools_not_installed_are_named_with_the_install_command(sweep_folder, tools, capsys):
    assert cli.main(["dashboard", str(sweep_folder)]) == 1
    assert one_error_line(capsys) == f"laray: error: optuna-dashboard is not installed: {INSTALL}"
    fake_tool(tools, "optuna-dashboard", "exit 0")  # beside Python, as pip installs it
    assert cli.main(["dashboard", str(sweep_folder)]) == 1
    assert one_error_line(capsys) == f"laray: error: tensorboard is not installed: {INSTALL}"


def test_a_port_in_use_is_refused_in_one_line(sweep_folder, capsys):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert cli.main(["dashboard", str(sweep_folder), "--tensorboard-port", str(port)]) == 1
    line = one_error_line(capsys)
    assert line.startswith(f"laray: error: --tensorboard-port {port}: cannot listen on 127.0.0.1:{port} (")
    assert cli.main(["dashboard", str(sweep_folder), "--optuna-port", "8123", "--tensorboard-port", "8123"]) == 1
    assert one_error_line(capsys) == "laray: error: --optuna-port and --tensorboard-port are both 8123: give two ports"


def test_not_a_port_is_a_usage_error(sweep_folder, capsys):
    with pytest.raises(SystemExit) as exit:
        cli.main(["dashboard", str(sweep_folder), "--optuna-port", "70000"])
    assert exit.value.code == 2
    assert "argument --optuna-port: not a port: 70000 (1-65535)" in capsys.readouterr().err


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def test_a_child_that_dies_is_named_with_its_last_words_and_the_other_one_is_stopped(
    sweep_folder, tools, tmp_path, capsys
):
    pid_file = tmp_path / "tensorboard.pid"
    # optuna-dashboard dies once TensorBoard runs: laray must say why, and stop TensorBoard
    died = f"while [ ! -s {pid_file} ]; do sleep 0.05; done; echo starting; echo 'cannot open the storage' >&2; exit 3"
    fake_tool(tools, "optuna-dashboard", died)
    fake_tool(tools, "tensorboard", f"echo $$ > {pid_file}; exec sleep 300")
    assert cli.main(["dashboard", str(sweep_folder)]) == 1
    assert one_error_line(capsys) == "laray: error: optuna-dashboard exited with status 3: cannot open the storage"
    assert _gone(int(pid_file.read_text()))


class _RayLike(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = json.dumps({"authentication_mode": "token"}).encode()
        self.send_response(200 if self.path == "/api/authentication_mode" else 401)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def test_the_sweeps_ray_dashboard_is_shown_only_while_its_driver_runs_it(tmp_path):
    server = http.server.HTTPServer(("127.0.0.1", 0), _RayLike)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_port}"
    record = {"url": url, "token": True, "host": socket.gethostname(), "pid": os.getpid()}
    try:
        assert ray_dashboard_of(tmp_path) is None  # no record: a sweep without --dashboard
        (tmp_path / RAY_DASHBOARD_FILE).write_text(json.dumps(record))
        assert ray_dashboard_of(tmp_path) == {"url": url, "token": True}
        ended = subprocess.Popen(["true"])
        ended.wait()
        (tmp_path / RAY_DASHBOARD_FILE).write_text(json.dumps({**record, "pid": ended.pid}))
        assert ray_dashboard_of(tmp_path) is None  # an earlier driver's record
        (tmp_path / RAY_DASHBOARD_FILE).write_text(json.dumps({**record, "host": "another-node"}))
        assert ray_dashboard_of(tmp_path) is None
    finally:
        server.shutdown()
    (tmp_path / RAY_DASHBOARD_FILE).write_text(json.dumps(record))
    assert ray_dashboard_of(tmp_path) is None  # the driver runs, its dashboard does not answer


def test_sweep_dashboard_without_rays_dashboard_packages_is_one_line_before_ray_starts(monkeypatch):
    import importlib.util

    from laray.errors import LarayError
    from laray.sweep import ray_setup

    found = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "aiohttp" else found(name, *a))
    with pytest.raises(LarayError) as refused:
        ray_setup._check_dashboard_installed()  # what ray_init(address=None, dashboard=True) checks first
    assert str(refused.value) == (
        f"--dashboard: Ray's dashboard needs the package aiohttp, which is not installed: {INSTALL}"
    )


def test_the_ray_login_line():
    assert dashboards.ray_login(True) == "log in with the token that `ray get-auth-token` prints"
    assert dashboards.ray_login(False) == "no login: token authentication is off"


# --------------------------------------------------------------------------------------------------
# The real servers, on a real sweep


def _missing_for_the_slow_test() -> list[str]:
    import importlib.util

    missing = []
    for name in ("optuna-dashboard", "tensorboard"):
        try:
            dashboards.tool(name)
        except dashboards.DashboardError:
            missing.append(name)
    missing += [m for m in ("aiohttp", "aiohttp_cors", "opencensus") if importlib.util.find_spec(m) is None]
    return missing


def _wait_for(condition, what: str, timeout: float, log: Path | None = None):
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(
                f"waited {timeout:.0f} s for {what}" + (f"; log:\n{log.read_text()[-3000:]}" if log else "")
            )
        time.sleep(0.5)


def _get(url: str):
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return json.loads(response.read())
    except OSError:
        return None


def _processes_on(folder: Path) -> list[str]:
    """Command lines of the processes whose arguments name `folder` (the dashboards' children), from /proc."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                argv = (entry / "cmdline").read_bytes().decode(errors="replace").split("\0")
            except OSError:
                continue
            if any(str(folder) in a for a in argv) and not any(a == "dashboard" for a in argv):
                found.append(" ".join(argv))
    return found


@pytest.mark.slow
def test_laray_dashboard_serves_a_running_sweep_and_stops_cleanly_on_sigterm(tmp_path):
    """`laray sweep --dashboard` names its Ray dashboard; `laray dashboard`, started while the sweep runs, shows it
    and serves the study and the trials' event files; SIGTERM stops both servers: exit 143, one line."""
    missing = _missing_for_the_slow_test()
    if missing:
        pytest.skip(f"not installed: {', '.join(missing)} (the 'dashboard' extra: {INSTALL})")
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "sweep"))
    from test_sweep import raw_space

    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump(raw_space(num_samples=3, max_concurrent=2, confirm_top=1, confirm_seeds=1)))
    data = write_digit_folder(tmp_path / "digits", 120)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    # HOME: Ray's authentication token goes to this test's ~/.ray/auth_token
    env.update(HOME=str(tmp_path), RAY_USAGE_STATS_ENABLED="0", LARAY_CACHE_DIR=str(tmp_path / "cache"))
    experiment, sweep_log, dash_log = tmp_path / "results" / "dash", tmp_path / "sweep.log", tmp_path / "dashboard.log"
    laray = [sys.executable, "-m", "laray"]
    argv = ["sweep", "--space", str(space), "--data", str(data), "--storage", str(tmp_path / "results")]
    with open(sweep_log, "wb") as log:
        sweep = subprocess.Popen([*laray, *argv, "--name", "dash", "--dashboard"], stdout=log, stderr=log, env=env)
    dashboard = None
    try:
        said = _wait_for(
            lambda: [line for line in sweep_log.read_text().splitlines() if line.startswith("Ray dashboard: ")],
            "the sweep's Ray dashboard line",
            300,
            sweep_log,
        )
        assert said[0].startswith("Ray dashboard: http://127.0.0.1:")
        assert said[0].endswith(" (log in with the token that `ray get-auth-token` prints)")
        ray_url = said[0].split()[2]
        _wait_for(lambda: (experiment / OPTUNA_DB).exists(), "the sweep's study", 120, sweep_log)

        with open(dash_log, "wb") as log:
            dashboard = subprocess.Popen([*laray, "dashboard", str(experiment)], stdout=log, stderr=log, env=env)
        lines = _wait_for(
            lambda: (lambda text: text if text and text[-1].startswith("serving ") else None)(
                dash_log.read_text().splitlines()
            ),
            "laray dashboard's addresses",
            240,
            dash_log,
        )
        assert [line.split()[0] for line in lines] == ["optuna-dashboard:", "TensorBoard:", "Ray", "serving"]
        optuna_url, tensorboard_url = lines[0].split()[1], lines[1].split()[1]
        assert lines[2].split()[2] == ray_url and "log in with the token that `ray get-auth-token` prints" in lines[2]
        assert len(_processes_on(experiment)) >= 2  # the two servers (and TensorBoard's data server)

        assert sweep.wait(timeout=900) == 0, sweep_log.read_text()[-3000:]
        studies = _get(f"{optuna_url}/api/studies")["study_summaries"]
        assert [s["study_name"] for s in studies] == ["dash"]
        study = _get(f"{optuna_url}/api/studies/{studies[0]['study_id']}")
        assert study["objective_names"] == ["purity"] and len(study["trials"]) == 3
        assert all({"stopped_by", "epochs_run"} <= {a["key"] for a in t["user_attrs"]} for t in study["trials"])
        search_runs = {f.name for f in experiment.glob("train_trial_*") if f.is_dir()}
        runs = _wait_for(
            lambda: (lambda r: r if r and search_runs <= set(r) else None)(_get(f"{tensorboard_url}/data/runs")),
            "TensorBoard to list the trials",
            120,
        )
        assert any(run.startswith("confirm/") for run in runs)
        assert _get(f"{tensorboard_url}/data/plugins_listing")["hparams"]["enabled"] is True
        assert dashboard.poll() is None  # still serving after the sweep ended

        dashboard.send_signal(signal.SIGTERM)
        assert dashboard.wait(timeout=60) == 143
        assert (
            dash_log.read_text().splitlines()[-1]
            == "laray: stopped by SIGTERM; optuna-dashboard and TensorBoard stopped"
        )
        assert _wait_for(lambda: _processes_on(experiment) == [], "the servers to be gone", 10) is True
    finally:
        for process in (dashboard, sweep):
            if process is not None and process.poll() is None:
                process.kill()
                process.wait()
