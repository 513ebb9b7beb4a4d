"""Command-line plumbing shared by ``examples/gpt/train.py`` and ``generate.py``.

User mistakes (a bad flag, a missing or corrupt file, a prompt the vocabulary
cannot encode) are reported as ONE line on stderr with a non-zero exit status,
never as a traceback: the library raises :class:`UsageError` (or ``OSError``
for files) with a clear message, and :func:`run_cli` turns it into that line at
the command-line boundary. Anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

EXIT_USER_ERROR = 1
EXIT_BAD_FLAG = 2  # argparse's own status


class UsageError(ValueError):
    """Input the user can fix: the message says what was wrong and what is expected."""


class DistributedRunError(RuntimeError):
    """A distributed run lost a peer: it died, or stopped answering for the timeout."""


class OneLineParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line (``prog: error: ...``), no usage dump."""

    def error(self, message: str):
        self.exit(EXIT_BAD_FLAG, f"{self.prog}: error: {message} (see --help)\n")


def _checked(convert, condition, expected: str):
    def parse(text: str):
        value = convert(text)
        if not condition(value):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text}")
        return value
    parse.__name__ = expected  # argparse names the type in 'invalid <name> value'
    return parse


positive_int = _checked(int, lambda v: v >= 1, "an integer >= 1")
nonnegative_int = _checked(int, lambda v: v >= 0, "an integer >= 0")
positive_float = _checked(float, lambda v: v > 0, "a number > 0")
nonnegative_float = _checked(float, lambda v: v >= 0, "a number >= 0")
unit_fraction = _checked(float, lambda v: 0 <= v <= 1, "a number in [0, 1]")
dropout_probability = _checked(float, lambda v: 0 <= v < 1, "a probability in [0, 1)")
nucleus_mass = _checked(float, lambda v: 0 < v <= 1, "a number in (0, 1]")


def torch_device(text: str) -> torch.device:
    """A torch device the machine has (``cuda`` only with a usable GPU)."""
    try:
        dev = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"not a device name: {text!r} (e.g. cpu, cuda, cuda:1)")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{text!r}, but no CUDA GPU is usable here")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise argparse.ArgumentTypeError(f"{text!r}, but only {torch.cuda.device_count()} "
                                         "GPU(s) are visible")
    return dev


def one_line(message: str) -> str:
    """``message`` with its whitespace (newlines included) collapsed to single spaces."""
    return " ".join(str(message).split())


def run_cli(main, argv=None, prog: str | None = None) -> int:
    """Call ``main(argv)``; a :class:`UsageError`, ``OSError`` or a failed distributed
    run becomes one stderr line and exit status 1. Returns 0 on success.

    After a :class:`DistributedRunError` the process ends here (``os._exit``):
    the interpreter's normal shutdown can wait forever on a frozen peer."""
    try:
        main(argv)
    except (UsageError, OSError, DistributedRunError) as error:
        name = prog or os.path.basename(sys.argv[0] or "pyattn")
        print(f"{name}: error: {one_line(error)}", file=sys.stderr)
        if isinstance(error, DistributedRunError):
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(EXIT_USER_ERROR)
        return EXIT_USER_ERROR
    return 0
