"""The boundary between a user's mistake and a bug, shared by the command-line entry points.

A mistake of the user's (an option, a file, a checkpoint, a device, data) raises
``UsageError`` (or one of the library's ValueErrors that name the problem, such as
``fpkern.data.formats.DataFormatError``); ``cli_boundary`` turns it into one line on stderr,
``<prog>: error: <message>``, and exit status 2, argparse's own convention. Anything else is a
bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import functools
import sys
from typing import Callable, Sequence

__all__ = ["UsageError", "ArgumentParser", "cli_boundary", "USAGE_EXIT"]

#: the exit status of a user mistake (argparse's)
USAGE_EXIT = 2


class UsageError(ValueError):
    """A mistake of the user's; the message names the option or file and what is wrong."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser whose mistakes (an unknown option, a bad value, a missing argument)
    raise UsageError, so that they too come out as one line at the boundary."""

    def error(self, message: str):
        raise UsageError(message)


def _one_line(e: BaseException) -> str:
    text = str(e) or type(e).__name__
    return " ".join(text.split())


def cli_boundary(prog: str, user_errors: Sequence[type[BaseException]] = (ValueError,)):
    """Decorate a ``main(argv) -> int``: the exceptions in ``user_errors`` (ValueError and
    its subclasses by default, UsageError among them) exit ``USAGE_EXIT`` with one line."""
    catch = tuple(user_errors) + (UsageError,)

    def wrap(main: Callable[..., int]) -> Callable[..., int]:
        @functools.wraps(main)
        def run(*args, **kwargs) -> int:
            try:
                return main(*args, **kwargs)
            except catch as e:
                print(f"{prog}: error: {_one_line(e)}", file=sys.stderr)
                return USAGE_EXIT
        return run
    return wrap
