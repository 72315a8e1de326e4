"""What the two command lines (`python -m training`, `python -m predict`) share: one-line errors, exit codes,
--debug, the interval-level argument."""

from __future__ import annotations

import argparse
import os
import sys
from typing import NoReturn

from models.errors import DEBUG_ENV, Interrupted, UserError, debugging
from models.outputs import check_level


class OneLineParser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line instead of usage + message
        self.exit(2, f"error: {message} (see `{self.prog} --help`)\n")


class Debug(argparse.Action):
    """--debug: errors with their traceback and cause instead of one line (sets AGE_GENDER_DEBUG=1, which
    the processes this one starts inherit)."""

    def __init__(self, option_strings, dest, **kwargs) -> None:
        help = f"errors with their traceback (or {DEBUG_ENV}=1)"
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, help=help)

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        os.environ[DEBUG_ENV] = "1"


def level(raw: str) -> float:
    """argparse type of an interval level: a float in 0.5-0.98."""
    try:
        return check_level(float(raw))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def at_least(low: int):
    """argparse type of an integer option: at least `low`."""

    def parse(raw: str) -> int:
        if int(raw) < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, not {raw}")
        return int(raw)

    parse.__name__ = "integer"  # argparse names the type in its message for a value that is not one
    return parse


def more_than(low: float):
    """argparse type of a number option: more than `low`."""

    def parse(raw: str) -> float:
        if not float(raw) > low:
            raise argparse.ArgumentTypeError(f"must be more than {low:g}, not {raw}")
        return float(raw)

    parse.__name__ = "number"
    return parse


def fraction(raw: str) -> float:
    """argparse type of a probability option: a number in 0-1."""
    if not 0 <= float(raw) <= 1:  # nan too
        raise argparse.ArgumentTypeError(f"must be 0-1, not {raw}")
    return float(raw)


def exit_code(command, interrupted: str = "interrupted") -> int:
    """Run a command: 0; a UserError, or a file or folder that cannot be read or written (OSError): one
    `error:` line on stderr and 2 (debugging: raised, with its traceback); Ctrl-C: 130; a run stopped by a
    signal with its state saved (Interrupted): its line and 128 + the signal's number."""
    try:
        command()
    except (UserError, OSError) as exc:
        if debugging():
            raise
        where = f"{exc.filename}: {exc.strerror}" if isinstance(exc, OSError) and exc.filename else exc
        print(f"error: {where}", file=sys.stderr)
        return 2
    except Interrupted as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.code
    except KeyboardInterrupt:
        print(f"error: {interrupted}", file=sys.stderr)
        return 130
    return 0
