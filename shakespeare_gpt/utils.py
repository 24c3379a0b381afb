"""Small helpers the core and the tools share, each written once: the user's errors, a file that
appears whole or not at all, a lock, what machine and commit a result came from, and the entry
points' quieting of third-party noise."""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, NoReturn

from jsonargparse.typing import restricted_number_type, restricted_string_type

try:
    import fcntl
except ImportError:  # Windows: nothing is locked
    fcntl = None


# A rate such as dropout, or an Adam beta: from 0 up to, not including, 1.
Fraction = restricted_number_type("Fraction", float, [(">=", 0), ("<", 1)])
# Text of one character or more (any: a space or a newline is a prompt too).
Text = restricted_string_type("Text", r"^[\s\S]+$")
# A learning rate: > 0 and finite.
LearningRate = restricted_number_type("LearningRate", float, [(">", 0), ("<", math.inf)])


class UserError(ValueError):
    """Bad input from the user: the message names the problem and the fix."""


class NonFiniteLossError(UserError):
    """The training loss became NaN or infinite; raised before another checkpoint is written."""


def builtin_fields(obj) -> None:
    """Make the fields of the dataclass ``obj`` built-in values: jsonargparse parses a ``PositiveInt`` flag into
    an int subclass, which would reach checkpoints (hparams, the optimiser's state) and which
    ``torch.load(weights_only=True)`` refuses."""
    for field in dataclasses.fields(obj):
        value = getattr(obj, field.name)
        setattr(obj, field.name, next((t(value) for t in (bool, int, float, str) if isinstance(value, t)), value))


def one_line(error: BaseException | str) -> str:
    return " ".join(str(error).split())


def exit_with(error: BaseException | str) -> NoReturn:
    """``error: <message>`` on one line of stderr, and exit status 1: how every command ends on bad input."""
    sys.stderr.write(f"error: {one_line(error)}\n")
    raise SystemExit(1)


def check_writable(path: Path, flag: str, folder: bool = True) -> None:
    """Refuse, in one line, a folder (or file) that cannot be created or written; creates nothing.

    Tries a temporary file in the nearest folder that exists: permission bits alone do not tell
    (root passes them on read-only mounts and in /proc).
    """
    path = Path(path)
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


@contextmanager
def atomic_open(path: Path, mode: str = "w", **kwargs) -> Iterator[IO]:
    """A file to write that appears at ``path`` only when the block ends without an error.

    It is written beside ``path`` and renamed into place (``os.replace`` is atomic on one
    filesystem), so an interrupted write never leaves a half-written file a later run would trust.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    if path.exists():
        shutil.copymode(path, tmp)  # a file replaced keeps its permissions
    else:
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)  # as open() would create it (mkstemp makes it private to its owner)
    try:
        with os.fdopen(fd, mode, **({"encoding": "utf-8"} if "b" not in mode else {}) | kwargs) as f:
            yield f
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def lock(path: Path, busy: str, create: bool = True) -> IO | None:
    """An exclusive lock on the file ``path``, held while the returned file stays open.

    The operating system's advisory lock (``flock``): it goes when the process ends, however it
    ends, so a stale lock file never blocks anyone. The holder writes who it is into the file.
    Held by another process: a ``UserError`` that says ``busy`` and who holds it. ``create=False``
    only asks, changing nothing: without the file nothing holds the lock, and None is returned.
    """
    path = Path(path)
    if fcntl is None or not (create or path.exists()):
        return None
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = open(path, "a+")  # noqa: SIM115 (held open for the lock's life)
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise UserError(f"{busy} ({holder} holds {path})") from None
    if create:
        handle.truncate(0)
        handle.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        handle.flush()
    return handle


def git_commit() -> str:
    """The commit of the code being run, with ``+changes`` when the working tree differs from it."""
    here = Path(__file__).resolve().parent
    try:
        head = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=here, capture_output=True, text=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here, capture_output=True)
    except OSError:
        return "unknown"
    if head.returncode != 0:
        return "unknown"
    return head.stdout.strip() + ("+changes" if dirty.stdout.strip() else "")


class DropLines(logging.Filter):
    """Drops log records whose message starts with one of ``prefixes``."""

    def __init__(self, *prefixes: str) -> None:
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefixes)


def quiet_third_party() -> None:
    """Process-wide: drop third-party warnings and log lines that do not apply here. For entry points only."""
    # Lightning 2.6 on torch 2.13 warns about a torch-internal deprecation on every run.
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")
    # Sampling or validating a checkpoint needs none of the callbacks that wrote it.
    warnings.filterwarnings("ignore", message=r"Be aware that when using `ckpt_path`, callbacks used to create")
    # fit writes to a fresh version_N folder; one that has checkpoints is one the user asked for
    # (a resumed run, or a fixed --trainer.logger.init_args.version).
    warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")
    # Said on every bf16 fit: the summary sizes mixed precision's weights as fp32, which they are.
    warnings.filterwarnings("ignore", message=r"Precision bf16-mixed is not supported by the model summary")
    # Advertisements for Lightning's cloud services, printed on every run; and the seed (config.yaml records it).
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(DropLines("💡 Tip"))
    logging.getLogger("lightning.fabric.utilities.seed").addFilter(DropLines("Seed set to"))
    # "Received SIGTERM: 2" on Ctrl-C: the interrupt callback says what the signal did instead.
    logging.getLogger("lightning.pytorch.trainer.connectors.signal_connector").addFilter(DropLines("[rank"))
    # Said at every start of a local Ray instance; it concerns clusters reachable by others.
    logging.getLogger("ray._private.authentication.authentication_token_setup").addFilter(
        DropLines("Token authentication is enabled")
    )
