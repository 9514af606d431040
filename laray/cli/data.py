"""`laray data check` and `laray weights fetch`: a data set validated, and ImageNet weights kept in a file for nodes
without internet."""

from __future__ import annotations

import json

from laray.cli.options import add_data_options, fail, positive_int
from laray.settings.config import ARCHS


def _command_group(commands, name: str, help_text: str):
    """A command whose sub-commands do the work (`laray data check`, `laray weights fetch`); alone, its help."""
    group = commands.add_parser(name, help=help_text, description=help_text[0].upper() + help_text[1:] + ".")
    group.set_defaults(parser=group)
    return group.add_subparsers(dest=f"{name}_command", metavar="COMMAND")


def add_data_commands(commands) -> None:
    data_commands = _command_group(commands, "data", "inspect and validate data sets")
    check = data_commands.add_parser(
        "check",
        help="decode every image; print counts per label, image sizes and bad files",
        description="Decode every image of a data set and print the images per label, the original "
        "image sizes and a table of bad files with their reasons. Exits 0 when the data set "
        "is usable, 1 with a one-line reason when it is not (or, with --strict, when any file is bad).",
    )
    check.add_argument("spec", metavar="SPEC", help="'digits', a folder with one sub-folder per species, or a CSV file")
    add_data_options(check)
    check.add_argument(
        "--image-size",
        type=positive_int,
        default=64,
        metavar="N",
        help="decode at N x N pixels (default: %(default)s); a small size is enough to validate, "
        "and the decode cache is warmed only for this size",
    )
    check.add_argument("--strict", action="store_true", help="exit 1 when any file is bad")
    check.add_argument("--json", action="store_true", help="print only the report as JSON on stdout")
    check.add_argument("--workers", type=positive_int, metavar="N", help="decoding processes (default: all cores)")
    check.set_defaults(run=_data_check)


def add_weights_commands(commands) -> None:
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
        return fail(report["reason"])
    if args.strict and report["bad_files"]:
        return fail(f"{report['n_skipped']} bad file(s) in {args.spec} (--strict)")
    return 0
