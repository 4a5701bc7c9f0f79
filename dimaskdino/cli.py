"""Command-line plumbing shared by train, evaluate and predict: bad input is ONE line on stderr
and a non-zero exit, never a traceback (set DIMASKDINO_DEBUG=1 to get the traceback).

"Bad input" is what the user can fix: an unknown or mistyped config key or argument, a missing
or malformed file, a checkpoint that does not verify, a run that diverged. Anything else is a bug
and keeps its traceback.

Under torchrun every process runs the same argument and file checks, so rank 0 prints the line
at once and the other ranks wait a few seconds before printing theirs: torchrun stops them as
soon as rank 0 has exited, so the line appears once, and an error that only another rank saw
is still printed. torchrun's launcher then adds its own "ChildFailedError" report (its
traceback, not ours), which a worker cannot suppress; `python -m dimaskdino.train` (one process,
no torchrun needed) prints the line alone.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import traceback
from typing import Callable

DEBUG_VARIABLE = "DIMASKDINO_DEBUG"

# Exit codes: 2 = bad input (as argparse), 3 = the training diverged.
EXIT_BAD_INPUT = 2
EXIT_DIVERGED = 3


class CliError(Exception):
    """A user-fixable problem; its message is the whole report."""

    exit_code = EXIT_BAD_INPUT


class TrainingDiverged(CliError):
    """Too many consecutive steps with a non-finite loss or gradient norm."""

    exit_code = EXIT_DIVERGED


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose usage errors raise CliError (one line) instead of printing usage + error."""

    def error(self, message: str):
        raise CliError(f"{self.prog}: {message} (see --help)")


def one_line(message: str) -> str:
    """A message on one line (config validation lists several problems)."""
    return "; ".join(part.strip() for part in str(message).splitlines() if part.strip())


def error_message(error: BaseException) -> str:
    """The user-facing text of an exception: KeyError's repr quotes are dropped."""
    if isinstance(error, KeyError) and error.args:
        return one_line(str(error.args[0]))
    return one_line(str(error))


# Seconds a rank other than 0 waits before printing its error (see the module docstring).
OTHER_RANK_GRACE_S = 5.0


def _report(message: str) -> None:
    rank = os.environ.get("RANK", "0")
    if rank != "0":
        time.sleep(OTHER_RANK_GRACE_S)
        message = f"[rank {rank}] {message}"
    print(message, file=sys.stderr, flush=True)


def debug_enabled() -> bool:
    return os.environ.get(DEBUG_VARIABLE, "") not in ("", "0")


# Exceptions reported as one line. FileNotFoundError / ValueError / KeyError: missing files,
# malformed json (CocoFormatError is a ValueError), bad config values and keys.
USER_ERRORS = (CliError, FileNotFoundError, NotADirectoryError, PermissionError, ValueError, KeyError)


def run_cli(main_fn: Callable[[], int | None]) -> int:
    """Runs a CLI main and returns its exit code: a user error is one `error:` line on stderr (on
    rank 0) and a non-zero code; with DIMASKDINO_DEBUG=1 its traceback is printed too."""
    try:
        return main_fn() or 0
    except USER_ERRORS as error:
        if debug_enabled():
            traceback.print_exc()
        _report(f"error: {error_message(error)}")
        code = getattr(error, "exit_code", EXIT_BAD_INPUT)
        if "TORCHELASTIC_RUN_ID" in os.environ:
            # A torchrun worker leaves at once (no interpreter teardown of loader threads), so
            # that torchrun stops the other ranks before their grace period ends.
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
        return code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr, flush=True)
        return 130
