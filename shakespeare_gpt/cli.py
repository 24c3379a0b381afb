"""``shakespeare-gpt {fit,validate,test,predict}``: LightningCLI wiring of data, model and trainer.

``build`` is the same entry point as a Python API: the tools use it to get exactly the model, data
and trainer a command would, then run and read them themselves. Values are checked by the types
of the classes' signatures (jsonargparse's) and by Lightning; their refusals end as one line.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import torch
import yaml
from jsonargparse import ArgumentError, Namespace
from jsonargparse.typing import PositiveInt
from lightning.fabric.plugins import CheckpointIO
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from . import checkpoints
from .callbacks import (
    AttentionMaps,
    EmbeddingProjector,
    InterruptCheckpoint,
    RandomState,
    RunLock,
    RunSummary,
    SampleWriter,
    StepProgressBar,
    StopOnNonFiniteLoss,
    TextSample,
    Throughput,
)
from .data import ShakespeareDataModule, corpus_memory
from .hardware import default_precision, default_threads, host_memory
from .lightning_module import CharModelSettings, LanguageModel, Recipe
from .pretrained import PretrainedLM  # noqa: F401 (known to --model by its short name)
from .sampling import Sampling
from .utils import UserError, atomic_open, check_writable, exit_with

PROG = "shakespeare-gpt"
DESCRIPTION = (
    "Train a character-level GPT written from scratch (on tiny Shakespeare, bundled, or any text), follow it in "
    "TensorBoard, and sample from its checkpoints; or fine-tune, score and sample a Hugging Face model the same way. "
    "Quick start: shakespeare-gpt fit --config configs/cpu.yaml. The model's settings: shakespeare-gpt fit "
    "--model.help ShakespeareGPT (the character model, the default) or --model.help PretrainedLM"
)
# What a user can fix: jsonargparse's refusal of a flag or value, Lightning's of a trainer setting, ours.
REFUSED = (UserError, ArgumentError, MisconfigurationException)


class FitConfigSaver(SaveConfigCallback):
    """Saves the resolved config next to a training run's logs, whole or not at all; sampling runs leave no file."""

    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage == "fit":
            self.log_dir = trainer.log_dir  # on every rank: reading it is a collective call
            super().setup(trainer, pl_module, stage)

    def save_config(self, trainer, pl_module, stage: str) -> None:  # rank zero's, with save_to_log_dir off
        with atomic_open(Path(self.log_dir) / self.config_filename) as f:
            f.write(self.parser.dump(self.config, skip_none=False))


class ShakespeareCLI(LightningCLI):
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        # Each subcommand's parser is named "shakespeare-gpt <subcommand>" (see build); the tools' one parser fits.
        subcommand = parser.prog.rpartition(" ")[2] if " " in parser.prog else "fit"
        parser.set_defaults({"model": {"class_path": checkpoints.CHAR_MODEL}})
        parser.link_arguments("model.init_args.block_size", "data.block_size")  # the model's context decides
        parser.add_argument(
            "--threads",
            type=PositiveInt,
            default=None,
            help="CPU threads (default: one per core, fewer when other processes keep cores busy; or OMP_NUM_THREADS)",
        )
        if subcommand == "fit":
            # A new character model reads the corpus's characters; any other run's model (a checkpoint, a
            # pretrained model) brings its own tokenizer, which the data encodes with.
            parser.link_arguments("data.vocab", "model.init_args.vocab", apply_on="instantiate")
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
            parser.add_lightning_class_args(Throughput, "throughput")
            parser.add_lightning_class_args(EmbeddingProjector, "projector")
        if subcommand in ("fit", "predict"):
            parser.add_lightning_class_args(AttentionMaps, "attention_maps")
        if subcommand == "predict":
            parser.add_class_arguments(Sampling, "sample")
            parser.add_lightning_class_args(SampleWriter, "writer")

    def parse_arguments(self, parser: LightningArgumentParser, args) -> None:
        super().parse_arguments(parser, args)
        subcommand = self.config.get("subcommand")
        config = self.config[subcommand] if subcommand else self.config
        # How the run is executed stays the command line's, whatever the checkpoint says (see before_instantiate).
        self.runtime_settings = {k: config.model.init_args.get(k) for k in checkpoints.RUNTIME_SETTINGS}
        check_run(config, subcommand)
        self.resumed_run = (
            checkpoints.resolve(config, subcommand, args) if subcommand and config.get("ckpt_path") else None
        )
        if subcommand == "predict":  # by default beside the checkpoint's run, where that can be written
            config.writer.path = config.writer.path or str(checkpoints.samples_file(config.get("ckpt_path")))
            check_writable(Path(config.writer.path), "--writer.path", folder=False)

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        model = config.model.init_args
        for key, value in self.runtime_settings.items():
            if key in model and value is not None:
                model[key] = value
        if "trust_remote_code" in model:  # only ever from this command line or config, never from a checkpoint
            model.trust_remote_code = bool(self.runtime_settings["trust_remote_code"])
        given = config.trainer.get("callbacks") or []
        given = given if isinstance(given, list) else [given]
        bar = any(str(c.get("class_path")).endswith("ProgressBar") for c in given)
        if config.trainer.get("enable_progress_bar") is False and bar:
            # --trainer.enable_progress_bar false wins over a config's bar (Lightning refuses the two together).
            config.trainer.callbacks = [c for c in given if not str(c.get("class_path")).endswith("ProgressBar")]
        check_memory(config, self.subcommand)
        self.choices = choose_precision_and_threads(config, self.subcommand)  # said once every check passed
        if self.subcommand in ("validate", "test", "predict"):
            # A number or samples, printed: nothing to chart, and no new run folder (a config shared with fit
            # may still name its logger).
            config.trainer.logger = False
        # A new version_N folder, holding its checkpoints, is one RunLock may remove.
        fresh = checkpoints.in_version_folders(config) and config.trainer.logger.init_args.get("version") is None
        callbacks = [InterruptCheckpoint(), StopOnNonFiniteLoss(), RandomState(), RunLock(fresh=fresh), RunSummary()]
        if not bar and config.trainer.get("enable_progress_bar") is not False:
            callbacks.append(StepProgressBar())
        if config.trainer.get("logger") not in (False, None):  # the learning-rate curve and samples need a logger
            callbacks += [LearningRateMonitor(logging_interval="step"), TextSample()]
        self.trainer_defaults["callbacks"] = callbacks

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except ValueError as e:  # jsonargparse wraps a class's own refusal (a UserError) in one of its errors
            cause = e
            while cause is not None and not isinstance(cause, UserError):
                cause = cause.__cause__ or cause.__context__
            raise cause or e from None

    def instantiate_trainer(self, **kwargs):
        config = self.config_init[self.subcommand] if self.subcommand else self.config_init
        plugins = config.trainer.get("plugins") or []
        plugins = plugins if isinstance(plugins, list) else [plugins]
        if not any(isinstance(p, CheckpointIO) for p in plugins):  # checkpoints whole or absent, unless told otherwise
            kwargs["plugins"] = [*plugins, checkpoints.AtomicCheckpointIO()]
        try:
            return super().instantiate_trainer(**kwargs)
        except (TypeError, ValueError) as e:  # Lightning's refusals of --trainer values (devices, strategy, ...)
            raise UserError(f"--trainer settings refused by Lightning: {e}") from None

    def after_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        # fit reads a character model's vocabulary from the corpus; resumed, it must be the checkpoint's.
        saved, read = config.model.init_args.get("vocab"), self.model.hparams.get("vocab")
        if self.subcommand == "fit" and config.get("ckpt_path") and saved not in (None, read):
            unknown = "".join(sorted(set(read) - set(saved)))
            raise UserError(
                f"the corpus {self.datamodule.corpus} does not fit the checkpoint: "
                + (f"characters not in its vocabulary: {unknown!r}" if unknown else "it lacks some of its characters")
                + "; resume the run on the corpus it was trained on"
            )
        for callback in self.trainer.callbacks:
            if isinstance(callback, AttentionMaps):
                callback.check(self.model, self.subcommand)
        if self.resumed_run is not None and rank_zero_only.rank == 0:  # every check passed: the run is ours
            run_lock = next(c for c in self.trainer.callbacks if isinstance(c, RunLock))
            run_lock.handle = checkpoints.lock_run(self.resumed_run)
        for line in self.choices:
            rank_zero_info(line)

    def before_predict(self) -> None:
        sampling = self.config_init.predict.sample  # the --sample.* settings, all checked before anything is drawn
        sampling.check(self.model.tokenizer)
        self.datamodule.sampling = sampling


def check_run(config: Namespace, subcommand: str | None) -> None:
    """What Lightning takes and then fails on, and every folder and file the run will write, tried
    before anything is written."""
    model, trainer = config.model.init_args, config.trainer
    for flag in ("val_check_interval", "log_every_n_steps"):  # Lightning takes 0, then divides by it
        if trainer.get(flag) == 0:
            raise UserError(f"--trainer.{flag} 0: give a number of training steps >= 1")
    recipe = Recipe(**{f.name: model[f.name] for f in dataclasses.fields(Recipe) if f.name in model})
    recipe.decay_steps_of(trainer.get("max_steps"))  # a cosine schedule needs an end
    if subcommand not in ("fit", None):  # only fit writes logs and checkpoints
        return
    logger, dirpath = config.trainer.get("logger"), config.get("checkpoint", Namespace()).get("dirpath")
    logs = isinstance(logger, Namespace) and logger.get("init_args") and logger.init_args.get("save_dir")
    places = {"--trainer.logger.init_args.save_dir": logs, "--checkpoint.dirpath": dirpath}
    if not logs or not dirpath:  # Lightning's fallback for whatever has no folder of its own
        places["--trainer.default_root_dir"] = config.trainer.get("default_root_dir") or "."
    for flag, place in places.items():
        if place:
            check_writable(Path(place), flag)


def run_device(config: Namespace) -> str:
    """Where the run will go (cuda, mps or cpu), as ``--trainer.accelerator`` and this machine decide."""
    accelerator = str(config.trainer.get("accelerator"))
    if accelerator in ("gpu", "cuda", "auto") and torch.cuda.is_available():
        return "cuda"
    if accelerator in ("gpu", "mps", "auto") and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def recorded(config: Namespace, subcommand: str | None) -> dict:
    """The precision and threads in the ``config.yaml`` of the run whose checkpoint a command continues
    (fit) or scores (validate, test), so that it computes as that run did; empty for any other command."""
    saved = Path(config.get("ckpt_path") or "").parent.parent / "config.yaml"
    if subcommand not in ("fit", "validate", "test") or not config.get("ckpt_path") or not saved.is_file():
        return {}
    settings = yaml.safe_load(saved.read_text()) or {}
    # No precision named: the file was written before one was chosen here, when Lightning's default ran.
    precision = (settings.get("trainer") or {}).get("precision") or "32-true"
    return {"precision": precision, "threads": settings.get("threads")}


def choose_precision_and_threads(config: Namespace, subcommand: str | None) -> list[str]:
    """Fill in the precision and the CPU threads the command line left out: a continued or scored run's
    own, else what ``hardware.py`` chooses; the run's ``config.yaml`` records them. Returns what a
    command says of them, a line each. The tools (no subcommand) get the precision; threads are theirs."""
    saved, said = recorded(config, subcommand), []
    if config.trainer.get("precision") is None:
        if saved.get("precision"):
            config.trainer.precision, why = saved["precision"], f"as {config.ckpt_path}'s run recorded"
        else:
            config.trainer.precision, why = default_precision(run_device(config), subcommand)
        if subcommand:
            said.append(f"precision {config.trainer.precision}: {why} (--trainer.precision chooses)")
    if config.get("threads") is None and subcommand == "fit":
        config.threads = saved.get("threads")  # a resumed run goes on with its own
    several = config.trainer.get("devices") not in (1, "1", None, "auto") or (config.trainer.get("num_nodes") or 1) > 1
    if config.get("threads"):  # this process's, and those of the processes Lightning launches for DDP
        torch.set_num_threads(config.threads)
        os.environ["OMP_NUM_THREADS"] = str(config.threads)
    elif subcommand and not several:  # several processes: Lightning gives each cores / processes
        config.threads, why = default_threads()
        torch.set_num_threads(config.threads)
        said += [why] if why else []
    return said


def check_memory(config: Namespace, subcommand: str | None) -> None:
    """Refuse, before anything is allocated, a character model, batches and corpus that cannot fit in memory."""
    if checkpoints.class_name(config.model.class_path) != checkpoints.class_name(checkpoints.CHAR_MODEL):
        return  # the estimate knows this project's GPT only
    args = {k: v for k, v in config.model.init_args.items() if k not in ("vocab", "sample_tokens", "compile")}
    arch = CharModelSettings(**args)  # vocab_size stays at its default (65): a stand-in that changes little
    flag = {"validate": "val_batch_size", "test": "val_batch_size", "predict": "num_samples"}.get(subcommand)
    if flag == "num_samples":
        batch = min(config.sample.num_samples, config.sample.batch_size)
    else:
        batch = config.data.get(flag or "batch_size") or config.data.batch_size
    cuda = run_device(config) == "cuda"
    have = torch.cuda.get_device_properties(0).total_memory if cuda else host_memory()
    need = arch.memory_bytes(batch, training=subcommand in ("fit", None))
    if subcommand in ("fit", None):  # each validation's batches, beside the training state
        val_batch = config.data.get("val_batch_size") or config.data.batch_size
        need += arch.memory_bytes(val_batch, training=False) - arch.memory_bytes(0, training=False)
    if subcommand != "predict" and cuda == bool(config.data.get("on_device")):  # the corpus, where it is kept
        need += corpus_memory(config.data.corpus, config.data.get("on_device"))
    if need > have:
        where = "--sample" if flag == "num_samples" else "--data"
        raise UserError(
            f"--model.block_size {arch.block_size} with {where}.{flag or 'batch_size'} {batch} needs at least "
            f"{need / 2**30:.0f} GiB, more than the {have / 2**30:.0f} GiB {'this GPU' if cuda else 'this machine'} "
            "has (the corpus and validation counted): choose a smaller batch or --model.block_size"
        )


def build(args: list[str] | dict | None = None, run: bool = False, save_config: bool = True) -> ShakespeareCLI:
    """Parse ``args`` as the command line would and build model, data and trainer.

    ``run=False`` (the tools' use): no subcommand, nothing run; the caller calls
    ``cli.trainer.fit(cli.model, cli.datamodule)`` itself. ``run=True`` runs the subcommand in
    ``args``. Bad input raises one of ``REFUSED``. ``save_config=False``: no ``config.yaml``.
    """
    # Errors come back as exceptions, and no flag is matched by a prefix of its name.
    strict = {"exit_on_error": False, "allow_abbrev": False}
    subcommands = {name: {"prog": f"{PROG} {name}", **strict} for name in ShakespeareCLI.subcommands()}
    return ShakespeareCLI(
        LanguageModel,
        ShakespeareDataModule,
        subclass_mode_model=True,
        parser_kwargs={"prog": PROG, "description": DESCRIPTION, **strict, **subcommands},
        seed_everything_default=1337,
        save_config_callback=FitConfigSaver if save_config else None,
        save_config_kwargs={"overwrite": True, "save_to_log_dir": False},  # FitConfigSaver writes it
        auto_configure_optimizers=False,
        trainer_defaults={
            "check_val_every_n_epoch": None,
            # The data module gives each rank its own training windows and every rank the whole
            # val split, so the val loss is the same with any number of processes.
            "use_distributed_sampler": False,
            "logger": {
                "class_path": "shakespeare_gpt.callbacks.TensorBoard",
                "init_args": {"save_dir": "lightning_logs", "name": "", "default_hp_metric": False},
            },
        },
        args=args,
        run=run,
    )


def refusal(args: list[str]) -> str | None:
    """Why the command line refuses ``args``, on one line, or None when it takes them (nothing is run or written)."""
    try:
        build(args, save_config=False)
    except REFUSED as e:
        return " ".join(str(e).split())
    return None


def cli_main(args: list[str] | None = None) -> ShakespeareCLI:
    """The command line; ``args`` replaces ``sys.argv[1:]``. A refusal ends as one line and exit status 1."""
    try:
        return build(args, run=True)
    except REFUSED as e:
        exit_with(e)
