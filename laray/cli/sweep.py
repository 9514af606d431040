"""`laray sweep`: the Ray Tune + Optuna search, its options, and the name of a new sweep or of the one to resume."""

from __future__ import annotations

import logging
import time
from pathlib import Path

from laray.cli.options import (
    add_data_options,
    add_precision_option,
    check_device_name,
    command_again,
    count,
    cuda_for_training,
    duration,
    fail,
    fraction,
    positive_int,
)
from laray.cli.tables import print_confirmed, print_search_best, print_verdict
from laray.errors import LarayError, SweepError
from laray.settings.duration import duration as readable


def add_sweep_command(commands) -> None:
    sweep = commands.add_parser(
        "sweep",
        help="a Ray Tune + Optuna sweep over the LA hyperparameters (no arguments: the CPU demo)",
        description="Search the Local Aggregation hyperparameters with Optuna's TPE and ASHA early stopping on "
        "Ray Tune. With no arguments: the embedded digits and search_spaces/demo.yaml, a few minutes "
        "on a laptop CPU. Results go to STORAGE/NAME: Ray Tune's experiment folder (TensorBoard logs, "
        "checkpoints, each trial's assignments.csv) and optuna.db.",
    )
    sweep.add_argument(
        "--space",
        metavar="FILE",
        help="search space YAML, or a bundled one: demo, photos-cpu, default (default: by the data and "
        "the trials' devices: digits, demo; photos on CPUs, photos-cpu; photos on GPUs "
        "(--gpus-per-trial > 0), default)",
    )
    sweep.add_argument("--data", metavar="SPEC", help="data set (default: the space's 'data', else digits)")
    add_data_options(sweep)
    sweep.add_argument("--num-samples", type=positive_int, metavar="N", help="trials (default: the space's)")
    sweep.add_argument(
        "--plan",
        action="store_true",
        help="print the plan (the work counted, the expected wall time measured on this machine) and exit, "
        "starting nothing",
    )
    sweep.add_argument(
        "--storage",
        default="~/laray_results",
        metavar="DIR_OR_URI",
        help="local folder or cloud URI for results (default: %(default)s)",
    )
    sweep.add_argument(
        "--name",
        metavar="NAME",
        help="experiment name (default: the space's name and the start time, e.g. demo-20261123-0450; "
        "with --resume: the newest sweep of that space in --storage)",
    )
    sweep.add_argument(
        "--address",
        metavar="ADDR",
        help="Ray cluster to join ('auto': the running one; default: a local Ray for this sweep)",
    )
    sweep.add_argument(
        "--cpus-per-trial",
        type=float,
        default=1.0,
        metavar="N",
        help="CPUs Ray reserves for each trial, also its torch threads (default: %(default)s)",
    )
    sweep.add_argument(
        "--gpus-per-trial",
        type=float,
        metavar="N",
        help="GPUs Ray reserves for each trial, fractions allowed, e.g. 0.5 (default: 1 when this "
        "machine has CUDA and --device is not cpu, else 0)",
    )
    sweep.add_argument(
        "--stage1-workers",
        type=positive_int,
        metavar="N",
        help="workers that train stage 1 together before the search, data-parallel (Ray Train, DDP), each with "
        "a trial's CPUs and GPUs (default: the space's 'stage1_workers', else every GPU the cluster offers when "
        "stage 1 starts; 1 without GPUs)",
    )
    sweep.add_argument(
        "--max-failures",
        type=int,
        default=2,
        metavar="N",
        help="restarts of a trial whose worker dies, from its last checkpoint (default: %(default)s)",
    )
    sweep.add_argument(
        "--holdout",
        type=fraction,
        metavar="F",
        help="fraction of each species scored apart and never selected on, the unbiased estimate "
        "(default: the space's 'holdout', else 0.5; 0: none)",
    )
    sweep.add_argument(
        "--confirm-top",
        type=count,
        metavar="K",
        help="re-run the K best configurations after the search (default: the space's "
        "'confirm_top', else 3; 0: no confirmation)",
    )
    sweep.add_argument(
        "--confirm-seeds",
        type=count,
        metavar="S",
        help="...with S fresh seeds each (default: the space's 'confirm_seeds', else 5); with --resume, "
        "a larger S adds the new seeds to a finished confirmation",
    )
    sweep.add_argument(
        "--time-budget",
        type=duration,
        metavar="DURATION",
        help="no new search trial once the search has run this long (45s, 90m, 6h, 1h30m), running "
        "ones stop at their next epoch end, then the confirmation runs (default: the space's "
        "'time_budget', else none)",
    )
    sweep.add_argument("--resume", action="store_true", help="continue the interrupted sweep STORAGE/NAME")
    sweep.add_argument(
        "--warm-start",
        nargs="+",
        default=(),
        metavar="DIR",
        help="earlier sweeps (STORAGE/OTHER) whose finished trials Optuna starts from; refused when "
        "their data, stage-1 settings, held-out split, fixed LA settings or objective differ "
        "(default: none)",
    )
    sweep.add_argument(
        "--seed", type=int, default=0, help="seed of the sampler and of every trial's training (default: %(default)s)"
    )
    sweep.add_argument(
        "--device", default="auto", help="auto, cpu or cuda (default: %(default)s; with --gpus-per-trial > 0: cuda)"
    )
    add_precision_option(sweep, "the space's fixed settings")
    sweep.add_argument(
        "--verbose",
        action="store_true",
        help="Ray Tune's own progress table and messages too, besides laray's line per trial event",
    )
    sweep.add_argument(
        "--dashboard",
        action="store_true",
        help="start Ray's dashboard on 127.0.0.1 (port 8265, or the next free one; needs the 'dashboard' extra); "
        "its address and how to log in are printed when Ray starts",
    )
    sweep.add_argument(
        "--track",
        type=_track,
        metavar="{mlflow,URI}",
        help="record every trial and confirmation run in MLflow: 'mlflow' in STORAGE/NAME/mlflow.db (`laray "
        "dashboard` shows it), or a tracking server's URI (http://HOST:5000); needs the 'tracking' extra "
        "(default: the space's 'track', else none; on --resume: as the sweep began)",
    )
    sweep.set_defaults(run=_sweep)


def _track(text: str) -> str:
    import argparse

    from laray.settings.space import tracking_target

    if tracking_target(text) is None:
        raise argparse.ArgumentTypeError(f"not 'mlflow' nor an MLflow tracking URI (http://HOST:5000...): {text!r}")
    return text


def _sweep_name(stem: str, storage: str, resume: bool) -> str:
    """A new sweep gets the space's name and the time; --resume picks the newest local sweep of that space."""
    import time

    if not resume:
        return f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    local = storage.removeprefix("file://")
    if "://" in local:
        raise SweepError(f"with cloud storage {storage}, name the sweep to resume with --name")
    found = sorted(Path(local).expanduser().glob(f"{stem}-*"), key=lambda p: p.stat().st_mtime)
    if not found:
        raise SweepError(f"no sweep of space {stem!r} in {storage} to resume; name one with --name")
    return found[-1].name


def _sweep(args) -> int:
    from laray.data.dataref import DIGITS, describe
    from laray.settings.defaults import choose
    from laray.settings.space import load_space
    from laray.training.epoch_progress import progress_interval_s  # torch-free

    check_device_name(args.device)
    progress_interval_s()  # a bad $LARAY_PROGRESS_S fails here, before Ray starts (the driver reads it again)
    if args.gpus_per_trial is None:  # a GPU per trial where this machine has one and the user did not say cpu
        args.gpus_per_trial = 1.0 if args.device != "cpu" and cuda_for_training("auto") else 0.0
    space_name = args.space
    if space_name is None:  # the bundled settings for the data and the trials' devices, said out loud
        choice = choose(
            args.data or DIGITS,
            cuda=args.gpus_per_trial > 0,
            no_cuda_reason="the trials get no GPU (--gpus-per-trial 0)",
        )
        space_name = choice.space
    space = load_space(space_name).overridden(
        holdout=args.holdout,
        confirm_top=args.confirm_top,
        confirm_seeds=args.confirm_seeds,
        time_budget_s=args.time_budget,
        precision=args.precision,  # stage 1's and every trial's
        stage1_workers=args.stage1_workers,
        track=args.track,
    )  # fails here, before Ray starts
    spec = args.data or space.data
    if spec is None:
        raise LarayError(f"the search space {space.source} names no data set: give --data FOLDER_OR_CSV")
    name = args.name or _sweep_name(Path(space.source).stem, args.storage, args.resume)
    # The driver only lists the files: each node decodes them into its own cache (or --cache-dir).
    data = describe(
        spec,
        space.ae.image_size,
        label_column=args.label_column,
        path_column=args.path_column,
        image_root=args.image_root,
    )
    from laray.settings.config import check_enough_images

    check_enough_images(len(data), len(data.class_names))
    space.check_data_size(len(data))
    if args.space is None:  # the first line: which bundled settings, why, and how to choose others
        print(choice.announcement("--space FILE (laray sweep --help)"), flush=True)
    for note in data.notes:
        logging.getLogger("laray.data.dataset").warning(note)
    again = resume_command(args.argv, name)
    args.on_stop = f"the sweep's state is saved; continue it with: {again}"
    plan = None if args.resume else _plan(args, space, data)
    if args.plan:
        return 0
    began = time.monotonic()
    from laray.threads import size_threads

    # The driver's own torch work is small (the store, the baselines' files); the trials have the cores
    size_threads(1)
    from laray.results.dashboards import ray_login
    from laray.sweep.driver import SweepRun, TrialResources, run_sweep  # torch: once the arguments hold
    from laray.sweep.ray_setup import ray_dashboard, ray_init

    ray_init(args.address, dashboard=args.dashboard, quiet=not args.verbose)
    dashboard = ray_dashboard()
    if dashboard is not None:  # right after Ray starts: the address, and the token Ray 2.60 asks for by default
        print(f"Ray dashboard: {dashboard['url']} ({ray_login(dashboard['token'])})", flush=True)
    result = run_sweep(
        data,
        space,
        run=SweepRun(
            args.storage,
            name,
            num_samples=args.num_samples,
            seed=args.seed,
            resume=args.resume,
            max_failures=args.max_failures,
            verbose=2 if args.verbose else 1,
            warm_start=args.warm_start,
            plan=plan,
            tracking=space.track,
        ),
        trial=TrialResources(
            cpus=args.cpus_per_trial,
            gpus=args.gpus_per_trial,
            device=args.device,
            cache_dir=args.cache_dir,
            stage1_workers=space.stage1_workers,
        ),
    )
    print(f"\n{result.n_trials} trials ({result.n_errored} errored) in {result.experiment}")
    if plan is not None:
        print(f"took {readable(time.monotonic() - began)}; the plan said {readable(plan['estimated_s'])}")
    if result.best_config is None:
        return fail("no trial reported a score")
    print_search_best(result, space)
    if result.confirmed:
        print_confirmed(result, space)
    print(f"\nresults in {result.experiment}: best.json, optuna.db, one folder per trial")
    print("next:")
    print(f"  laray analyze {result.experiment}      # report.md, tables and pictures")
    tracked = (Path(result.experiment) / "mlflow.db").exists()  # laray sweep --track mlflow (laray.sweep.tracking)
    shown = "optuna-dashboard, TensorBoard and the MLflow UI" if tracked else "optuna-dashboard and TensorBoard"
    print(f"  laray dashboard {result.experiment}      # {shown} on this sweep")
    track = space.track
    if track is not None and not tracked:  # a tracking server's
        print(f"  MLflow: the runs of experiment {name!r} at {track}")
    print_verdict(result)
    more = more_seeds_command(result.margin_over_recipe, space.objective, args.argv, name)
    if more is not None:
        print(f"  {more}")
    return 0


def resume_command(argv: list[str], name: str, confirm_seeds: int | None = None) -> str:
    """This command line as `--resume --name NAME` (the options a resume refuses or takes from the sweep left out),
    with `--confirm-seeds N` in place of any given when confirm_seeds is set."""
    drop = {"--name": 1, "--num-samples": 1, "--resume": 0, "--warm-start": -1}
    add = ["--resume", "--name", name]
    if confirm_seeds is not None:
        drop["--confirm-seeds"] = 1
        add += ["--confirm-seeds", str(confirm_seeds)]
    return command_again(argv, drop=drop, add=add)


def more_seeds_command(margin: dict | None, objective: str, argv: list[str], name: str) -> str | None:
    """The command that adds the seeds a verdict ahead in the mean but inside the seeds' spread needs, or None."""
    from laray.scoring.confirm import seeds_to_settle

    settle = seeds_to_settle(margin, objective)
    return None if settle is None else resume_command(argv, name, settle)


def _plan(args, space, data) -> dict:
    """Measure this machine, count the sweep's work, print the plan; plan.json's content."""
    import os

    import torch

    from laray.data.cache import has_entry
    from laray.sweep.plan import plan_lines, plan_sweep, typical_la
    from laray.training.plan import DECODE_SAMPLE, measure

    cuda = args.gpus_per_trial > 0 and torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    threads = max(1, int(args.cpus_per_trial))
    if args.address:  # a cluster: its size is not known here; the space's concurrency is taken as given
        slots = space.max_concurrent
    elif cuda:
        slots = int(torch.cuda.device_count() // args.gpus_per_trial)
    else:
        slots = (os.cpu_count() or 1) // threads
    # Trials sharing this machine's CPU slow each other down: the LA step is timed with as many copies at once.
    together = 1 if cuda or args.address else max(1, min(space.max_concurrent, slots))
    decoded = not data.paths or has_entry(data.key, args.cache_dir)
    print(
        f"plan: timing each kind of step on {device} ({threads} thread(s) a trial, {together} at once)...", flush=True
    )
    costs = measure(
        space.ae,
        typical_la(space, len(data)),
        len(data),
        max(1, len(data.class_names)),
        torch.device(device),
        threads,
        [] if decoded else list(data.paths[:DECODE_SAMPLE]),
        together=together,
    )
    # as the driver will find them: every GPU (on a cluster not known here, its concurrency), none without CUDA
    workers = space.stage1_workers or (slots if cuda else 1)
    plan = plan_sweep(
        space, len(data), len(data.class_names), costs, device, threads, args.num_samples, slots, decoded, workers
    )
    for line in plan_lines(plan, space, cuda):
        print(line)
    if space.time_budget_s is not None and plan.seconds["search"] > space.time_budget_s:
        print(f"  the time budget ({readable(space.time_budget_s)}) will end the search before that")
    return plan.to_json()
