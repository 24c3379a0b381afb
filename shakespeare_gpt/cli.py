"""``python -m shakespeare_gpt {fit,validate,test,predict}``: LightningCLI wiring of data, model and trainer."""

from __future__ import annotations

import importlib
import sys
import warnings
from pathlib import Path

import torch
from jsonargparse import Namespace
from lightning.pytorch.callbacks import ModelCheckpoint, ProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback

from .callbacks import SampleWriter, SaveOnInterrupt, Throughput
from .data import ShakespeareDataModule
from .errors import UserError
from .lit import ShakespeareGPT


class FitConfigSaver(SaveConfigCallback):
    """Saves the resolved config next to a training run's logs; sampling runs leave no file."""

    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage == "fit":
            super().setup(trainer, pl_module, stage)


class ShakespeareCLI(LightningCLI):
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        # Best (lowest val loss) and last checkpoints of every run, under its log folder.
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults(
            {
                "checkpoint.monitor": "val/loss",
                "checkpoint.mode": "min",
                "checkpoint.save_last": True,
                "checkpoint.filename": "best-step{step}-val{val/loss:.4f}",
                "checkpoint.auto_insert_metric_name": False,
            }
        )
        parser.add_lightning_class_args(SampleWriter, "writer")
        parser.add_lightning_class_args(Throughput, "throughput")
        parser.add_lightning_class_args(SaveOnInterrupt, "save_on_interrupt")
        # One source of truth for the context length: the model's.
        parser.link_arguments("model.block_size", "data.block_size")
        # The data decides the vocabulary; the model stores it, so a checkpoint can decode alone.
        parser.link_arguments("data.vocab", "model.vocab", apply_on="instantiate")

    def parse_arguments(self, parser: LightningArgumentParser, args) -> None:
        super().parse_arguments(parser, args)
        subcommand = self.config.get("subcommand")
        ckpt_path = subcommand and self.config[subcommand].get("ckpt_path")
        if ckpt_path and ckpt_path not in ("last", "best"):
            check_checkpoint(ckpt_path)  # before Lightning reads it, to fail with one line

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        if config.model.get("vocab") is not None and config.data.vocab is None:
            # --ckpt_path filled the model's args from the checkpoint: keep its vocabulary, need no corpus.
            config.data.vocab = config.model.vocab
        if self.subcommand == "fit" and config.ckpt_path == "last":
            _log_into_last_run(config)
        callbacks = config.trainer.get("callbacks")
        if config.trainer.get("enable_progress_bar") is False and callbacks:
            # --trainer.enable_progress_bar false wins over a config's bar settings (Lightning
            # would refuse the combination).
            callbacks = callbacks if isinstance(callbacks, list) else [callbacks]
            config.trainer.callbacks = [c for c in callbacks if not _is_progress_bar(c)]
        if self.subcommand != "fit":
            # Only training writes checkpoints; elsewhere this warning about their folder is noise.
            warnings.filterwarnings("ignore", message="The dirpath has changed from")


def _is_progress_bar(callback) -> bool:
    """True for a progress-bar callback, given as an object or as a ``class_path`` config entry."""
    if not isinstance(callback, (dict, Namespace)):
        return isinstance(callback, ProgressBar)
    path = str(callback.get("class_path", ""))
    module, _, name = path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        return path.endswith("ProgressBar")  # not importable here: Lightning will say so itself
    return isinstance(cls, type) and issubclass(cls, ProgressBar)


def check_checkpoint(path: str) -> None:
    """Raise a one-line ``UserError`` unless ``path`` is a readable checkpoint of this project."""
    hint = "give the path of a .ckpt file, e.g. lightning_logs/cpu/version_0/checkpoints/last.ckpt"
    if not Path(path).is_file():
        raise UserError(f"checkpoint {path} does not exist: {hint}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:
        raise UserError(
            f"checkpoint {path} cannot be read ({type(e).__name__}): it is truncated or corrupt; {hint}"
        ) from None
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "vocab" not in ckpt.get("hyper_parameters", {}):
        raise UserError(f"{path} is not a shakespeare-gpt checkpoint (no weights or vocabulary in it); {hint}")


def _log_into_last_run(config: Namespace) -> None:
    """Point the TensorBoard logger at the newest run that has a ``last.ckpt``.

    Lightning looks for ``last.ckpt`` in the logger's *current* version folder, which is a fresh
    one for every run; without this, ``fit --ckpt_path last`` would silently start over.
    """
    logger = config.trainer.logger
    if not (isinstance(logger, Namespace) and str(logger.get("class_path", "")).endswith("TensorBoardLogger")):
        return
    args = logger.init_args
    if args.get("version") is not None:
        return
    root = Path(args.save_dir) / (args.get("name") or "")
    runs = sorted(root.glob("version_*/checkpoints/last.ckpt"), key=lambda p: p.stat().st_mtime)
    if runs:
        args.version = runs[-1].parent.parent.name


def cli_main(args: list[str] | None = None, run: bool = True) -> ShakespeareCLI:
    """Run the CLI; ``args`` replaces ``sys.argv[1:]`` (tests pass it, so pytest's argv is not parsed).

    With ``run=False`` there is no subcommand: the model, data and trainer are only built
    from the config (the benchmark uses this to time exactly what ``fit`` would run).
    """
    # Lightning 2.6 on torch 2.13 warns about a torch-internal deprecation on every run; it is noise here.
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")
    if torch.cuda.is_available():
        torch.set_float32_matmul_precision("high")  # TF32 matmuls for whatever runs in fp32
    try:
        return ShakespeareCLI(
            ShakespeareGPT,
            ShakespeareDataModule,
            seed_everything_default=1337,
            save_config_callback=FitConfigSaver,
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
    except UserError as e:
        sys.stderr.write(f"error: {e}\n")
        raise SystemExit(1) from None
