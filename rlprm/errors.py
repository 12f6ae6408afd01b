"""What an error means to the command line: its exit code, and the one wrapper that reports it.

`rlprm` (rlprm/cli.py) and `python rlprm/train_rl.py` run every job through
`run_reporting_errors`: an error whose class carries `exit_code` is printed as
`error: MESSAGE` on stderr and the process exits with that code; any other
exception is a bug and keeps its traceback. The package's errors about what a
user gave (a recipe, a file, a model) inherit `InputError` and exit 2.
"""

from __future__ import annotations

import argparse
from contextlib import contextmanager
import difflib
import logging
import re
import sys
import warnings
from typing import Callable

EXIT_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_TARGETS_MISSED = 3
EXIT_STOPPED = 4


class InputError(Exception):
    """Mixed into an error class: the input (a recipe, a file, a model) cannot be used as given; exit 2."""

    exit_code = EXIT_BAD_INPUT


def exit_code(exc: BaseException) -> int | None:
    """The exit code that `exc` stands for; None for an error that is a bug."""
    code = getattr(type(exc), "exit_code", None)
    if code is not None:
        return code
    from rlprm.config import RecipeError  # to go once RecipeError inherits InputError

    return EXIT_BAD_INPUT if isinstance(exc, (FileNotFoundError, RecipeError)) else None


NOISE: dict[str, tuple[str, ...]] = {
    # DeepSpeed guesses its accelerator at import and warns on every CPU job, though CPU is what rlprm asked for
    "DeepSpeed": ("Setting accelerator to CPU",),
}
"""Logger name -> starts of messages from dependencies that tell an rlprm user nothing (dropped)."""

WARNING_NOISE: tuple[str, ...] = (
    # transformers 5 renamed gradient checkpointing; TRL's trainers (and the TrainingArguments field) still call the
    # old names, and a user can do nothing about it
    r"`(is_)?gradient_checkpointing(_enable|_disable)?` is deprecated",
)
"""Regexes of FutureWarnings from dependencies that tell an rlprm user nothing (ignored)."""


class _DropNoise(logging.Filter):
    def __init__(self, starts: tuple[str, ...]):
        super().__init__()
        self.starts = starts

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.starts)


def quiet_dependencies() -> None:
    """Drop the NOISE messages. The filter sits on the logger object itself, so it holds whether or not the library
    has been imported yet (its own set-up adds handlers and a level, never removes filters). Idempotent."""
    for name, starts in NOISE.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropNoise) for f in logger.filters):
            logger.addFilter(_DropNoise(starts))
    for pattern in WARNING_NOISE:
        warnings.filterwarnings("ignore", message=pattern, category=FutureWarning)  # replaces its own duplicate


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose usage errors read like the others: `error: ...` on the first line (argparse prints the usage
    first), a guess for a mistyped choice, then the usage; exit 2. Subparsers inherit the class."""

    def error(self, message: str):
        found = re.search(r"invalid choice: '([^']*)' \(choose from (.*)\)", message)
        if found:
            guess = difflib.get_close_matches(found.group(1), re.findall(r"'([^']*)'", found.group(2)), n=1)
            message += f". Did you mean `{guess[0]}`?" if guess else ""
        self.exit(EXIT_BAD_INPUT, f"error: {self.prog}: {message}\n{self.format_usage()}")


def run_reporting_errors(handler: Callable[..., int | None], *args) -> int:
    """`handler(*args)`'s exit code (None counts as 0); an error with an exit code prints `error: MESSAGE` instead.

    Dependencies' noise (NOISE) is dropped for the job's duration and after."""
    quiet_dependencies()
    try:
        return handler(*args) or 0
    except Exception as exc:
        code = exit_code(exc)
        if code is None:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return code


__all__ = ["ArgumentParser", "EXIT_BAD_INPUT", "EXIT_FAILED", "EXIT_STOPPED", "EXIT_TARGETS_MISSED", "InputError", "JobInputError", "NOISE", "WARNING_NOISE",
           "exit_code", "loading", "quiet_dependencies", "run_reporting_errors"]


class JobInputError(InputError, ValueError):
    """What a job reads cannot be used as given; one line per problem, each naming its key or file."""


@contextmanager
def loading(key: str, ref: str):
    """Around the load of the model `ref` (recipe key `key`): a model that passed the checks above but does not load
    (a folder's weights truncated or corrupt, or of another shape than its config.json) is bad input, JobInputError
    naming the key and the model, not a traceback; the load's own error stays chained as its cause. Running out of
    memory is not bad input and is raised as it is."""
    from pathlib import Path
    from pickle import UnpicklingError

    try:
        from safetensors import SafetensorError
    except ImportError:  # safetensors comes with transformers; without it nothing loads anyway
        SafetensorError = OSError
    try:
        yield
    except InputError as exc:  # the loader's own words (a reward model without the head its family reads, ...)
        message = str(exc)
        raise JobInputError(message if message.startswith(f"{key}:") else f"{key}: {message}") from exc
    except (OSError, ValueError, RuntimeError, EOFError, UnpicklingError, SafetensorError) as exc:
        if "OutOfMemory" in type(exc).__name__ or "out of memory" in str(exc).lower():
            raise
        cause = (str(exc).strip().splitlines() or [""])[0][:300]
        if "ignore_mismatched_sizes" in cause:  # transformers' words; its load report (above) names the tensors
            cause = "its weights have other shapes than its config.json gives; the load report above lists them"
        hint = ("its weights may be truncated or corrupt, or of another model than its config.json; copy the folder "
                "again" if Path(ref).is_dir() else "check the hub id and the network")
        raise JobInputError(f"{key}: {ref} does not load ({type(exc).__name__}: {cause}): {hint}, or point {key} at "
                            "another model") from exc
