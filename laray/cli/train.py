"""`laray train`: one run of both stages with one set of hyperparameters, its options and what it prints."""

from __future__ import annotations

import argparse
import logging
import time

from laray.cli.options import (
    add_data_options,
    add_precision_option,
    check_device_name,
    command_again,
    cuda_for_training,
    positive_int,
)
from laray.score_names import SCORE_NAMES
from laray.settings.duration import duration as readable


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


def add_train_command(commands) -> None:
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
    add_data_options(train)
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
        type=positive_int,
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
    add_precision_option(train, "the one --config sets")
    train.add_argument(
        "--store",
        metavar="DIR",
        help="where trained auto-encoders are kept for reuse (default: ~/.cache/laray/autoencoders)",
    )
    train.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    train.add_argument(
        "--plan",
        action="store_true",
        help="print the plan (the work counted, the expected wall time measured on this machine) and exit, "
        "writing nothing",
    )
    train.set_defaults(run=_train)


def _format_record(record: dict) -> str:
    scores = " ".join(f"{k} {record[k]:.3f}" for k in SCORE_NAMES if k in record)
    return (
        f"{record['stage']:>17} epoch {record['epoch']:>3}  loss {record['loss']:.4f}  {scores}  "
        f"{record['images_per_s']:.0f} img/s"
    )


def _print_progress(progress) -> None:
    """An in-epoch line (laray.training.epoch_progress) above tqdm's bar, at once also when stdout is a log file."""
    import sys

    from tqdm.auto import tqdm

    tqdm.write(str(progress))
    sys.stdout.flush()


def _train(args) -> int:
    from laray.data.dataref import describe
    from laray.settings.config import check_enough_images, load_config, replace
    from laray.settings.defaults import choose, fit_to_size, train_configs
    from laray.settings.space import load_space
    from laray.training.epoch_progress import progress_interval_s  # torch-free

    # Device name, settings and data listing first: a usage error costs no model built, nothing written.
    check_device_name(args.device)
    progress_s = progress_interval_s()  # a bad $LARAY_PROGRESS_S too
    choice = choose(
        args.data,
        cuda=cuda_for_training(args.device),
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
        precision=args.precision,
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
        precision=args.precision,
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
    args.on_stop = f"continue from its last checkpoint with: {command_again(args.argv, add=['--resume'])}"
    # The first line, once the settings hold: which bundled settings, why, and how to choose others.
    print(
        choice.announcement("--config FILE or the flags (laray train --help)")
        + (f"; --config {args.config} is laid over them" if args.config else ""),
        flush=True,
    )
    for note in ref.notes:
        logging.getLogger("laray.data.dataset").warning(note)

    from laray.data.dataset import open_dataset
    from laray.threads import size_threads
    from laray.training.run import train_run
    from laray.training.stages import RunOptions, resolve_device

    size_threads()  # the cores this process may use (its CPU affinity), the plan's timings too (laray.threads)

    device = resolve_device(args.device)  # a device this machine lacks: before anything is decoded or written
    estimated_s = _plan(args, ref, ae_cfg, la_cfg, device)
    if args.plan:
        return 0
    began = time.monotonic()
    dataset = open_dataset(ref, args.cache_dir)
    metrics = train_run(
        dataset,
        args.out,
        ae_cfg,
        la_cfg,
        store_dir=args.store,
        run=RunOptions(
            seed=args.seed,
            device=device,
            resume=args.resume,
            callback=lambda r: print(_format_record(r)),
            on_progress=_print_progress,
            progress_s=progress_s,
        ),
    )
    final = " ".join(f"{k} {metrics[k]:.3f}" for k in SCORE_NAMES if k in metrics)
    print(f"final: {final}")
    for name, scores in metrics["baselines"].items():
        print(f"baseline {name}: " + " ".join(f"{k} {v:.3f}" for k, v in scores.items()))
    print(f"wrote {args.out}/metrics.json, assignments.csv, codes.npy")
    print(f"took {readable(time.monotonic() - began)}; the plan said {readable(estimated_s)}")
    return 0


def _plan(args, ref, ae_cfg, la_cfg, device) -> float:
    """Print `laray train`'s plan (stage 1 counted only when the store lacks it); its expected seconds."""
    from laray.data.cache import has_entry
    from laray.training.plan import DECODE_SAMPLE, count_run, measure, train_plan_lines
    from laray.training.run import store_folder
    from laray.training.store import WEIGHTS, store_key

    # Where train_run will look: the same folders, the same names.
    stored = (store_folder(args.store) / store_key(ref.key, ae_cfg, args.seed) / WEIGHTS).exists()
    decoded = not ref.paths or has_entry(ref.key, args.cache_dir)
    print(f"plan: timing each kind of step on {device}...", flush=True)
    costs = measure(
        ae_cfg,
        la_cfg,
        len(ref),
        max(1, len(ref.class_names)),
        device,
        decode_sample=[] if decoded else list(ref.paths[:DECODE_SAMPLE]),
        worker_start=0.0,  # laray train runs in this process
    )
    total, lines = train_plan_lines(
        count_run(len(ref), ae_cfg, la_cfg, stage1=not stored), costs, ae_cfg, la_cfg, str(device)
    )
    print("\n".join(lines), flush=True)
    return total
