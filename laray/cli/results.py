"""`laray analyze` and `laray predict`: what a sweep's trials tell, and a trained trial's clusters for new images."""

from __future__ import annotations

from laray.cli.options import add_experiment_options
from laray.data.sources import DEFAULT_PATH_COLUMN


def add_analysis_commands(commands) -> None:
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
        help="a local torchvision vgg16_bn state_dict: adds the ImageNet-VGG-codes baseline, unless the sweep's "
        "stage 1 started from these weights: its pretrained baseline scores them already "
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


def check_sweep_folder(experiment: str) -> None:
    """Refuse, before torch is imported, a folder that holds no sweep's trials: in well under a second, with what
    to give instead (the folder `laray sweep` names at its end)."""
    from pathlib import Path

    from laray.errors import LarayError

    folder = Path(experiment).expanduser()
    if not folder.is_dir():
        raise LarayError(f"{experiment}: no such folder; give a sweep's folder, STORAGE/NAME (laray sweep prints it)")
    if next(folder.glob("*/params.json"), None) is None:
        sweeps = sorted(p.parent.name for p in folder.glob("*/best.json"))[-3:]
        hint = f"; sweeps in it: {', '.join(sweeps)}" if sweeps else ""
        raise LarayError(
            f"{experiment} is no laray sweep (no trial folders with params.json): give the folder `laray sweep` "
            f"prints at its end, STORAGE/NAME, e.g. ~/laray_results/demo-20261207-093000{hint}"
        )


def _analyze(args) -> int:
    check_sweep_folder(args.experiment)
    from laray.results.report import analyze
    from laray.threads import size_threads

    size_threads()  # the cores this process may use (laray.threads)

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
    check_sweep_folder(args.experiment)
    from laray.results.predict import predict
    from laray.threads import size_threads

    size_threads()

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
