"""What the two command lines (`python -m training`, `python -m predict`) share: one-line errors, exit codes,
the interval-level argument."""

from __future__ import annotations

import argparse
import sys
from typing import NoReturn

from models.errors import Interrupted, UserError
from models.outputs import check_level


class OneLineParser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line instead of usage + message
        self.exit(2, f"error: {message} (see `{self.prog} --help`)\n")


def level(raw: str) -> float:
    """argparse type of an interval level: a float in 0.5-0.98."""
    try:
        return check_level(float(raw))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def exit_code(command, interrupted: str = "interrupted") -> int:
    """Run a command: 0; a UserError: its one `error:` line on stderr and 2; Ctrl-C: 130; a run stopped by a
    signal with its state saved (Interrupted): its line and 128 + the signal's number."""
    try:
        command()
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except Interrupted as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.code
    except KeyboardInterrupt:
        print(f"error: {interrupted}", file=sys.stderr)
        return 130
    return 0
