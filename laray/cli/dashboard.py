"""`laray dashboard STORAGE/NAME`: optuna-dashboard and TensorBoard on a sweep, and where its Ray dashboard is."""

from __future__ import annotations

import argparse

from laray.cli.options import positive_int


def _port(text: str) -> int:
    port = positive_int(text)
    if port > 65535:
        raise argparse.ArgumentTypeError(f"not a port: {port} (1-65535)")
    return port


def add_dashboard_command(commands) -> None:
    dashboard = commands.add_parser(
        "dashboard",
        help="optuna-dashboard and TensorBoard on a sweep, while it runs or after",
        description="Start optuna-dashboard (on EXPERIMENT/optuna.db: every trial's parameters and score, its "
        "objective by name, how it ended) and TensorBoard (logdir EXPERIMENT: each trial's scores by epoch, and "
        "in HPARAMS its settings next to its scores) on 127.0.0.1, and print their addresses; when the sweep's "
        "driver runs a Ray dashboard (laray sweep --dashboard), also its address and how to log in. Ctrl-C or "
        "SIGTERM stops both. Needs the 'dashboard' extra: pip install \"laray[dashboard]\".",
    )
    dashboard.add_argument("experiment", metavar="EXPERIMENT", help="the sweep's folder, STORAGE/NAME")
    dashboard.add_argument(
        "--optuna-port", type=_port, metavar="PORT", help="optuna-dashboard's port on 127.0.0.1 (default: a free one)"
    )
    dashboard.add_argument(
        "--tensorboard-port", type=_port, metavar="PORT", help="TensorBoard's port on 127.0.0.1 (default: a free one)"
    )
    dashboard.set_defaults(run=_dashboard)


def _dashboard(args) -> int:
    import time

    from laray.results.dashboards import (
        DashboardError,
        Dashboards,
        check_port,
        free_port,
        ray_dashboard_of,
        ray_login,
        sweep_folder,
    )

    folder = sweep_folder(args.experiment)
    if args.optuna_port is not None and args.optuna_port == args.tensorboard_port:
        raise DashboardError(f"--optuna-port and --tensorboard-port are both {args.optuna_port}: give two ports")
    ports = {}
    for option, port in (("--optuna-port", args.optuna_port), ("--tensorboard-port", args.tensorboard_port)):
        ports[option] = free_port() if port is None else check_port(port, option)
    args.on_stop = "optuna-dashboard and TensorBoard stopped"
    what = {
        "optuna-dashboard": "the study: each trial's parameters, score and how it ended (user attributes)",
        "TensorBoard": "each trial's scores by epoch; HPARAMS: settings next to scores",
    }
    with Dashboards(folder, ports["--optuna-port"], ports["--tensorboard-port"]) as dashboards:
        for child in dashboards.children:  # each line once its server answers, so that the address works
            dashboards.wait_ready(child)
            print(f"{child.name + ':':18}{child.url}  {what[child.name]}", flush=True)
        ray = ray_dashboard_of(folder)
        if ray is not None:
            print(f"{'Ray dashboard:':18}{ray['url']}  the sweep's Ray; {ray_login(ray['token'])}", flush=True)
        print(f"serving {folder}; Ctrl-C stops them", flush=True)
        while True:  # until a stop signal (laray.interrupt raises it here) or a child's death
            for child in dashboards.children:
                dashboards.check(child)
            time.sleep(0.5)
