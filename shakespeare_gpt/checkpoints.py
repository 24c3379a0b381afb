"""Checkpoints and runs on disk: the best checkpoint of a folder of runs, the run ``--ckpt_path last``
continues, and a checkpoint checked against the model flags of the command that reads it.

Used by the CLI before Lightning reads a checkpoint (``resolve``: a bad one is one line, not a
traceback, and nothing is written) and by the tools that take a run folder.
"""

from __future__ import annotations

import functools
import io
import re
import sys
from pathlib import Path

import torch
import yaml
from jsonargparse import ArgumentError, ArgumentParser, Namespace
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_only

from .lightning_module import LanguageModel, ShakespeareGPT
from .pretrained import PretrainedLM
from .utils import UserError, atomic_open, check_writable, lock

# Model settings that may differ from a checkpoint's: how the run is executed, not what it computes.
RUNTIME_SETTINGS = ("compile", "sample_tokens", "trust_remote_code", "pretrained")  # pretrained: where, not what
CHAR_MODEL = f"{ShakespeareGPT.__module__}.{ShakespeareGPT.__name__}"  # --model's class unless a config says
PRETRAINED_MODEL = f"{PretrainedLM.__module__}.{PretrainedLM.__name__}"
HINT = (
    "give a .ckpt file, e.g. lightning_logs/cpu/version_0/checkpoints/last.ckpt, "
    "or a folder of runs, e.g. lightning_logs/cpu, for the checkpoint with the lowest val loss among them"
)
LAST = f"{ModelCheckpoint.CHECKPOINT_NAME_LAST}{ModelCheckpoint.FILE_EXTENSION}"


def class_name(class_path: str) -> str:
    """The class a ``class_path`` names, in any of the forms jsonargparse writes it."""
    return str(class_path).rpartition(".")[2]


def resolve(config: Namespace, subcommand: str, args: list[str] | None = None):
    """For the command line, before Lightning reads ``--ckpt_path``: ``last`` becomes the run to continue,
    a folder its best checkpoint, and the checkpoint is read and checked against the model flags. One
    line if anything is wrong, and nothing written. Returns the run a resume continues, or None."""
    if config.ckpt_path in ("last", "best") and subcommand != "fit":
        raise UserError(
            f"--ckpt_path {config.ckpt_path} names a checkpoint of a training run in progress; "
            f"to {subcommand}, give a checkpoint or a run folder (e.g. lightning_logs/cpu)"
        )
    run = None
    if config.ckpt_path == "last":
        path, run = resume(config)
    elif Path(config.ckpt_path).is_dir() and subcommand != "fit":
        path = best_checkpoint(Path(config.ckpt_path))
        print(f"checkpoint: {path}", file=sys.stderr)
    else:
        path = config.ckpt_path
    config.ckpt_path = str(path)
    check_matches(config.model, read_checkpoint(path), path, given_settings(config, args))
    return run


def samples_file(ckpt_path: str | None) -> Path:
    """Where ``predict`` writes the samples of ``ckpt_path``: its run's folder, or beside a checkpoint that is
    in none; lightning_logs/ without a checkpoint, or when that folder cannot be written (another's run)."""
    fallback = Path("lightning_logs", "samples.txt")
    if not ckpt_path:
        return fallback
    ckpt = Path(ckpt_path)
    path = ckpt.parents[1] / "samples.txt" if ckpt.parent.name == "checkpoints" else ckpt.with_suffix(".samples.txt")
    try:
        check_writable(path, "--writer.path", folder=False)
    except UserError:
        return fallback
    return path


def runs_in(root: Path) -> list[Path]:
    """The ``version_N`` run folders under ``root``, oldest first."""
    runs = [p for p in root.glob("version_*") if p.is_dir() and p.name.removeprefix("version_").isdigit()]
    return sorted(runs, key=lambda p: int(p.name.removeprefix("version_")))


def best_checkpoint(folder: Path) -> Path:
    """The checkpoint with the lowest val loss of the newest run under ``folder`` that has one.

    ``folder`` is a run (it holds ``checkpoints/``) or a folder of runs (``version_N``). Without
    any ``best-*.ckpt`` (runs stopped before their first validation), the run's ``last.ckpt``.
    A file that cannot be read is passed over, with a line that says so.
    """
    runs = [folder] if (folder / "checkpoints").is_dir() else runs_in(folder)
    if not runs:
        raise UserError(f"--ckpt_path {folder}: no run here (no checkpoints/ or version_N/ folder); {HINT}")
    for run in reversed(runs):
        best = sorted((run / "checkpoints").glob("best-*.ckpt"), key=lambda p: number_in_name(p, "val", float("inf")))
        if found := readable([*best, run / "checkpoints" / LAST]):
            return found
    raise UserError(f"--ckpt_path {folder}: no run here has a checkpoint that can be read; {HINT}")


def number_in_name(path: Path, key: str, missing: float) -> float:
    """The number after ``key`` in a checkpoint's name (ours: best-step{step}-val{val/loss:.4f}), or ``missing``."""
    m = re.search(rf"{key}(\d+(\.\d+)?)", path.stem)
    return float(m.group(1)) if m else missing


def readable(paths: list[Path]) -> Path | None:
    """The first of ``paths`` that is a readable checkpoint; a file that is not is named on stderr and passed over."""
    for path in paths:
        if path.is_file():
            try:
                read_checkpoint(path)
                return path
            except UserError:
                print(f"passed over {path}: it cannot be read (truncated or corrupt)", file=sys.stderr)
    return None


def read_checkpoint(path: str | Path) -> dict:
    """The checkpoint at ``path``, or a one-line ``UserError`` unless it is a readable checkpoint of this project."""
    if not Path(path).is_file():
        raise UserError(f"checkpoint {path} does not exist: {HINT}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:
        raise UserError(
            f"checkpoint {path} cannot be read ({type(e).__name__}): it is truncated or corrupt; {HINT} "
            "(another checkpoint of that run, or start a new run without --ckpt_path)"
        ) from None
    hparams = ckpt.get("hyper_parameters", {}) if isinstance(ckpt, dict) else {}
    if "state_dict" not in ckpt or not ("vocab" in hparams or "pretrained" in hparams):
        raise UserError(f"{path} is not a shakespeare-gpt checkpoint (no weights, vocabulary or model name); {HINT}")
    return ckpt


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint writer, with each file written beside its place and renamed there.

    A checkpoint is then whole or absent, and one that cannot be written (a full disk) is one
    line that names the folder, with the checkpoints already there intact. Lightning's own writes
    to a temporary file in the system's temporary folder and copies it over, which leaves a
    truncated checkpoint when the disk fills.
    """

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        buffer = io.BytesIO()  # serialised first: a failed write is then an OSError, not torch's zip writer's error
        torch.save(checkpoint, buffer)
        try:
            with atomic_open(Path(path), "wb") as f:
                f.write(buffer.getbuffer())
        except OSError as e:
            raise UserError(
                f"cannot write a checkpoint in {Path(path).parent} ({e.strerror or e}): the checkpoints already "
                "there are intact; free some space, then resume with --ckpt_path last"
            ) from None


def lock_run(run: Path, create: bool = True):
    """The lock that keeps a second ``fit`` out of the run folder ``run`` (see ``utils.lock``)."""
    busy = f"{run} is being written by another fit right now: wait for it to finish, or stop it first"
    return lock(run / ".lock", busy, create)


def resume(config: Namespace) -> tuple[Path, Path | None]:
    """For ``fit --ckpt_path last``: the newest run's ``last.ckpt``, and the run's folder.

    Lightning looks for ``last.ckpt`` in the logger's *current* version folder, a fresh one for
    every run; so the newest run (the highest ``version_N``, or the logger's fixed version) is
    found here and the logger is pointed at it, and its TensorBoard curves are told to drop
    whatever was logged after the checkpoint (steps a ``kill -9`` lost), so each step stays once.
    """
    if not in_version_folders(config):
        dirpath = config.get("checkpoint", Namespace()).get("dirpath")
        folder = Path(dirpath or config.trainer.get("default_root_dir") or ".", "" if dirpath else "checkpoints")
        return _last_checkpoint(folder, folder), None
    args = config.trainer.logger.init_args
    root = Path(args.save_dir) / (args.get("name") or "")
    if args.get("version") is not None:
        run = root / (args.version if isinstance(args.version, str) else f"version_{args.version}")
    else:
        if not (runs := runs_in(root)):
            raise UserError(f"nothing to resume: there is no run under {root}; start one without --ckpt_path")
        run = runs[-1]
        args.version = int(run.name.removeprefix("version_"))  # the same folder; the progress bar shows N
    if rank_zero_only.rank == 0 and (probe := lock_run(run, create=False)) is not None:
        probe.close()  # only asks: the lock is taken once every check has passed
    path = _last_checkpoint(run / "checkpoints", run)
    args.purge_step = read_checkpoint(path)["global_step"]
    return path, run


def in_version_folders(config: Namespace) -> bool:
    """Whether a ``fit`` of ``config`` writes into TensorBoard's ``version_N`` folders, its checkpoints with it."""
    logger = config.trainer.get("logger")
    tensorboard = isinstance(logger, Namespace) and str(logger.get("class_path")).endswith(
        ("TensorBoard", "TensorBoardLogger")
    )
    return tensorboard and not config.get("checkpoint", Namespace()).get("dirpath")


def _last_checkpoint(folder: Path, run: Path) -> Path:
    """``last.ckpt`` in ``folder``; should it not be readable, the run's newest other checkpoint."""
    others = sorted(folder.glob("*.ckpt"), key=lambda p: number_in_name(p, "step", -1), reverse=True)
    if not (path := readable([folder / LAST, *others])):
        raise UserError(
            f"nothing to resume: the newest run {run} has no checkpoint (it stopped before its first one); "
            "start a new run without --ckpt_path, or give an older run's checkpoint as --ckpt_path <path>"
        )
    return path


@functools.cache  # a parser per class: check_matches asks twice, for the asked class and the saved one
def model_defaults(class_path: str) -> dict:
    """Every setting the command line takes for the model class ``class_path``, with its default (read only)."""
    parser = ArgumentParser(exit_on_error=False)
    parser.add_subclass_arguments(LanguageModel, "model", required=True)
    try:
        return parser.parse_args(["--model", class_path]).model.init_args.as_dict()
    except ArgumentError:
        raise UserError(f"no model class {class_path} here: use the version of shakespeare-gpt that wrote it") from None


def given_settings(config: Namespace, args: list[str] | None) -> dict[str, str | None]:
    """The model settings the user gave (``class_path``: the class), each with the config file that set it,
    or None if typed as a flag. ``config``: a subcommand's parsed namespace; ``args``: its command line
    (None: ``sys.argv[1:]``, as for ``LightningCLI``)."""
    given = {}
    for file in filter(None, config.get("config") or []):  # None: a config given as text, not as a file
        model = (yaml.safe_load(Path(file).read_text()) or {}).get("model") or {}
        model = {"class_path": model} if isinstance(model, str) else model  # flat, or class_path and init_args
        given.update(dict.fromkeys({*model, *model.get("init_args", {})} - {"init_args"}, str(file)))
    for arg in sys.argv[1:] if args is None else args:
        if m := re.fullmatch(r"--model(?:\.(?:init_args\.)?(\w+))?(=.*)?", arg, re.DOTALL):
            given[m[1] or "class_path"] = None
    return given


def check_matches(model: Namespace, ckpt: dict, path: str | Path, given: dict[str, str | None]) -> None:
    """Refuse, in one line, model settings given by the user that the checkpoint contradicts.

    Lightning rebuilds the model from the checkpoint's settings and would silently ignore these.
    ``given`` (``given_settings``) says what the user set, and where; a value away from its default
    counts as given too (``--model`` from a file, or JSON). ``model`` becomes the checkpoint's class.
    """

    def where(key: str) -> str:  # a setting's config file, when a config set it
        return f", set by --config {given[key]}" if given.get(key) else ""

    saved = ckpt["hyper_parameters"]
    saved_class = saved.get("_class_path", CHAR_MODEL)
    holds, asked_class = class_name(saved_class), class_name(model.class_path)
    asked_defaults, defaults = model_defaults(model.class_path), model_defaults(saved_class)
    values = model.init_args.as_dict()
    asked = {k: v for k, v in values.items() if k != "vocab" and (k in given or v != asked_defaults.get(k))}
    if asked_class != holds:
        if "class_path" in given or asked_class != class_name(CHAR_MODEL):
            raise UserError(
                f"{path} holds a {holds}, not the {asked_class} asked for{where('class_path') or ' by --model'}: "
                "a checkpoint decides its model; drop it"
            )
        if foreign := sorted(set(asked) - set(defaults)):
            key = foreign[0]
            raise UserError(f"{path} holds a {holds}, which has no setting --model.{key}{where(key)}: drop it")
        model.init_args = Namespace(**asked)  # read for the default class: keep only what the user gave
    if unknown := sorted(set(saved) - set(defaults) - {"vocab", "_instantiator", "_class_path"}):
        raise UserError(
            f"{path} was written by another version of shakespeare-gpt (settings {', '.join(unknown)} are unknown "
            "here): use the version that wrote it"
        )
    clashes = [k for k, v in asked.items() if k in saved and k not in RUNTIME_SETTINGS and v != saved[k]]
    if clashes:
        configs = "".join(dict.fromkeys(where(k) for k in clashes))  # once for each config file
        raise UserError(
            f"{path} was trained with {', '.join(f'{k}={saved[k]!r} (asked: {asked[k]!r})' for k in clashes)}"
            f"{configs}: a checkpoint decides its model's settings; drop those --model flags (or the config that "
            "sets them), or start a new run without --ckpt_path"
        )
    model.class_path = saved_class
