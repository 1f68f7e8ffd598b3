"""argparse types for the command-line tools' numbers and output paths: a value out of range, or a
path that can not be written, is refused while the options are parsed, named by argparse
("argument --batch-size: ..."), before any work starts.

    p.add_argument("--batch-size", type=positive_int)
    p.add_argument("--lr", type=number(above=0))
    p.add_argument("--share", type=number(0, 1))
    p.add_argument("--plot", type=output_file)
"""
from __future__ import annotations

import argparse
import math
import os
from pathlib import Path
from typing import Callable


def _whole(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None


def positive_int(text: str) -> int:
    """A whole number >= 1."""
    value = _whole(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def non_negative_int(text: str) -> int:
    """A whole number >= 0."""
    value = _whole(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be at least 0, got {value}")
    return value


def number(low: float | None = None, high: float | None = None, *, above: float | None = None,
           below: float | None = None) -> Callable[[str], float]:
    """A finite float within [``low``, ``high``] and strictly between ``above`` and ``below`` (each
    bound optional); NaN and infinities are refused."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
        for ok, bound in ((low is None or value >= low, f">= {low:g}" if low is not None else ""),
                          (high is None or value <= high, f"<= {high:g}" if high is not None else ""),
                          (above is None or value > above, f"> {above:g}" if above is not None else ""),
                          (below is None or value < below, f"< {below:g}" if below is not None else "")):
            if not ok:
                raise argparse.ArgumentTypeError(f"must be {bound}, got {value:g}")
        return value

    parse.__name__ = "number"  # argparse names the type in some messages
    return parse


def _check_can_create(path: Path, text: str) -> None:
    """``path`` can be made: its nearest existing ancestor is a directory this process may write."""
    existing = next(p for p in path.absolute().parents if p.exists())
    if not existing.is_dir():
        raise argparse.ArgumentTypeError(f"can not write {text}: {existing} is not a directory")
    if not os.access(existing, os.W_OK):
        raise argparse.ArgumentTypeError(f"can not write {text}: directory {existing} is not writable")


def output_file(text: str) -> Path:
    """A file to write (or replace): not a directory, in a directory that exists or can be made."""
    path = Path(text)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a directory; give a file name")
    _check_can_create(path, text)
    return path


def output_dir(text: str) -> str:
    """A directory to write in, existing or to be made; returned as the text given."""
    path = Path(text)
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} exists and is not a directory")
    if path.is_dir():
        if not os.access(path, os.W_OK):
            raise argparse.ArgumentTypeError(f"directory {text} is not writable")
    else:
        _check_can_create(path, text)
    return text
