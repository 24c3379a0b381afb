"""Checks of the tools' input, done before any work starts.

Every refusal is a one-line ``UserError`` that names the flag or field, the value given and what
would work; ``fail`` prints it as ``error: <message>`` and exits with status 1 (no traceback, no
usage dump). ``ToolParser`` turns argparse's own errors into the same kind of line, and its help
shows every default.
"""

from __future__ import annotations

import argparse
import difflib
import io
import json
import re
import sys
from collections.abc import Callable, Iterable
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path
from typing import NoReturn

from ..errors import UserError, check_writable


def show(value: object, limit: int = 80) -> str:
    """``value`` on one line, about as a user wrote it on the command line or in YAML."""
    if value is None:
        text = "null"
    elif isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, str):
        plain = value and value.strip() == value and value.isprintable() and not re.search(r"[\[\]{},'\"]", value)
        text = value if plain else json.dumps(value, ensure_ascii=False)
    elif isinstance(value, (list, tuple)):
        text = "[" + ", ".join(show(v, limit) for v in value) + "]"
    elif isinstance(value, dict):
        text = "{" + ", ".join(f"{show(k, limit)}: {show(v, limit)}" for k, v in value.items()) + "}"
    else:
        text = str(value)
    text = " ".join(text.split("\n"))
    return text if len(text) <= limit else text[: limit - 3] + "..."


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """``" (did you mean X?)"`` for the closest of ``choices``, or ``""`` when none is close."""
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f" (did you mean {close[0]}?)" if close else ""


def fail(error: UserError) -> NoReturn:
    """Print ``error: <message>`` on one line to stderr and exit with status 1."""
    sys.stderr.write(f"error: {' '.join(str(error).splitlines())}\n")
    raise SystemExit(1) from None


def whole(flag: str, minimum: int, what: str, example: int) -> Callable[[str], int]:
    """An argparse ``type``: a whole number >= ``minimum``, else a message naming ``flag`` and the value."""

    def convert(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < minimum:
            raise argparse.ArgumentTypeError(
                f"{flag} {show(text)}: give {what}, a whole number >= {minimum} (e.g. {flag} {example})"
            )
        return value

    convert.__name__ = "whole number"
    return convert


def writable_place(flag: str, given: str | Path, kind: str, inside: str | None = None) -> Path:
    """``given`` (or ``given/inside``), refused in one line unless it can be written as a ``kind``.

    ``kind`` is "folder" or "file". Nothing is created: see ``errors.check_writable``.
    """
    check_writable(Path(given), flag, folder=kind == "folder")
    return Path(given) / inside if inside else Path(given)


def cli_refusal(args: list[str]) -> str | None:
    """Why the project's CLI refuses ``args`` on one line, or None when it takes them.

    The arguments go through the CLI's own checks and its model, data and trainer are built,
    exactly as a run would build them, but nothing is run and nothing is written.
    """
    from ..cli import build  # the core's entry point; imported here, where it is needed

    out, err = io.StringIO(), io.StringIO()
    try:
        with redirect_stdout(out), redirect_stderr(err):
            build(args, save_config=False)
    except SystemExit as e:
        if e.code in (0, None):
            return None
        text = err.getvalue()
        return " ".join(text.rsplit("error: ", 1)[-1].split()) or f"it exits with status {e.code}"
    except UserError as e:
        return " ".join(str(e).split())
    return None


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every option's help ends with its default, or "(required)"; help texts that state their
    default themselves (a computed one, like ``reports/<study name>``) keep it as written."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.required and action.option_strings:
            return f"{text} (required)".strip()
        if action.default is None or "(default" in text:
            return text
        return super()._get_help_string(action)


class ToolParser(argparse.ArgumentParser):
    """An argument parser whose errors raise a one-line ``UserError`` (no usage dump, exit 1 via ``fail``)."""

    def __init__(self, **kwargs) -> None:
        super().__init__(formatter_class=HelpFormatter, **kwargs)

    def error(self, message: str) -> NoReturn:
        # A check of ours (a ``type`` of this module) already names the flag: drop argparse's prefix.
        ours = re.fullmatch(r"argument (\S+): (.*)", message, re.S)
        if ours and ours[2].startswith(ours[1].split("/")[-1] + " "):
            raise UserError(ours[2])
        if message.startswith("unrecognized arguments: "):
            first = message.split(": ", 1)[1].split()[0].split("=")[0]
            flags = [s for a in self._actions for s in a.option_strings]
            message += did_you_mean(first, flags)
        raise UserError(f"{message}; see {self.prog} --help")
