"""The `laray` command: parses arguments, calls library functions, prints their results and errors in a few lines."""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import signal
import sys
import warnings

from laray import __version__
from laray.data.sources import DEFAULT_LABEL_COLUMN, DEFAULT_PATH_COLUMN
from laray.errors import LarayError, SweepError
from laray.settings.config import ARCHS


def _int_at_least(minimum: int):
    """An argparse type: an integer >= minimum, else a one-line error naming the value."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value

    return parse


_positive_int, _count = _int_at_least(1), _int_at_least(0)


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {value}")
    return value


def _duration(text: str) -> float:
    from laray.settings.duration import BudgetError, parse_duration

    try:
        return parse_duration(text)
    except BudgetError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _add_data_options(parser) -> None:
    """How a data spec is read: shared by every command that loads data."""
    parser.add_argument(
        "--label-column",
        default=DEFAULT_LABEL_COLUMN,
        metavar="COL",
        help="CSV column holding the label (default: %(default)s; when absent, data load unlabelled)",
    )
    parser.add_argument(
        "--path-column",
        default=DEFAULT_PATH_COLUMN,
        metavar="COL",
        help="CSV column holding the image path (default: %(default)s)",
    )
    parser.add_argument(
        "--image-root", metavar="DIR", help="folder that relative CSV paths resolve against (default: the CSV's folder)"
    )
    parser.add_argument(
        "--cache-dir",
        metavar="DIR",
        help="decode cache folder (default: $LARAY_CACHE_DIR, else ~/.cache/laray; in a sweep, "
        "each node's own unless this names one)",
    )


def _defaults(field: str, stage: int = 0) -> str:
    """'default: X' for a training setting, per bundled settings where they differ (laray.settings.defaults)."""
    from laray.settings.defaults import CPU_PHOTOS, DEMO, GPU_PHOTOS, train_configs
    from laray.settings.space import load_space

    values = {
        label: getattr(train_configs(load_space(name))[stage], field)
        for label, name in (("digits", DEMO), ("photos without CUDA", CPU_PHOTOS), ("photos on CUDA", GPU_PHOTOS))
    }
    if len(set(map(str, values.values()))) == 1:
        return f"default: {next(iter(values.values()))}"
    return "default: " + ", ".join(f"{value} for {label}" for label, value in values.items())


def _add_train_command(commands) -> None:
    train = commands.add_parser(
        "train",
        help="one run of both stages with one set of hyperparameters (no Ray)",
        description="Pretrain the auto-encoder (or reuse one trained before with the same data, stage-1 "
        "settings and seed), fine-tune its encoder with Local Aggregation, and score the clusters. "
        "Settings: the bundled ones for the data and the device (the digits' demo; photos on a CPU, "
        "photos-cpu; photos on CUDA, default: the first line says which), then --config, then flags. "
        "Writes metrics.json, assignments.csv, codes.npy and checkpoints/ to --out.",
    )
    train.add_argument(
        "--data",
        default="digits",
        metavar="SPEC",
        help="'digits' (default), a folder with one sub-folder per species, or a CSV file",
    )
    train.add_argument("--out", required=True, metavar="DIR", help="folder for the run's outputs")
    train.add_argument(
        "--config",
        metavar="FILE",
        help="YAML with 'autoencoder:' and 'la:' sections (default: none, the data's defaults)",
    )
    _add_data_options(train)
    stage1 = train.add_argument_group("stage 1: auto-encoder")
    stage1.add_argument("--arch", help="vgg11_bn, vgg13_bn, vgg16_bn or vgg19_bn (" + _defaults("arch") + ")")
    stage1.add_argument(
        "--width", type=float, help="channel multiplier, 1.0 for pretrained weights (" + _defaults("width") + ")"
    )
    stage1.add_argument(
        "--pretrained",
        metavar="WEIGHTS",
        help="'imagenet' or a local torchvision state_dict file (" + _defaults("pretrained") + ")",
    )
    stage1.add_argument(
        "--image-size",
        type=_positive_int,
        metavar="N",
        help="square image side in pixels (" + _defaults("image_size") + ")",
    )
    stage1.add_argument("--ae-epochs", type=int, metavar="N", help="epochs of stage 1 (" + _defaults("epochs") + ")")
    stage1.add_argument(
        "--ae-lr",
        type=float,
        metavar="LR",
        help="stage 1's SGD learning rate, cosine-annealed (" + _defaults("lr") + ")",
    )
    stage2 = train.add_argument_group("stage 2: Local Aggregation")
    stage2.add_argument("--la-epochs", type=int, metavar="N", help="epochs of LA (" + _defaults("epochs", 1) + ")")
    stage2.add_argument(
        "--la-lr", type=float, metavar="LR", help="LA's SGD learning rate, cosine-annealed (" + _defaults("lr", 1) + ")"
    )
    stage2.add_argument(
        "--temperature",
        type=float,
        metavar="T",
        help="τ of the LA loss: lower sharpens it (" + _defaults("temperature", 1) + ")",
    )
    stage2.add_argument(
        "--mixing-rate",
        type=float,
        metavar="M",
        help="weight of a fresh code in its memory-bank entry (" + _defaults("mixing_rate", 1) + ")",
    )
    stage2.add_argument(
        "--k-neighbours",
        type=int,
        metavar="K",
        help="background neighbours per image (" + _defaults("k_neighbours", 1) + ")",
    )
    stage2.add_argument(
        "--clustering-repeats",
        type=int,
        metavar="R",
        help="k-means runs whose clusters define close neighbours (" + _defaults("clustering_repeats", 1) + ")",
    )
    stage2.add_argument(
        "--n-centroids",
        type=int,
        metavar="C",
        help="clusters of each of those k-means runs (" + _defaults("n_centroids", 1) + ")",
    )
    stage2.add_argument(
        "--augment",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="random crops, flips and colour jitter during LA (" + _defaults("augment", 1) + ")",
    )
    train.add_argument("--batch-size", type=int, metavar="B", help="for both stages (" + _defaults("batch_size") + ")")
    train.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed of both stages: same seed, same data, same result (default: %(default)s)",
    )
    train.add_argument(
        "--device", default="auto", help="auto (CUDA when available), cpu, cuda, cuda:1 ... (default: %(default)s)"
    )
    train.add_argument(
        "--store",
        metavar="DIR",
        help="where trained auto-encoders are kept for reuse (default: ~/.cache/laray/autoencoders)",
    )
    train.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    train.set_defaults(run=_train)


def _add_sweep_command(commands) -> None:
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
    _add_data_options(sweep)
    sweep.add_argument("--num-samples", type=_positive_int, metavar="N", help="trials (default: the space's)")
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
        "--max-failures",
        type=int,
        default=2,
        metavar="N",
        help="restarts of a trial whose worker dies, from its last checkpoint (default: %(default)s)",
    )
    sweep.add_argument(
        "--holdout",
        type=_fraction,
        metavar="F",
        help="fraction of each species scored apart and never selected on, the unbiased estimate "
        "(default: the space's 'holdout', else 0.5; 0: none)",
    )
    sweep.add_argument(
        "--confirm-top",
        type=_count,
        metavar="K",
        help="re-run the K best configurations after the search (default: the space's "
        "'confirm_top', else 3; 0: no confirmation)",
    )
    sweep.add_argument(
        "--confirm-seeds",
        type=_count,
        metavar="S",
        help="...with S fresh seeds each (default: the space's 'confirm_seeds', else 5)",
    )
    sweep.add_argument(
        "--time-budget",
        type=_duration,
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
    sweep.add_argument(
        "--verbose",
        action="store_true",
        help="Ray Tune's own progress table and messages too, besides laray's line per trial event",
    )
    sweep.add_argument(
        "--dashboard", action="store_true", help="start Ray's dashboard on 127.0.0.1:8265 (needs the 'dashboard' extra)"
    )
    sweep.set_defaults(run=_sweep)


def add_experiment_options(parser) -> None:
    """The options of `laray analyze` that the analysis/ scripts share."""
    parser.add_argument("experiment", metavar="EXPERIMENT", help="the sweep's folder, STORAGE/NAME")
    parser.add_argument("--out", metavar="DIR", help="where to write (default: EXPERIMENT/analysis)")
    parser.add_argument(
        "--objective",
        default="purity",
        choices=("purity", "nmi", "ari", "acc"),
        help="what 'best trial' means (default: %(default)s)",
    )
    parser.add_argument("--cache-dir", metavar="DIR", help="decode cache folder (default: ~/.cache/laray)")


def _add_analysis_commands(commands) -> None:
    analyze = commands.add_parser(
        "analyze",
        help="score a finished or running sweep against the species labels and write the report",
        description="Score every trial of a sweep from its assignments.csv (purity, NMI, ARI, accuracy, and purity "
        "at 2x and 5x the species count), compare with the baselines, and write trials.csv, "
        "baselines.csv, per_species.csv, plots, a cluster montage of the best trial and report.md.",
    )
    add_experiment_options(analyze)
    analyze.add_argument(
        "--label-column",
        metavar="COL",
        help="score against another column of the data's CSV, e.g. genus (default: the labels the sweep used)",
    )
    analyze.add_argument(
        "--imagenet-weights",
        metavar="FILE",
        help="a local torchvision vgg16_bn state_dict: adds the ImageNet-VGG-codes baseline "
        "(default: none, no such baseline)",
    )
    analyze.set_defaults(run=_analyze)

    predict = commands.add_parser(
        "predict",
        help="assign new images to a trained trial's clusters",
        description="Encode images with a trial's encoder and assign each to the nearest of the trial's final "
        "cluster centroids. Writes path, cluster, distance. The images need no labels.",
    )
    predict.add_argument("--experiment", required=True, metavar="DIR", help="the sweep's folder, STORAGE/NAME")
    predict.add_argument("--trial", default="best", metavar="ID", help="a trial id (or prefix), or 'best' (default)")
    predict.add_argument("--data", required=True, metavar="SPEC", help="'digits', a folder of images, or a CSV file")
    predict.add_argument("--out", required=True, metavar="FILE.csv", help="where to write path, cluster, distance")
    predict.add_argument(
        "--path-column",
        default=DEFAULT_PATH_COLUMN,
        metavar="COL",
        help="CSV column holding the image path (default: %(default)s)",
    )
    predict.add_argument(
        "--image-root", metavar="DIR", help="folder that relative CSV paths resolve against (default: the CSV's folder)"
    )
    predict.add_argument(
        "--cache-dir", metavar="DIR", help="decode cache folder (default: $LARAY_CACHE_DIR, else ~/.cache/laray)"
    )
    predict.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: %(default)s)")
    predict.set_defaults(run=_predict)


def _command_group(commands, name: str, help_text: str):
    """A command whose sub-commands do the work (`laray data check`, `laray weights fetch`); alone, its help."""
    group = commands.add_parser(name, help=help_text, description=help_text[0].upper() + help_text[1:] + ".")
    group.set_defaults(parser=group)
    return group.add_subparsers(dest=f"{name}_command", metavar="COMMAND")


def _add_data_commands(commands) -> None:
    data_commands = _command_group(commands, "data", "inspect and validate data sets")
    check = data_commands.add_parser(
        "check",
        help="decode every image; print counts per label, image sizes and bad files",
        description="Decode every image of a data set and print the images per label, the original "
        "image sizes and a table of bad files with their reasons. Exits 0 when the data set "
        "is usable, 1 with a one-line reason when it is not (or, with --strict, when any file is bad).",
    )
    check.add_argument("spec", metavar="SPEC", help="'digits', a folder with one sub-folder per species, or a CSV file")
    _add_data_options(check)
    check.add_argument(
        "--image-size",
        type=_positive_int,
        default=64,
        metavar="N",
        help="decode at N x N pixels (default: %(default)s); a small size is enough to validate, "
        "and the decode cache is warmed only for this size",
    )
    check.add_argument("--strict", action="store_true", help="exit 1 when any file is bad")
    check.add_argument("--json", action="store_true", help="print only the report as JSON on stdout")
    check.add_argument("--workers", type=_positive_int, metavar="N", help="decoding processes (default: all cores)")
    check.set_defaults(run=_data_check)


def _add_weights_commands(commands) -> None:
    weights_commands = _command_group(commands, "weights", "ImageNet weights for nodes without internet")
    fetch = weights_commands.add_parser(
        "fetch",
        help="download torchvision's ImageNet weights of a VGG into a file",
        description="Download torchvision's ImageNet weights of a VGG (or take them from torch's cache) into FILE. "
        "Run it where there is internet, put FILE where every node can read it, and set "
        "'pretrained: FILE' in the space's autoencoder section (or --pretrained FILE for laray train).",
    )
    fetch.add_argument("arch", choices=ARCHS, help="the architecture: " + ", ".join(ARCHS))
    fetch.add_argument("--out", required=True, metavar="FILE", help="where to write the state_dict")
    fetch.set_defaults(run=_weights_fetch)


def _weights_fetch(args) -> int:
    from laray.method.weights import fetch

    path, size, digest = fetch(args.arch, args.out)
    print(f"wrote {path}: {size / 1e6:.1f} MB, sha256 {digest}")
    print(f"use it with 'pretrained: {path}' in a space's autoencoder section, or laray train --pretrained {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="laray",
        description="Find the Local Aggregation hyperparameters that cluster species photos best.",
    )
    parser.add_argument("--version", action="version", version=f"laray {__version__}")
    parser.set_defaults(parser=parser, run=None)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_data_commands(commands)
    _add_train_command(commands)
    _add_sweep_command(commands)
    _add_analysis_commands(commands)
    _add_weights_commands(commands)
    _add_debug_option(parser)
    return parser


def _fail(reason: str) -> int:
    print(f"laray: error: {reason}", file=sys.stderr)
    return 1


def _debugging(args) -> bool:
    return bool(getattr(args, "debug", False)) or os.environ.get("LARAY_DEBUG", "") not in ("", "0")


def _add_debug_option(parser: argparse.ArgumentParser) -> None:
    """--debug on the command and on every sub-command (`laray train --debug` as well as `laray --debug train`)."""
    parser.add_argument(
        "--debug",
        action="store_true",
        default=argparse.SUPPRESS,
        help="show the Python traceback of a failure (also LARAY_DEBUG=1)",
    )
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                _add_debug_option(sub)


def _data_check(args) -> int:
    from laray.data.check import check_dataset, format_report  # imports torch: only when the command runs

    report = check_dataset(
        args.spec,
        image_size=args.image_size,
        label_column=args.label_column,
        path_column=args.path_column,
        image_root=args.image_root,
        cache_dir=args.cache_dir,
        workers=args.workers,
    )
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    if not report["usable"]:
        return _fail(report["reason"])
    if args.strict and report["bad_files"]:
        return _fail(f"{report['n_skipped']} bad file(s) in {args.spec} (--strict)")
    return 0


def _format_record(record: dict) -> str:
    scores = " ".join(f"{k} {record[k]:.3f}" for k in ("purity", "nmi", "ari", "acc", "silhouette") if k in record)
    return (
        f"{record['stage']:>17} epoch {record['epoch']:>3}  loss {record['loss']:.4f}  {scores}  "
        f"{record['images_per_s']:.0f} img/s"
    )


def _check_device_name(device: str) -> None:
    """The form of --device, before torch is imported (whether this machine has it is checked after)."""
    kind, _, index = device.partition(":")
    if kind not in ("auto", "cpu", "cuda") or (index and (kind != "cuda" or not index.isdigit())):
        raise LarayError(f"--device {device}: not a device name; use auto, cpu, cuda or cuda:N")


def _train(args) -> int:
    from laray.data.dataref import describe
    from laray.settings.config import check_enough_images, load_config, replace
    from laray.settings.defaults import choose, fit_to_size, train_configs
    from laray.settings.space import load_space

    # Device name, settings and data listing first: a usage error costs no model built, nothing written.
    _check_device_name(args.device)
    choice = choose(
        args.data,
        cuda=_cuda_for_training(args.device),
        no_cuda_reason="no CUDA device here" if args.device == "auto" else f"--device {args.device}",
    )
    defaults = train_configs(load_space(choice.space))
    ae_cfg, la_cfg = defaults
    if args.config:
        ae_cfg, la_cfg = load_config(args.config, base=(ae_cfg, la_cfg))
    ae_cfg = replace(
        ae_cfg,
        arch=args.arch,
        width=args.width,
        pretrained=args.pretrained,
        image_size=args.image_size,
        epochs=args.ae_epochs,
        batch_size=args.batch_size,
        lr=args.ae_lr,
    )
    la_cfg = replace(
        la_cfg,
        epochs=args.la_epochs,
        lr=args.la_lr,
        temperature=args.temperature,
        mixing_rate=args.mixing_rate,
        k_neighbours=args.k_neighbours,
        clustering_repeats=args.clustering_repeats,
        n_centroids=args.n_centroids,
        augment=args.augment,
        batch_size=args.batch_size,
    )
    ref = describe(
        args.data,
        ae_cfg.image_size,
        label_column=args.label_column,
        path_column=args.path_column,
        image_root=args.image_root,
    )
    la_cfg = fit_to_size(la_cfg, defaults[1], len(ref))
    check_enough_images(len(ref), len(ref.class_names))
    la_cfg.check_data_size(len(ref))
    args.on_stop = f"continue from its last checkpoint with: {_command_again(args.argv, add=['--resume'])}"
    # The first line, once the settings hold: which bundled settings, why, and how to choose others.
    print(
        choice.announcement("--config FILE or the flags (laray train --help)")
        + (f"; --config {args.config} is laid over them" if args.config else ""),
        flush=True,
    )
    for note in ref.notes:
        logging.getLogger("laray.data.dataset").warning(note)

    from laray.data.dataset import open_dataset
    from laray.training.run import train_run
    from laray.training.stages import RunOptions, resolve_device

    device = resolve_device(args.device)  # a device this machine lacks: before anything is decoded or written
    dataset = open_dataset(ref, args.cache_dir)
    metrics = train_run(
        dataset,
        args.out,
        ae_cfg,
        la_cfg,
        store_dir=args.store,
        run=RunOptions(seed=args.seed, device=device, resume=args.resume, callback=lambda r: print(_format_record(r))),
    )
    final = " ".join(f"{k} {metrics[k]:.3f}" for k in ("purity", "nmi", "ari", "acc", "silhouette") if k in metrics)
    print(f"final: {final}")
    for name, scores in metrics["baselines"].items():
        print(f"baseline {name}: " + " ".join(f"{k} {v:.3f}" for k, v in scores.items()))
    print(f"wrote {args.out}/metrics.json, assignments.csv, codes.npy")
    return 0


def _cuda_for_training(device: str) -> bool:
    """Whether `laray train --device DEVICE` trains on CUDA (auto: when this machine has it)."""
    from laray.settings.defaults import cuda_available

    return cuda_available() if device == "auto" else device.startswith("cuda")


def _sweep_name(stem: str, storage: str, resume: bool) -> str:
    """A new sweep gets the space's name and the time; --resume picks the newest local sweep of that space."""
    import time
    from pathlib import Path

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
    from pathlib import Path

    from laray.data.dataref import DIGITS, describe
    from laray.settings.defaults import choose
    from laray.settings.space import load_space

    _check_device_name(args.device)
    if args.gpus_per_trial is None:  # a GPU per trial where this machine has one and the user did not say cpu
        args.gpus_per_trial = 1.0 if args.device != "cpu" and _cuda_for_training("auto") else 0.0
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
    again = _command_again(
        args.argv,
        drop={"--name": 1, "--num-samples": 1, "--resume": 0, "--warm-start": -1},
        add=["--resume", "--name", name],
    )
    args.on_stop = f"the sweep's state is saved; continue it with: {again}"
    from laray.sweep.driver import (  # torch and Ray: only once the arguments hold
        OPTUNA_DB,
        SweepRun,
        TrialResources,
        run_sweep,
    )
    from laray.sweep.ray_setup import ray_init

    ray_init(args.address, dashboard=args.dashboard, quiet=not args.verbose)
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
        ),
        trial=TrialResources(
            cpus=args.cpus_per_trial, gpus=args.gpus_per_trial, device=args.device, cache_dir=args.cache_dir
        ),
    )
    print(f"\n{result.n_trials} trials ({result.n_errored} errored) in {result.experiment}")
    if result.best_config is None:
        return _fail("no trial reported a score")
    _print_search_best(result, space)
    if result.confirmed:
        _print_confirmed(result, space)
    print(f"\nresults in {result.experiment}: best.json, optuna.db, one folder per trial")
    print("next:")
    print(f"  laray analyze {result.experiment}      # report.md, tables and pictures")
    print(f"  tensorboard --logdir {result.experiment}")
    print(f"  optuna-dashboard sqlite:///{result.experiment / OPTUNA_DB}")
    return 0


def _command_again(argv: list[str], drop: dict[str, int] | None = None, add: list[str] = ()) -> str:
    """The command line `laray ARGV`, without the options in `drop` (name -> number of values, -1: all up to the
    next option), with `add`."""
    kept, skip = [], 0
    for token in argv:
        name = token.split("=", 1)[0]
        if skip < 0:  # the values of an option with any number of them
            if not token.startswith("-"):
                continue
            skip = 0
        if skip > 0:
            skip -= 1
        elif name in (drop or {}):
            skip = drop[name] if "=" not in token else 0
        elif token not in add or not token.startswith("--"):
            kept.append(token)
    return shlex.join(["laray", *kept, *add])


def _print_search_best(result, space) -> None:
    part = " on the selection part" if space.la.holdout else ""
    print(f"best trial of the search ({space.objective}{part}, one seed):")
    for key, value in result.best_config.items():
        print(f"  {key:<20} {value:.4g}" if isinstance(value, float) else f"  {key:<20} {value}")
    raw, codes = result.baselines["raw_pixels"], result.baselines["autoencoder"]
    codes_label = "on the untrained encoder" if space.ae.epochs == 0 else "on the auto-encoder codes"
    print(f"  {'':<20} {'best trial':>10} {'k-means on raw pixels':>22} {codes_label:>26}")
    for key in ("purity", "nmi", "ari", "acc", "heldout_purity"):
        if key in result.best_metrics:
            print(
                f"  {key:<20} {result.best_metrics[key]:>10.3f} {raw.get(key, float('nan')):>22.3f} "
                f"{codes.get(key, float('nan')):>26.3f}"
            )


SHORT = {
    "temperature": "tau",
    "mixing_rate": "m",
    "k_neighbours": "k",
    "clustering_repeats": "R",
    "n_centroids": "C",
}  # the method's symbols, so that a configuration fits on one line


def _print_confirmed(result, space) -> None:
    """The confirmed configurations (mean, 95 % interval over seeds, held-out mean) beside the baselines."""
    from laray.results.report import baseline_names

    objective = space.objective
    seeds = result.confirmed[0]["seeds"]
    print(f"\nconfirmed: {len(result.confirmed)} configuration(s) x {len(seeds)} seeds {seeds}, by mean {objective}:")
    rows = [
        (
            f"#{i + 1} "
            + " ".join(
                f"{SHORT.get(k, k)}={v:.3g}" if isinstance(v, float) else f"{SHORT.get(k, k)}={v}"
                for k, v in entry["config"].items()
            ),
            entry,
        )
        for i, entry in enumerate(result.confirmed)
    ]
    rows += [
        ("k-means on raw pixels", result.confirmed_baselines["raw_pixels"]),
        (baseline_names(space.ae.epochs)["autoencoder"], result.confirmed_baselines["autoencoder"]),
    ]
    print(f"  {'':<60} {'mean':>6} {'sd':>6} {'95 % interval':>15} {'held-out':>9}")
    for label, entry in rows:
        interval = entry.get(f"{objective}_ci95")
        shown = f"[{interval[0]:.3f}, {interval[1]:.3f}]" if interval else "n/a"
        held = entry.get(f"heldout_{objective}_mean")
        print(
            f"  {label[:60]:<60} {entry[f'{objective}_mean']:>6.3f} {entry[f'{objective}_sd']:>6.3f} "
            f"{shown:>15} {'' if held is None else f'{held:.3f}':>9}"
        )
    winner = result.confirmed[0]
    held = winner.get(f"heldout_{objective}_mean")
    print(
        f"winner: #1, mean {objective} {winner[f'{objective}_mean']:.3f}"
        + (
            f"; held-out {objective} {held:.3f} (the estimate to report: no choice was made on it)"
            if held is not None
            else ""
        )
    )
    if result.margin and result.margin["seeds"]:
        from laray.scoring.confirm import describe_margin

        print(describe_margin(result.margin, objective))


def _analyze(args) -> int:
    from laray.results.report import analyze

    report = analyze(
        args.experiment,
        args.out,
        label_column=args.label_column,
        objective=args.objective,
        imagenet_weights=args.imagenet_weights,
        cache_dir=args.cache_dir,
    )
    confirmed = ", confirmed.csv" if (report.parent / "confirmed.csv").exists() else ""
    print(f"wrote {report.parent}: report.md, trials.csv{confirmed}, baselines.csv, plots")
    return 0


def _predict(args) -> int:
    from laray.results.predict import predict

    frame = predict(
        args.experiment,
        args.data,
        args.out,
        trial=args.trial,
        device=args.device,
        cache_dir=args.cache_dir,
        image_root=args.image_root,
        path_column=args.path_column,
    )
    print(f"wrote {args.out}: {len(frame)} images in {frame['cluster'].nunique()} clusters")
    return 0


def _show_warning(message, category, filename, lineno, file=None, line=None, shown=warnings.showwarning) -> None:
    """laray's DataWarning as a log line like the others, without the Python source line; other warnings as usual."""
    from laray.errors import DataWarning

    if issubclass(category, DataWarning):
        logging.getLogger("laray.data.dataset").warning("%s", message)
    else:
        shown(message, category, filename, lineno, file, line)


def _configure_logging(level: int) -> None:
    """laray's log lines (counts loaded and skipped, warnings) to stderr; one handler however often main runs."""
    warnings.showwarning = _show_warning
    logger = logging.getLogger("laray")
    for handler in [h for h in logger.handlers if getattr(h, "laray_cli", False)]:
        logger.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)  # the current stderr, which tests may have swapped
    handler.laray_cli = True
    handler.setFormatter(logging.Formatter("%(name)s: %(levelname)s: %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(level)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.run is None:  # `laray` or `laray data` alone: show what there is
        args.parser.print_help()
        return 0
    _configure_logging(logging.WARNING if getattr(args, "json", False) else logging.INFO)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    from laray.interrupt import StopRequested, handling_stop_signals, requested

    try:
        with handling_stop_signals():
            return args.run(args)
    except KeyboardInterrupt as exc:  # Ctrl-C or SIGTERM (laray.interrupt): one line, the status a shell reports
        if _debugging(args):
            raise
        # Ray's get turns the StopRequested it was interrupted by into a plain KeyboardInterrupt
        signum = exc.signum if isinstance(exc, StopRequested) else requested() or signal.SIGINT
        on_stop = getattr(args, "on_stop", None)
        if "laray.sweep.ray_setup" in sys.modules:  # now, not at exit: the lines Ray still forwards come before ours
            sys.modules["laray.sweep.ray_setup"].shutdown_ray()
        print(
            f"laray: stopped by {signal.Signals(signum).name}" + (f"; {on_stop}" if on_stop else ""),
            file=sys.stderr,
            flush=True,
        )
        return 128 + signum
    except (LarayError, OSError) as exc:  # expected: bad input, a full disk, a running sweep (laray.errors)
        if _debugging(args):
            raise
        return _fail(_one_line(exc))
    except Exception as exc:  # a bug: its traceback; raised inside a Ray task, one line with its cause
        if _debugging(args) or _raised_in(exc) is None:
            raise
        return _fail(_one_line(exc))


def _raised_in(exc: BaseException) -> str | None:
    """The Ray task or actor an error was raised in (Ray wraps it; its first line names the task), else None."""
    if getattr(exc, "cause", None) is None or not type(exc).__name__.startswith(("RayTaskError", "RayActorError")):
        return None
    import re

    named = re.search(r"ray::([\w.]+)", str(exc))  # "\x1b[36mray::_stage1_task()\x1b[39m (pid=..., ip=...)"
    return f"Ray task {named.group(1)}" if named else "a Ray task"


def _one_line(exc: BaseException) -> str:
    """The error's first line; for one raised inside a Ray task, its cause's, with the task named."""
    where = _raised_in(exc)
    if where is not None:
        cause = exc.cause
        text = str(cause).strip().splitlines()[0] if str(cause).strip() else ""
        expected = isinstance(cause, (LarayError, OSError))
        return (
            f"{text or type(cause).__name__} (in {where})"
            if expected
            else f"{type(cause).__name__} in {where}: {text} (--debug shows the traceback)"
        )
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


if __name__ == "__main__":
    sys.exit(main())
