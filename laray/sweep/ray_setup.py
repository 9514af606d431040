"""Ray and Tune as laray sets them up: starting or joining Ray, a trial's resources checked against the
cluster, and the RunConfig the search and the confirmation share (console, failures, checkpoints kept).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from laray.errors import LarayError
from laray.interrupt import take_signals_back
from laray.settings.space import SearchSpace


def run_config(
    name: str,
    storage_path: str,
    verbose: int,
    max_failures: int,
    label: str,
    space: SearchSpace,
    stop=None,
    clock=None,
    budget_of: str | None = None,
    seed: int = 0,
    callbacks: list | None = None,
):
    """verbose 0: silent; 1: laray's line per trial event (laray.sweep.console); 2: Ray Tune's own table as well.

    stop, clock: the time budget's stopper and clock (the search only); budget_of: the folder whose budget the
    console shows; seed: the search trials' seed, for TensorBoard's HPARAMS (a confirmation run has its own);
    callbacks: more of them (MLflow's, laray.sweep.tracking). With a folder for storage, KeepTuneState as
    well (laray.sweep.tune_state).
    """
    from ray import tune

    from laray.sweep.console import SweepProgress
    from laray.sweep.hparams import TrialHparams
    from laray.sweep.tune_state import KeepTuneState

    progress = (
        [SweepProgress(label, space.la.epochs, space.objective, space.max_concurrent, budget_of)] if verbose else []
    )
    # TrialHparams in place of Tune's own TensorBoard logger: the same scalars, HPARAMS filled (laray.sweep.hparams)
    extra = list(callbacks or [])
    callbacks = progress + ([clock] if clock is not None else []) + [TrialHparams.of(space, seed)] + extra
    if "://" not in storage_path:  # a folder: a whole copy of Tune's state beside it, for a resume after a kill
        callbacks.append(KeepTuneState(f"{storage_path.rstrip('/')}/{name}"))
    # sync_artifacts: with cloud storage, the files a trial writes (assignments.csv...) are uploaded too.
    return tune.RunConfig(
        name=name,
        storage_path=storage_path,
        verbose=max(0, verbose - 1),
        callbacks=callbacks,
        stop=stop,
        sync_config=tune.SyncConfig(sync_artifacts=True),
        failure_config=tune.FailureConfig(max_failures=max_failures),
        checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
    )


def autoscaling() -> bool:
    """Whether an autoscaler may add nodes: like Tune itself (ray.tune.execution.cluster_info), laray takes
    ~/ray_bootstrap_config.yaml, which `ray up` puts on the head node, as the sign of one."""
    return Path("~/ray_bootstrap_config.yaml").expanduser().exists()


def check_resources(cpus_per_trial: float, gpus_per_trial: float, device: str) -> None:
    """Refuse, before anything is created, a trial that no node of the running Ray cluster can ever hold.

    Tune would otherwise wait forever for it. An autoscaler may add nodes (autoscaling): then it checks nothing.
    """
    import ray

    if device.startswith("cuda") and gpus_per_trial <= 0:
        raise LarayError(
            f"--device {device} in a sweep needs --gpus-per-trial > 0: Ray hides the GPUs from "
            "trials that did not ask for one"
        )
    if autoscaling():
        return
    nodes = [n["Resources"] for n in ray.nodes() if n["Alive"]]
    for option, wanted, key in (
        ("--cpus-per-trial", cpus_per_trial, "CPU"),
        ("--gpus-per-trial", gpus_per_trial, "GPU"),
    ):
        most = max((r.get(key, 0) for r in nodes), default=0)
        if wanted > most:
            raise LarayError(
                f"{option} {wanted:g}: no node of this Ray cluster has that many {key}s (the most is "
                f"{most:g}) and no autoscaler can add one; Tune would wait forever"
            )


def ray_init(address: str | None, dashboard: bool = False, quiet: bool = False) -> None:
    """Start or join Ray; the dashboard, when asked for, binds to 127.0.0.1 only.

    quiet: without Ray's notice that token authentication is on (as it is by default); `laray sweep` says instead
    where the dashboard is and which command prints its token (ray_dashboard).
    """
    if dashboard and not address:
        _check_dashboard_installed()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # No stack dump from Ray's C++ failure-signal handler when SIGTERM stops the driver or its workers:
    # laray handles stop signals itself (laray.interrupt). Read when ray is imported; workers inherit it.
    os.environ.setdefault("RAY_DISABLE_FAILURE_SIGNAL_HANDLER", "1")
    if quiet:
        logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
        # Lines forwarded from tasks (stage 1's), in a terminal or a redirected log: no ANSI colour codes, and
        # no "[repeated 3x across cluster]" notes, which carry their own colour. Both read when ray is imported.
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")
        os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    # Ray Train (stage 1 on several workers, laray.sweep.stage1_ddp) reads these in the driver's environment and
    # hands them to its workers: a worker's print reaches the console once, not also through Train's logger; and
    # no preemption watcher, whose one message on a local Ray is a C++ error line about its own arguments (a
    # preempted worker is a failed one: the group restarts from the last epoch's checkpoint either way).
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    import ray  # after the settings above: Ray reads them when it is imported

    if ray.is_initialized():
        return
    hook = {"worker_process_setup_hook": "laray.sweep.ray_setup.quiet_worker_loggers"}
    if address:  # as below: Tune's INFO lines stay off
        context = ray.init(address=address, configure_logging=False, runtime_env=hook)
    else:
        context = ray.init(
            include_dashboard=dashboard, dashboard_host="127.0.0.1", configure_logging=False, runtime_env=hook
        )
    global _ray_started_here, _dashboard_url
    _ray_started_here = True
    _dashboard_url = f"http://{context.dashboard_url}" if context.dashboard_url else None
    take_signals_back()  # ray.init makes SIGTERM exit at once


def quiet_worker_loggers() -> None:
    """Run in each Ray worker process as it starts (runtime_env's worker_process_setup_hook).

    Ray Train's placement-group cleaner asks Ray's state API every second whether the run's controller
    lives; without the dashboard (laray's default) that API is absent and it warns each time, then goes on
    cleaning up as before.
    """
    logging.getLogger("ray.train.v2._internal.execution.controller.placement_group_cleaner").setLevel(logging.ERROR)


def _check_dashboard_installed() -> None:
    """Ray's dashboard needs ray[default]'s packages; without them ray.init fails with a bare Exception."""
    import importlib.util

    # The top-level packages of ray.dashboard.optional_deps that ray[tune] alone does not bring
    for module in ("aiohttp", "aiohttp_cors", "opencensus", "prometheus_client"):
        if importlib.util.find_spec(module) is None:
            raise LarayError(
                f"--dashboard: Ray's dashboard needs the package {module}, which is not installed: "
                'pip install "laray[dashboard]"'
            )


_ray_started_here = False
_dashboard_url: str | None = None  # the Ray dashboard of the Ray that ray_init started or joined


def ray_dashboard() -> dict | None:
    """The Ray dashboard of this driver's Ray, {"url", "token"}, or None when it has none.

    token: whether its pages ask for Ray's authentication token. Ray 2.60 turns token
    authentication on for every local Ray it starts (RAY_AUTH_MODE unset) and keeps the token in
    ~/.ray/auth_token (or $RAY_AUTH_TOKEN, $RAY_AUTH_TOKEN_PATH), which `ray get-auth-token` prints.
    laray leaves it on: binding to 127.0.0.1 keeps the dashboard off the network but not from the
    machine's other users, and its API submits jobs, which run code as the user who started Ray.
    """
    if _dashboard_url is None:
        return None
    try:  # Ray's own answer; a Ray without it (older, or a change of module) is asked through its setting
        from ray._private.authentication.authentication_utils import is_token_auth_enabled

        token = is_token_auth_enabled()
    except ImportError:
        token = os.environ.get("RAY_AUTH_MODE", "").lower() == "token"
    return {"url": _dashboard_url, "token": token}


def record_dashboard(experiment: Path) -> None:
    """STORAGE/NAME/RAY_DASHBOARD_FILE says where this driver's Ray dashboard is (`laray dashboard` reads it);
    removed when it has none, so that an earlier driver's is not taken for this one's."""
    import json
    import socket

    from laray.checkpoint import write_atomic
    from laray.results.dashboards import RAY_DASHBOARD_FILE

    path = Path(experiment) / RAY_DASHBOARD_FILE
    info = ray_dashboard()
    if info is None:
        path.unlink(missing_ok=True)
        return
    record = {**info, "host": socket.gethostname(), "pid": os.getpid()}
    write_atomic(path, lambda f: f.write(json.dumps(record, indent=2).encode()))


def shutdown_ray() -> None:
    """Shut down (or leave) the Ray that ray_init started or joined; one started by someone else stays."""
    global _ray_started_here, _dashboard_url
    if _ray_started_here:
        import ray

        ray.shutdown()
        _ray_started_here, _dashboard_url = False, None
