"""What several commands share: argument types, the data and experiment options, the --device checks, the command
line that continues a run, and the one-line failure."""

from __future__ import annotations

import argparse
import shlex
import sys

from laray.data.sources import DEFAULT_LABEL_COLUMN, DEFAULT_PATH_COLUMN
from laray.errors import LarayError
from laray.score_names import LABEL_SCORES
from laray.settings.config import PRECISIONS


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


positive_int, count = _int_at_least(1), _int_at_least(0)


def fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {value}")
    return value


def duration(text: str) -> float:
    from laray.settings.duration import BudgetError, parse_duration

    try:
        return parse_duration(text)
    except BudgetError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_data_options(parser) -> None:
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


def add_precision_option(parser, where: str) -> None:
    """--precision of `laray train` and `laray sweep`: both stages' (laray.settings.config.PRECISIONS).

    where: what sets it when the flag is not given ("--config", "the space's fixed settings").
    """
    parser.add_argument(
        "--precision",
        choices=PRECISIONS,
        help="bf16 (bf16 autocast and channels_last) or fp32 for both stages, on any device; bf16 on a CPU is "
        f"slower, for running the mixed-precision code path (default: {where}, else auto: bf16 on CUDA, "
        "fp32 on the CPU)",
    )


def add_experiment_options(parser) -> None:
    """The options of `laray analyze` that the analysis/ scripts share."""
    parser.add_argument("experiment", metavar="EXPERIMENT", help="the sweep's folder, STORAGE/NAME")
    parser.add_argument("--out", metavar="DIR", help="where to write (default: EXPERIMENT/analysis)")
    parser.add_argument(
        "--objective",
        default="purity",
        choices=LABEL_SCORES,
        help="what 'best trial' means (default: %(default)s)",
    )
    parser.add_argument("--cache-dir", metavar="DIR", help="decode cache folder (default: ~/.cache/laray)")


def check_device_name(device: str) -> None:
    """The form of --device, before torch is imported (whether this machine has it is checked after)."""
    kind, _, index = device.partition(":")
    if kind not in ("auto", "cpu", "cuda") or (index and (kind != "cuda" or not index.isdigit())):
        raise LarayError(f"--device {device}: not a device name; use auto, cpu, cuda or cuda:N")


def cuda_for_training(device: str) -> bool:
    """Whether `laray train --device DEVICE` trains on CUDA (auto: when this machine has it)."""
    from laray.settings.defaults import cuda_available

    return cuda_available() if device == "auto" else device.startswith("cuda")


def command_again(argv: list[str], drop: dict[str, int] | None = None, add: list[str] = ()) -> str:
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


def fail(reason: str) -> int:
    print(f"laray: error: {reason}", file=sys.stderr)
    return 1
