"""The `laray` command: its parser, built from one module per command group, and how a command's failure shows."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import warnings

from laray import __version__
from laray.cli.dashboard import add_dashboard_command
from laray.cli.data import add_data_commands, add_weights_commands
from laray.cli.options import fail
from laray.cli.results import add_analysis_commands
from laray.cli.sweep import add_sweep_command
from laray.cli.train import add_train_command
from laray.errors import LarayError


class OneLineParser(argparse.ArgumentParser):
    """A usage error in one line that names the bad value and where to read the usage; exit status 2, as argparse's.

    argparse prints the whole usage block above its message: eleven lines for `laray sweep`, in which the
    message is the last. Sub-commands' parsers are of the same class (add_subparsers takes the parent's).
    """

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="laray",
        description="Find the Local Aggregation hyperparameters that cluster species photos best.",
    )
    parser.add_argument("--version", action="version", version=f"laray {__version__}")
    parser.set_defaults(parser=parser, run=None)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    add_data_commands(commands)
    add_train_command(commands)
    add_sweep_command(commands)
    add_analysis_commands(commands)
    add_dashboard_command(commands)
    add_weights_commands(commands)
    _add_debug_option(parser)
    return parser


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
        return fail(_one_line(exc))
    except Exception as exc:  # a bug: its traceback; raised inside a Ray task, one line with its cause
        if _debugging(args) or _raised_in(exc) is None:
            raise
        return fail(_one_line(exc))


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
