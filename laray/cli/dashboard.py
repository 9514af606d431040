"""`laray dashboard STORAGE/NAME`: optuna-dashboard and TensorBoard on a sweep (the MLflow UI when it tracks its runs
in MLflow), and where its Ray dashboard is."""

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
        "SIGTERM stops them. Needs the 'dashboard' extra: pip install \"laray[dashboard]\". A sweep that records its "
        "runs in EXPERIMENT/mlflow.db (laray sweep --track mlflow) gets the MLflow UI on it too ('tracking' extra).",
    )
    dashboard.add_argument("experiment", metavar="EXPERIMENT", help="the sweep's folder, STORAGE/NAME")
    dashboard.add_argument(
        "--optuna-port", type=_port, metavar="PORT", help="optuna-dashboard's port on 127.0.0.1 (default: a free one)"
    )
    dashboard.add_argument(
        "--tensorboard-port", type=_port, metavar="PORT", help="TensorBoard's port on 127.0.0.1 (default: a free one)"
    )
    dashboard.add_argument(
        "--mlflow-port",
        type=_port,
        metavar="PORT",
        help="the MLflow UI's port on 127.0.0.1, when EXPERIMENT/mlflow.db exists (default: a free one)",
    )
    dashboard.set_defaults(run=_dashboard)


def _dashboard(args) -> int:
    import time

    from laray.results.dashboards import (
        MLFLOW_DB,
        DashboardError,
        Dashboards,
        check_port,
        free_port,
        mlflow_runs_page,
        ray_dashboard_of,
        ray_login,
        sweep_folder,
    )

    folder = sweep_folder(args.experiment)
    given = {"--optuna-port": args.optuna_port, "--tensorboard-port": args.tensorboard_port}
    tracked = (folder / MLFLOW_DB).is_file()  # laray sweep --track mlflow
    if tracked:
        given["--mlflow-port"] = args.mlflow_port
    seen = {}
    for option, port in given.items():
        if port is not None and port in seen:
            raise DashboardError(f"{seen[port]} and {option} are both {port}: give two ports")
        seen.setdefault(port, option)
    ports = {}
    for option, port in given.items():
        ports[option] = free_port() if port is None else check_port(port, option)
    children = "optuna-dashboard, TensorBoard and the MLflow UI" if tracked else "optuna-dashboard and TensorBoard"
    args.on_stop = f"{children} stopped"
    what = {
        "optuna-dashboard": "the study: each trial's parameters, score and how it ended (user attributes)",
        "TensorBoard": "each trial's scores by epoch; HPARAMS: settings next to scores",
        "MLflow UI": "every trial and confirmation run: settings, scores by epoch, end; the winner and verdict tagged",
    }
    mlflow_port = ports.get("--mlflow-port")
    with Dashboards(folder, ports["--optuna-port"], ports["--tensorboard-port"], mlflow_port) as dashboards:
        for child in dashboards.children:  # each line once its server answers, so that the address works
            dashboards.wait_ready(child)
            url = child.url + (mlflow_runs_page(folder) if child.name == "MLflow UI" else "")
            print(f"{child.name + ':':18}{url}  {what[child.name]}", flush=True)
        ray = ray_dashboard_of(folder)
        if ray is not None:
            print(f"{'Ray dashboard:':18}{ray['url']}  the sweep's Ray; {ray_login(ray['token'])}", flush=True)
        print(f"serving {folder}; Ctrl-C stops them", flush=True)
        while True:  # until a stop signal (laray.interrupt raises it here) or a child's death
            for child in dashboards.children:
                dashboards.check(child)
            time.sleep(0.5)
