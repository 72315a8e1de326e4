"""The one exception type for bad user input: the CLI prints it as one line, the service as a 4xx.

Every UserError is chained to what caused it (`raise ... from exc`). With AGE_GENDER_DEBUG=1 (the CLIs'
--debug sets it) the places that answer errors re-raise them instead, traceback and cause included.
"""

import os

DEBUG_ENV = "AGE_GENDER_DEBUG"
TRUE, FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")  # how settings spell a switch


def debugging() -> bool:
    """AGE_GENDER_DEBUG=1 (or true, yes, on): errors are re-raised with their traceback where they would be
    answered."""
    return os.environ.get(DEBUG_ENV, "").strip().lower() in TRUE


class UserError(Exception):
    """Something the user asked for or supplied is wrong; the message says what and what is allowed."""


def about(exc: UserError, what: str, i: int, of: int) -> UserError:
    """exc, its message naming which of `of` inputs (`file #2: ...`) it is about when there are several."""
    return type(exc)(f"{what} #{i + 1}: {exc}" if of > 1 else str(exc))


class TooLarge(UserError):
    """Input over a configured size limit (the service answers HTTP 413)."""


class NotAnImage(UserError):
    """Bytes that are not an image in an accepted format (the service answers HTTP 415)."""


KINDS = {kind.__name__: kind for kind in (UserError, TooLarge, NotAnImage)}


class Interrupted(Exception):
    """A run stopped on request (a signal) with its state saved; the CLI prints the message and exits `code`."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


def as_data(call) -> dict:
    """call() -> its dict, or a UserError it raised as {"error", "kind"} (one of KINDS): how one crosses from
    a worker process to the API process (BentoML would turn a raised exception into a 500); `raised` undoes
    it."""
    try:
        return call()
    except UserError as exc:
        kind = next(k.__name__ for k in type(exc).__mro__ if k.__name__ in KINDS)  # its own, or what it extends
        return {"error": str(exc), "kind": kind}


def raised(answer: dict) -> dict:
    """The inverse of as_data: the dict, or its UserError raised again as the same kind."""
    if "error" in answer:
        raise KINDS[answer["kind"]](answer["error"])
    return answer
