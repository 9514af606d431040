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
):
    """verbose 0: silent; 1: laray's line per trial event (laray.sweep.console); 2: Ray Tune's own table as well.

    stop, clock: the time budget's stopper and clock (the search only); budget_of: the folder whose budget the
    console shows.
    """
    from ray import tune

    from laray.sweep.console import SweepProgress

    progress = (
        [SweepProgress(label, space.la.epochs, space.objective, space.max_concurrent, budget_of)] if verbose else []
    )
    callbacks = progress + ([clock] if clock is not None else [])
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


def check_resources(cpus_per_trial: float, gpus_per_trial: float, device: str) -> None:
    """Refuse, before anything is created, a trial that no node of the running Ray cluster can ever hold.

    Tune would otherwise wait forever for it. An autoscaler may add nodes: like Tune itself
    (ray.tune.execution.cluster_info), laray takes ~/ray_bootstrap_config.yaml, which `ray up` puts
    on the head node, as the sign of one, and then checks nothing.
    """
    import ray

    if device.startswith("cuda") and gpus_per_trial <= 0:
        raise LarayError(
            f"--device {device} in a sweep needs --gpus-per-trial > 0: Ray hides the GPUs from "
            "trials that did not ask for one"
        )
    if Path("~/ray_bootstrap_config.yaml").expanduser().exists():
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

    quiet: without Ray's notice that token authentication is on (as it is by default).
    """
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
    import ray  # after the settings above: Ray reads them when it is imported

    if ray.is_initialized():
        return
    if address:
        ray.init(address=address, configure_logging=False)  # as below: Tune's INFO lines stay off the console
    else:
        ray.init(include_dashboard=dashboard, dashboard_host="127.0.0.1", configure_logging=False)
    global _ray_started_here
    _ray_started_here = True
    take_signals_back()  # ray.init makes SIGTERM exit at once


_ray_started_here = False


def shutdown_ray() -> None:
    """Shut down (or leave) the Ray that ray_init started or joined; one started by someone else stays."""
    global _ray_started_here
    if _ray_started_here:
        import ray

        ray.shutdown()
        _ray_started_here = False
