"""The `laray` command. It only parses arguments and calls library functions."""
from __future__ import annotations

import argparse
import json
import logging
import sys

from laray import __version__
from laray.sources import DEFAULT_LABEL_COLUMN, DEFAULT_PATH_COLUMN


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _add_data_commands(commands) -> None:
    data = commands.add_parser("data", help="inspect and validate data sets",
                               description="Inspect and validate data sets.")
    data.set_defaults(parser=data)
    data_commands = data.add_subparsers(dest="data_command", metavar="COMMAND")
    check = data_commands.add_parser(
        "check", help="decode every image; print counts per label, image sizes and bad files",
        description="Decode every image of a data set and print the images per label, the original "
                    "image sizes and a table of bad files with their reasons. Exits 0 when the data set "
                    "is usable, 1 with a one-line reason when it is not (or, with --strict, when any file is bad).")
    check.add_argument("spec", metavar="SPEC",
                       help="'digits', a folder with one sub-folder per species, or a CSV file")
    check.add_argument("--label-column", default=DEFAULT_LABEL_COLUMN, metavar="COL",
                       help="CSV column holding the label (default: %(default)s; when absent, data load unlabelled)")
    check.add_argument("--path-column", default=DEFAULT_PATH_COLUMN, metavar="COL",
                       help="CSV column holding the image path (default: %(default)s)")
    check.add_argument("--image-root", metavar="DIR",
                       help="folder that relative CSV paths resolve against (default: the CSV's folder)")
    check.add_argument("--image-size", type=_positive_int, default=64, metavar="N",
                       help="decode at N x N pixels (default: %(default)s); a small size is enough to validate, "
                            "and the decode cache is warmed only for this size")
    check.add_argument("--strict", action="store_true", help="exit 1 when any file is bad")
    check.add_argument("--json", action="store_true", help="print only the report as JSON on stdout")
    check.add_argument("--cache-dir", metavar="DIR", help="decode cache folder (default: ~/.cache/laray)")
    check.add_argument("--workers", type=_positive_int, metavar="N", help="decoding processes (default: all cores)")
    check.set_defaults(run=_data_check)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="laray",
        description="Find the Local Aggregation hyperparameters that cluster species photos best.",
    )
    parser.add_argument("--version", action="version", version=f"laray {__version__}")
    parser.set_defaults(parser=parser, run=None)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_data_commands(commands)
    return parser


def _fail(reason: str) -> int:
    print(f"laray: error: {reason}", file=sys.stderr)
    return 1


def _data_check(args) -> int:
    from laray.check import check_dataset, format_report  # imports torch: only when the command runs

    report = check_dataset(args.spec, image_size=args.image_size, label_column=args.label_column,
                           path_column=args.path_column, image_root=args.image_root, cache_dir=args.cache_dir,
                           workers=args.workers)
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    if not report["usable"]:
        return _fail(report["reason"])
    if args.strict and report["bad_files"]:
        return _fail(f"{report['n_skipped']} bad file(s) in {args.spec} (--strict)")
    return 0


def _configure_logging(level: int) -> None:
    """laray's log lines (counts loaded and skipped, warnings) to stderr; one handler however often main runs."""
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
    try:
        return args.run(args)
    except OSError as exc:  # e.g. an unwritable cache folder: a reason, not a traceback
        return _fail(str(exc))


if __name__ == "__main__":
    sys.exit(main())
