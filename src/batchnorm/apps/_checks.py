"""What the commands share: argument types that refuse bad values at parse time, checks that an
output place is writable before any work starts, and atomic file writes.

The argument types raise ``argparse.ArgumentTypeError``, so a bad value ends the command the
way argparse ends it for an unknown option: the usage, one line
``batchnorm CMD: error: argument --NAME: expected ..., got ...``, exit code 2.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

__all__ = [
    "check_output_dir",
    "check_output_file",
    "finite_float",
    "int_at_least",
    "write_text_atomic",
]


def _parse_int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def int_at_least(low: int) -> Callable[[str], int]:
    """An argparse ``type``: an integer ``>= low``."""

    def parse(text: str) -> int:
        value = _parse_int(text)
        if value < low:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {value}")
        return value

    parse.__name__ = f"integer >= {low}"  # argparse names the type in some messages
    return parse


def finite_float(
    low: float | None = None, high: float | None = None, *, low_open: bool = True
) -> Callable[[str], float]:
    """An argparse ``type``: a finite float in ``(low, high]`` (``[low, high]`` with
    ``low_open=False``); None leaves that side open."""
    if low is None:
        what = "a finite number" if high is None else f"a finite number <= {high:g}"
    else:
        left = "(" if low_open else "["
        what = f"a number in {left}{low:g}, {'inf)' if high is None else f'{high:g}]'}"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        ok = math.isfinite(value)
        if ok and low is not None:
            ok = value > low if low_open else value >= low
        if ok and high is not None:
            ok = value <= high
        if not ok:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text}")
        return value

    parse.__name__ = what
    return parse


def _probe(directory: Path) -> str | None:
    """None if a file can be created in the existing `directory`, else why not."""
    try:
        with tempfile.TemporaryFile(dir=directory):
            pass
    except OSError as err:
        return err.strerror or str(err)
    return None


def check_output_dir(path: str | os.PathLike) -> str | None:
    """Why the directory `path` cannot be used for output (created if missing), or None.

    Nothing is created: the nearest existing ancestor is checked instead of a missing
    directory, so that a command refused later leaves no empty directory behind.
    """
    p = Path(path)
    if p.exists() and not p.is_dir():
        return f"expected a directory, got the file {str(p)!r}"
    existing = p
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        return f"cannot create {str(p)!r}: {str(existing)!r} is a file"
    why = _probe(existing)
    return None if why is None else f"cannot write to {str(existing)!r}: {why}"


def check_output_file(path: str | os.PathLike) -> str | None:
    """Why the file `path` cannot be written (its directory must exist), or None."""
    p = Path(path)
    if p.is_dir():
        return f"expected a file name, got the directory {str(p)!r}"
    parent = p.parent
    if not parent.is_dir():
        what = "is a file" if parent.exists() else "does not exist"
        return f"cannot write {str(p)!r}: the directory {str(parent)!r} {what}"
    why = _probe(parent)
    return None if why is None else f"cannot write to {str(parent)!r}: {why}"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write `text` to `path` so that `path` is either the old file or the whole new one.

    The text goes to a temporary file in the same directory, which is flushed to disk and then
    renamed over `path` (``os.replace`` is atomic within a file system). On any error the
    temporary file is removed and `path` is untouched.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        # mkstemp makes the file private (0600); give it the mode open() would have.
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
