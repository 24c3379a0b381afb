"""``python -m shakespeare_gpt {fit,validate,test,predict}``: LightningCLI wiring of data, model and trainer.

``build`` is the same entry point as a Python API: the benchmark and the study runner use it to
get exactly the model, data and trainer a command would, then run and read them themselves.
"""

from __future__ import annotations

import dataclasses
import inspect
import sys
from pathlib import Path

import torch
from jsonargparse import Namespace
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.utilities import rank_zero_only

from .callbacks import (
    InterruptCheckpoint,
    RandomState,
    RunLock,
    SampleWriter,
    StopOnNonFiniteLoss,
    TextSample,
    Throughput,
    lock_run,
)
from .data import ShakespeareDataModule
from .errors import UserError
from .lightning_module import ShakespeareGPT
from .model import GPTConfig

# Model settings that may differ from a checkpoint's: how the run is executed, not what it computes.
RUNTIME_SETTINGS = ("compile", "sample_tokens")
CHECKPOINT_HINT = "give the path of a .ckpt file, e.g. lightning_logs/cpu/version_0/checkpoints/last.ckpt"


class FitConfigSaver(SaveConfigCallback):
    """Saves the resolved config next to a training run's logs; sampling runs leave no file."""

    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage == "fit":
            super().setup(trainer, pl_module, stage)


class ShakespeareCLI(LightningCLI):
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        # Best (lowest val loss) and last checkpoints of every run, under its log folder. Without
        # the version counter, a resumed run overwrites last.ckpt instead of writing last-v1.ckpt.
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults(
            {
                "checkpoint.monitor": "val/loss",
                "checkpoint.mode": "min",
                "checkpoint.save_last": True,
                "checkpoint.filename": "best-step{step}-val{val/loss:.4f}",
                "checkpoint.auto_insert_metric_name": False,
                "checkpoint.enable_version_counter": False,
            }
        )
        parser.add_lightning_class_args(SampleWriter, "writer")
        parser.add_lightning_class_args(Throughput, "throughput")
        # One source of truth for the context length: the model's.
        parser.link_arguments("model.block_size", "data.block_size")
        # The data decides the vocabulary; the model stores it, so a checkpoint can decode alone.
        parser.link_arguments("data.vocab", "model.vocab", apply_on="instantiate")

    def parse_arguments(self, parser: LightningArgumentParser, args) -> None:
        super().parse_arguments(parser, args)
        subcommand = self.config.get("subcommand")
        config = self.config[subcommand] if subcommand else self.config
        self.runtime_settings = {k: config.model.get(k) for k in RUNTIME_SETTINGS}
        self.run_lock = None
        ckpt_path = subcommand and config.get("ckpt_path")
        if not ckpt_path or ckpt_path == "best":
            return
        if ckpt_path == "last" and subcommand != "fit":
            raise UserError(f"--ckpt_path last continues a training run; to {subcommand}, give a checkpoint's path")
        # Before Lightning reads the checkpoint, and before anything is written: one line, not a traceback.
        run = None
        if ckpt_path == "last":
            config.ckpt_path, ckpt, run = resume(config)
        else:
            ckpt = read_checkpoint(ckpt_path)
        check_matches(config.model, ckpt, config.ckpt_path)
        if run is not None and rank_zero_only.rank == 0:  # the other processes of a run are started by this one
            self.run_lock = lock_run(run)

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        # Lightning has filled the model's arguments from --ckpt_path; how to run stays the user's.
        for key, value in self.runtime_settings.items():
            config.model[key] = value
        if config.model.get("vocab") is not None and config.data.vocab is None:
            config.data.vocab = config.model.vocab  # the checkpoint's vocabulary: no corpus needed
        if config.trainer.get("enable_progress_bar") is False and config.trainer.get("callbacks"):
            # --trainer.enable_progress_bar false wins over a config's bar settings (Lightning
            # would refuse the combination).
            callbacks = config.trainer.callbacks
            callbacks = callbacks if isinstance(callbacks, list) else [callbacks]
            config.trainer.callbacks = [c for c in callbacks if not str(c.get("class_path")).endswith("ProgressBar")]
        # The callbacks every run gets; the learning-rate curve only where there is a logger to draw it.
        run_lock = RunLock(self.run_lock)
        self.trainer_defaults["callbacks"] = [InterruptCheckpoint(), StopOnNonFiniteLoss(), RandomState(), run_lock]
        if config.trainer.get("logger") not in (False, None):
            self.trainer_defaults["callbacks"] += [LearningRateMonitor(logging_interval="step"), TextSample()]


def resume(config: Namespace):
    """For ``fit --ckpt_path last``: the newest run's ``last.ckpt``, the checkpoint, and the run's folder.

    Lightning looks for ``last.ckpt`` in the logger's *current* version folder, a fresh one for
    every run; so the newest run (the highest ``version_N``, or the logger's fixed version) is
    found here and the logger is pointed at it, and its TensorBoard curves are told to drop
    whatever was logged after the checkpoint (steps a ``kill -9`` lost), so each step stays once.
    A run that another ``fit`` is writing is refused here; the caller locks the run once every
    check has passed, before anything is built, so a refused attempt writes nothing.
    """
    dirpath = config.checkpoint.get("dirpath")
    logger = config.trainer.get("logger")
    tensorboard = isinstance(logger, Namespace) and str(logger.get("class_path")).endswith("TensorBoardLogger")
    if dirpath or not tensorboard:
        folder = Path(dirpath or config.trainer.get("default_root_dir") or ".", "" if dirpath else "checkpoints")
        path = _last_checkpoint(folder, folder)
        return str(path), read_checkpoint(str(path)), None
    args = logger.init_args
    root = Path(args.save_dir) / (args.get("name") or "")
    if args.get("version") is not None:
        run = root / (args.version if isinstance(args.version, str) else f"version_{args.version}")
    else:
        runs = [p for p in root.glob("version_*") if p.name.removeprefix("version_").isdigit()]
        if not runs:
            raise UserError(f"nothing to resume: there is no run under {root}; start one without --ckpt_path")
        run = max(runs, key=lambda p: int(p.name.removeprefix("version_")))
        args.version = run.name
    if (probe := lock_run(run, create=False)) is not None:  # only asks
        probe.close()
    path = _last_checkpoint(run / "checkpoints", run)
    ckpt = read_checkpoint(str(path))
    args.purge_step = ckpt["global_step"]
    return str(path), ckpt, run


def _last_checkpoint(folder: Path, run: Path) -> Path:
    path = folder / f"{ModelCheckpoint.CHECKPOINT_NAME_LAST}{ModelCheckpoint.FILE_EXTENSION}"
    if not path.is_file():
        raise UserError(
            f"nothing to resume: the newest run {run} has no last.ckpt (it stopped before its first checkpoint); "
            "start a new run without --ckpt_path, or give an older run's checkpoint as --ckpt_path <path>"
        )
    return path


def read_checkpoint(path: str) -> dict:
    """The checkpoint at ``path``, or a one-line ``UserError`` unless it is a readable checkpoint of this project."""
    if not Path(path).is_file():
        raise UserError(f"checkpoint {path} does not exist: {CHECKPOINT_HINT}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:
        raise UserError(
            f"checkpoint {path} cannot be read ({type(e).__name__}): it is truncated or corrupt; "
            f"{CHECKPOINT_HINT} (another checkpoint of that run, or start a new run without --ckpt_path)"
        ) from None
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "vocab" not in ckpt.get("hyper_parameters", {}):
        raise UserError(
            f"{path} is not a shakespeare-gpt checkpoint (no weights or vocabulary in it); {CHECKPOINT_HINT}"
        )
    return ckpt


def model_defaults() -> dict:
    """Every model setting the command line takes, with its default."""
    params = inspect.signature(ShakespeareGPT.__init__).parameters.values()
    defaults = {p.name: p.default for p in params if p.default is not inspect.Parameter.empty}
    defaults.update({f.name: f.default for f in dataclasses.fields(GPTConfig) if f.name != "vocab_size"})
    return defaults


def check_matches(model: Namespace, ckpt: dict, path: str) -> None:
    """Refuse, in one line, model settings given by the user that the checkpoint contradicts.

    Lightning rebuilds the model from the checkpoint's settings and would silently ignore these.
    A setting at its default was not given, so it is not a contradiction.
    """
    defaults, saved = model_defaults(), ckpt["hyper_parameters"]
    if unknown := sorted(set(saved) - set(defaults) - {"vocab", "_instantiator"}):
        raise UserError(
            f"{path} was written by another version of shakespeare-gpt (settings {', '.join(unknown)} are unknown "
            "here): use the version that wrote it"
        )
    clashes = [
        f"{key}={saved[key]!r} (asked: {model.get(key)!r})"
        for key in saved
        if key in defaults and key not in RUNTIME_SETTINGS
        if model.get(key) != saved[key] and model.get(key) != defaults[key]
    ]
    if clashes:
        raise UserError(
            f"{path} was trained with {', '.join(clashes)}: a checkpoint decides its model's settings; "
            "drop those --model flags (or the config that sets them), or start a new run without --ckpt_path"
        )


def build(args: list[str] | dict | None = None, run: bool = False, save_config: bool = True) -> ShakespeareCLI:
    """Parse ``args`` as the command line would and build model, data and trainer.

    ``run=False`` (the tools' use): no subcommand, nothing run; the caller calls
    ``cli.trainer.fit(cli.model, cli.datamodule)`` itself. ``run=True`` runs the subcommand in
    ``args``. Bad input raises ``UserError``. ``save_config=False``: no ``config.yaml`` is written
    (the benchmark's runs keep no logs).
    """
    return ShakespeareCLI(
        ShakespeareGPT,
        ShakespeareDataModule,
        seed_everything_default=1337,
        save_config_callback=FitConfigSaver if save_config else None,
        save_config_kwargs={"overwrite": True},
        auto_configure_optimizers=False,
        trainer_defaults={
            "check_val_every_n_epoch": None,
            # The data module gives each rank its own training windows and every rank the whole
            # val split, so the val loss is the same with any number of processes.
            "use_distributed_sampler": False,
            "logger": {
                "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                "init_args": {"save_dir": "lightning_logs", "name": "", "default_hp_metric": False},
            },
        },
        args=args,
        run=run,
    )


def cli_main(args: list[str] | None = None) -> ShakespeareCLI:
    """The command line; ``args`` replaces ``sys.argv[1:]``. A ``UserError`` ends as one line and exit status 1."""
    try:
        return build(args, run=True)
    except UserError as e:
        sys.stderr.write(f"error: {e}\n")
        raise SystemExit(1) from None
