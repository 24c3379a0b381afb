"""The exception types the command line turns into a one-line message instead of a traceback, and a
check of paths shared by the core and the tools."""

import os
import tempfile
from pathlib import Path


class UserError(ValueError):
    """Bad input from the user: the message names the problem and the fix."""


class NonFiniteLossError(UserError):
    """The training loss became NaN or infinite; raised before another checkpoint is written."""


def check_whole(flag: str, value, least: int) -> None:
    """Refuse, in one line, a ``value`` for ``flag`` that is not a whole number >= ``least`` (bools are not numbers)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise UserError(f"{flag} {value!r}: give a whole number >= {least}")


def check_writable(path: Path, flag: str, folder: bool = True) -> None:
    """Refuse, in one line, a folder (or file) that cannot be created or written; creates nothing.

    Tries a temporary file in the nearest folder that exists: permission bits alone do not tell
    (root passes them on read-only mounts and in /proc).
    """
    if not folder and path.is_dir():
        raise UserError(f"{flag} {path} is a folder: give the path of a file to write")
    existing = path if folder else path.parent
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise UserError(f"{flag} {path}: {existing} is a file, not a folder; choose another path")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as e:
        raise UserError(
            f"{flag} {path}: cannot write in {existing} ({e.strerror}); choose a folder you can write to"
        ) from None
    if not folder and path.exists() and not os.access(path, os.W_OK):
        raise UserError(f"{flag} {path}: the file is not writable; choose another path")
