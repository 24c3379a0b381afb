"""``python -m shakespeare_gpt {fit,validate,test,predict}``: LightningCLI wiring of data, model and trainer.

``build`` is the same entry point as a Python API: the benchmark and the study runner use it to
get exactly the model, data and trainer a command would, then run and read them themselves.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import inspect
import logging
import os
import re
import sys
import warnings
from pathlib import Path

import lightning as L
import torch
import yaml
from jsonargparse import ArgumentError, Namespace
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.utilities import rank_zero_only
from lightning.pytorch.utilities.exceptions import MisconfigurationException

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
from .data import CharTokenizer, ShakespeareDataModule
from .errors import UserError, check_writable
from .lightning_module import LanguageModel, ShakespeareGPT
from .model import GPTConfig
from .pretrained import PretrainedLM
from .sampling import Sampling

# Model settings that may differ from a checkpoint's: how the run is executed, not what it computes.
RUNTIME_SETTINGS = ("compile", "sample_tokens", "trust_remote_code", "pretrained")  # pretrained: where, not what
CHAR_MODEL = f"{ShakespeareGPT.__module__}.{ShakespeareGPT.__name__}"  # --model's class unless a config says
PRETRAINED_MODEL = f"{PretrainedLM.__module__}.{PretrainedLM.__name__}"


def class_name(class_path: str) -> str:
    """The class a ``class_path`` names, in any of the forms jsonargparse writes it (``shakespeare_gpt.X``, ...)."""
    return str(class_path).rpartition(".")[2]


def is_char_model(class_path: str) -> bool:
    return class_name(class_path) == ShakespeareGPT.__name__


CHECKPOINT_HINT = (
    "give a .ckpt file, e.g. lightning_logs/cpu/version_0/checkpoints/last.ckpt, "
    "or a folder of runs, e.g. lightning_logs/cpu, for the checkpoint with the lowest val loss among them"
)
PROG = "shakespeare-gpt"
DESCRIPTION = (
    "shakespeare-gpt: train a character-level GPT written from scratch (on tiny Shakespeare, bundled, or any "
    "text), follow it in TensorBoard, and sample from its checkpoints; or fine-tune, score and sample a Hugging Face "
    "model the same way. Quick start: shakespeare-gpt fit --config configs/cpu.yaml. The model's settings: "
    "shakespeare-gpt fit --model.help ShakespeareGPT (the character model, the default) or --model.help PretrainedLM"
)


def described(
    method,
    sentence: str,
    ckpt_path: str = "a .ckpt file, or a folder of runs (e.g. lightning_logs/cpu) for their best one.",
):
    """``method`` with another docstring: the sentence ``--help`` shows for a subcommand, and its two flags."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        return method(self, *args, **kwargs)

    wrapper.__doc__ = f"""{sentence}

    Args:
        ckpt_path: {ckpt_path}
        weights_only: how ``torch.load`` reads the checkpoint; leave it null.
    """
    return wrapper


class Trainer(L.Trainer):
    """Lightning's Trainer: where, how long and in which precision to run (its own flags, as Lightning documents them).

    Only the subcommands' one-sentence descriptions in ``--help`` are this project's: Lightning's
    own docstrings run on for a paragraph.
    """

    fit = described(
        L.Trainer.fit,
        "Train a model, from scratch or resumed; logs and checkpoints go under lightning_logs/.",
        "``last`` resumes the newest run of this config where it stopped; or a .ckpt file.",
    )
    validate = described(L.Trainer.validate, "Report a checkpoint's loss and bits per character on the val split.")
    test = described(
        L.Trainer.test, "The same as validate, logged as test/loss: tiny Shakespeare has no separate test split."
    )
    predict = described(L.Trainer.predict, "Sample text from a checkpoint: printed, and written to --writer.path.")


class FitConfigSaver(SaveConfigCallback):
    """Saves the resolved config next to a training run's logs; sampling runs leave no file."""

    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage == "fit":
            super().setup(trainer, pl_module, stage)


class ShakespeareCLI(LightningCLI):
    def __init__(self, *args, **kwargs) -> None:
        self.parsers: dict[str, LightningArgumentParser] = {}  # each subcommand's, for "did you mean"
        super().__init__(*args, **kwargs)

    def add_core_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        # The project's settings first in --help, Lightning's Trainer (some 50 flags) after them.
        # --model is the character model unless a config (or --model) names another LanguageModel.
        parser.add_lightning_class_args(LanguageModel, "model", subclass_mode=True)
        parser.set_defaults({"model": {"class_path": CHAR_MODEL}})
        parser.groups["model"].title = (
            "The model: ShakespeareGPT, the character model (the default), or PretrainedLM, a Hugging Face causal LM "
            "(a config's model.class_path chooses); --model.help ShakespeareGPT or --model.help PretrainedLM lists "
            "its settings, each given as --model.<setting>"
        )
        parser.add_lightning_class_args(ShakespeareDataModule, "data")
        parser.add_lightning_class_args(self.trainer_class, "trainer")
        parser.set_defaults({f"trainer.{k}": v for k, v in self.trainer_defaults.items() if k != "callbacks"})

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        # build() names each subcommand's parser "shakespeare-gpt <subcommand>"; without subcommands
        # (the tools' use of build) the one parser is for fit.
        subcommand = parser.prog.split()[-1] if parser.prog.split()[-1] in self.subcommands() else "fit"
        self.parsers[subcommand] = parser
        # One source of truth for the context length: the model's.
        parser.link_arguments("model.init_args.block_size", "data.block_size")
        # The data decides a character model's vocabulary; the model stores it, so a checkpoint can
        # decode alone. (A pretrained model brings its own tokenizer: see before_instantiate_classes.)
        parser.link_arguments("data.vocab", "model.init_args.vocab", apply_on="instantiate")
        if subcommand == "fit":
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
            # Lightning's own docstring stops mid-sentence as a heading.
            parser.groups["checkpoint"].title = "Lightning's ModelCheckpoint: which checkpoints a run keeps, and where"
            parser.add_lightning_class_args(Throughput, "throughput")
        if subcommand == "predict":
            parser.add_class_arguments(Sampling, "sample")
            parser.add_lightning_class_args(SampleWriter, "writer")

    def parse_arguments(self, parser: LightningArgumentParser, args) -> None:
        try:
            super().parse_arguments(parser, args)
        except ArgumentError as e:
            raise UserError(self.explain(e, args)) from None
        subcommand = self.config.get("subcommand")
        config = self.config[subcommand] if subcommand else self.config
        self.runtime_settings = {k: config.model.init_args.get(k) for k in RUNTIME_SETTINGS}
        self.run_lock = None
        check_device(config.trainer)
        check_precision(config.trainer)
        if subcommand in ("fit", None):
            check_fit(config)
        if subcommand == "predict":
            check_writable(Path(config.writer.path), "--writer.path", folder=False)
            if not config.get("ckpt_path") and is_char_model(config.model.class_path):
                raise UserError(f"predict samples from a trained model: add --ckpt_path ({CHECKPOINT_HINT})")
        ckpt_path = subcommand and config.get("ckpt_path")
        if ckpt_path in ("last", "best") and subcommand != "fit":
            raise UserError(
                f"--ckpt_path {ckpt_path} names a checkpoint of a training run in progress; to {subcommand}, give a "
                "checkpoint or a run folder (e.g. lightning_logs/cpu)"
            )
        if not ckpt_path or ckpt_path == "best":
            return
        # Before Lightning reads the checkpoint, and before anything is written: one line, not a traceback.
        run = None
        if ckpt_path == "last":
            config.ckpt_path, ckpt, run = resume(config)
        else:
            if subcommand != "fit" and Path(ckpt_path).is_dir():
                config.ckpt_path = str(best_checkpoint(Path(ckpt_path)))
                print(f"checkpoint: {config.ckpt_path}", file=sys.stderr)
            ckpt = read_checkpoint(config.ckpt_path)
        check_matches(config.model, ckpt, config.ckpt_path)
        if subcommand == "predict" and "vocab" in ckpt["hyper_parameters"]:  # the prompt, before any work
            Sampling(**config.sample.as_dict()).request(CharTokenizer(ckpt["hyper_parameters"]["vocab"]))
        if run is not None and rank_zero_only.rank == 0:  # the other processes of a run are started by this one
            self.run_lock = lock_run(run)

    def explain(self, error: ArgumentError, args) -> str:
        """jsonargparse's error in one line, with the closest known option where one is close."""
        message = " ".join(str(error).split()).replace("model.init_args.", "model.")
        argv = [str(a) for a in args] if isinstance(args, list) else sys.argv[1:]
        subcommand = next((a for a in argv if a in self.parsers), None)
        if len(self.parsers) == 1:  # no subcommands
            subcommand = next(iter(self.parsers))
        help_hint = f"see {PROG} {subcommand or ''} --help".replace("  ", " ")
        unknown = []
        # --model is a choice of classes: jsonargparse wraps what the chosen class said about a
        # value in "does not validate against any of the Union subtypes"; unwrap it.
        if m := re.match(
            r"Parser key \"model\": .*?Problem with given class_path '[^']*': (.*) - Expected a <class 'NoneType'>",
            message,
        ):
            inner = m.group(1)
            if m2 := re.match(r"Option '(\w+)' is not accepted", inner):
                unknown = [f"model.{m2.group(1)}"]
                message = f"--model.{m2.group(1)} is not a setting of {self.model_name(argv)}"
            else:
                message = re.sub(r'^Parser key "(\w+)"', r'Parser key "model.\1"', inner)
        if m := re.match(r'Parser key "([\w.]+)": (.*)', message):
            key, why = m.groups()
            value = m2.group(1) if (m2 := re.search(r"Got value: (.*?)(?: Errors:|$)", why)) else None
            value = value or (m3.group(1) if (m3 := re.search(r"Given value: (.*)$", why)) else None)
            kinds = {"int": "a whole number", "float": "a number", "bool": "true or false", "str": "text"}
            if m4 := re.match(r"Expected a <class '(\w+)'>", why):
                return f"--{key} {value}: give {kinds.get(m4.group(1), m4.group(1))}; {help_hint}"
            if m4 := re.match(r"Expected a typing\.Literal\[(.*?)\]", why):
                return f"--{key} {value}: give one of {m4.group(1)}; {help_hint}"
            if "Union subtypes" in why:
                options = re.findall(r"Expected a (?:<class '(\w+)'>|typing\.Literal\[(.*?)\])", why)
                choices = [kinds.get(c, c) if c else f"one of {lit}" for c, lit in options if c != "NoneType"]
                choices += ["null"] if "NoneType" in why else []
                return f"--{key} {value}: give {' or '.join(choices)}; {help_hint}"
            return f"--{key}: {why[:200]}; {help_hint}"
        if (m := re.search(r"invalid choice: '([^']*)'", message)) and (
            close := difflib.get_close_matches(m.group(1), self.parsers, n=1)
        ):
            return f"{message}; did you mean {close[0]}?"
        unknown += re.findall(r"--([\w.]+)", message.partition("unrecognized arguments:")[2])
        unknown += re.findall(r"Subcommand '\w+' does not accept options? '([\w.]+)'", message)
        unknown += [f"{g}.{k}" for g, k in re.findall(r"Group '([\w.]+)' does not accept options? '([\w.]+)'", message)]
        if subcommand is None or not unknown:
            return message
        known = [k for k in list(self.parsers[subcommand].get_defaults().keys()) if not k.startswith("model.")]
        pretrained = self.model_name(argv) == "PretrainedLM"
        char_settings, pretrained_settings = model_defaults(CHAR_MODEL), model_defaults(PRETRAINED_MODEL)
        known += [f"model.{k}" for k in (pretrained_settings if pretrained else char_settings)]
        hints = []
        for key in unknown:
            if pretrained and key.startswith("model.") and key[len("model.") :] in char_settings:
                hints.append(
                    "it is a setting of ShakespeareGPT, the character model; a pretrained model's architecture is "
                    "its own (its config.json)"
                )
                continue
            close = difflib.get_close_matches(key, known, n=1, cutoff=0.75)
            if not close:  # a misspelt field under the right group: compare field names alone
                group, _, field = key.rpartition(".")
                fields = [k.rpartition(".")[2] for k in known if k.rpartition(".")[0] == group]
                close = [f"{group}.{f}" for f in difflib.get_close_matches(field, fields, n=1, cutoff=0.7)]
            if close:
                hints.append(f"did you mean --{close[0]}?")
            elif key.rpartition(".")[2] in {f.name for f in dataclasses.fields(Sampling)}:
                hints.append(f"sampling settings are --sample.{key.rpartition('.')[2]}, given to predict")
            elif key.startswith("model.") and key[len("model.") :] in pretrained_settings:
                hints.append(
                    "it is a setting of PretrainedLM, the Hugging Face model: add --model PretrainedLM, or use a "
                    "config that names it (e.g. configs/gpt2_finetune.yaml)"
                )
        return f"{message}; {' '.join(hints) or help_hint}"

    def model_name(self, argv: list[str]) -> str:
        """The model class the arguments choose (``--model``, or a config's ``model.class_path``), for messages."""
        chosen = None
        argv = [part for arg in argv for part in (arg.split("=", 1) if arg.startswith("--") else [arg])]
        for flag, value in zip(argv, argv[1:], strict=False):
            if flag in ("--config", "-c") and Path(value).is_file():
                try:
                    model = (yaml.safe_load(Path(value).read_text()) or {}).get("model")
                except (yaml.YAMLError, AttributeError, UnicodeDecodeError):
                    continue
                chosen = model.get("class_path", chosen) if isinstance(model, dict) else chosen
            elif flag == "--model" or flag == "--model.class_path":
                chosen = value
        if chosen and not is_char_model(chosen):
            return class_name(chosen)
        return "ShakespeareGPT (the character model)"

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        # Lightning has filled the model's arguments from --ckpt_path; how to run stays the user's.
        model = config.model.init_args
        for key, value in self.runtime_settings.items():
            if key in model and value is not None:
                model[key] = value
        if "trust_remote_code" in model:  # only ever from this command line or config, never from a checkpoint
            model.trust_remote_code = bool(self.runtime_settings["trust_remote_code"])
        if model.get("vocab") is not None and config.data.vocab is None:
            config.data.vocab = model.vocab  # the checkpoint's vocabulary: no corpus needed
        if config.trainer.get("enable_progress_bar") is False and config.trainer.get("callbacks"):
            # --trainer.enable_progress_bar false wins over a config's bar settings (Lightning
            # would refuse the combination).
            callbacks = config.trainer.callbacks
            callbacks = callbacks if isinstance(callbacks, list) else [callbacks]
            config.trainer.callbacks = [c for c in callbacks if not str(c.get("class_path")).endswith("ProgressBar")]
        check_memory(config, self.subcommand)
        if self.subcommand in ("validate", "test", "predict"):
            # One number, or samples: printed; nothing to chart, and no new run folder among the runs
            # (a config shared with fit may still name its logger).
            config.trainer.logger = False
        # The callbacks every run gets; the learning-rate curve only where there is a logger to draw it.
        run_lock = RunLock(self.run_lock)
        self.trainer_defaults["callbacks"] = [InterruptCheckpoint(), StopOnNonFiniteLoss(), RandomState(), run_lock]
        if config.trainer.get("logger") not in (False, None):
            self.trainer_defaults["callbacks"] += [LearningRateMonitor(logging_interval="step"), TextSample()]

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except (TypeError, ValueError) as e:
            # jsonargparse reports a model class that refused its arguments as "does not validate
            # against any of the Union subtypes"; the refusal itself is the one line to show.
            cause = e
            while cause is not None and not isinstance(cause, UserError):
                cause = cause.__cause__ or cause.__context__
            raise cause or e from None

    def instantiate_trainer(self, **kwargs):
        try:
            return super().instantiate_trainer(**kwargs)
        except (TypeError, ValueError) as e:  # Lightning's refusals of --trainer values (e.g. devices, strategy)
            raise UserError(f"--trainer settings refused by Lightning: {e}") from None

    def after_instantiate_classes(self) -> None:
        if isinstance(self.model, PretrainedLM):  # the model's own tokenizer reads the text and the prompt
            self.datamodule.tokenizer = self.model.tokenizer
        if self.subcommand != "predict":  # the corpus against the vocabulary, before anything is written
            self.datamodule.encoded  # noqa: B018 (read, checked and kept for setup)

    def before_predict(self) -> None:
        self.datamodule.sampling = self.config_init.predict.sample  # the --sample.* settings


def check_device(trainer: Namespace) -> None:
    """A GPU config on a machine without one: one line that names the CPU recipe."""
    if str(trainer.get("accelerator")) in ("gpu", "cuda") and not torch.cuda.is_available():
        raise UserError(
            "this config asks for a CUDA GPU (--trainer.accelerator gpu) and this machine has none: "
            "train with --config configs/cpu.yaml, or add --trainer.accelerator cpu"
        )


def check_precision(trainer: Namespace) -> None:
    """A note, not an error, for bf16 on a CPU that emulates it (Linux, where /proc/cpuinfo tells)."""
    on_cpu = trainer.get("accelerator") == "cpu" or not torch.cuda.is_available()
    cpuinfo = Path("/proc/cpuinfo")
    if not (on_cpu and str(trainer.get("precision")).startswith("bf16") and cpuinfo.is_file()):
        return
    if not re.search(r"\b(avx512_bf16|amx_bf16)\b", cpuinfo.read_text()):
        print(
            "note: this CPU has no bf16 instructions (avx512_bf16 or amx_bf16), so bf16 is emulated and slower "
            "than fp32 here: --trainer.precision 32-true is faster",
            file=sys.stderr,
        )


def check_fit(config: Namespace) -> None:
    """Training settings Lightning would reject mid-setup, or accept and then loop on forever."""
    trainer = config.trainer
    max_steps, interval = trainer.get("max_steps"), trainer.get("val_check_interval")
    if not isinstance(max_steps, int) or max_steps == 0 or max_steps < -1:
        raise UserError(f"--trainer.max_steps {max_steps!r}: give a number of training steps >= 1")
    model = config.model.init_args
    if max_steps == -1 and model.get("lr_schedule") == "cosine" and model.get("decay_steps") is None:
        raise UserError("a cosine schedule needs an end: give --trainer.max_steps or --model.decay_steps")
    if interval is not None and (isinstance(interval, bool) or not isinstance(interval, int) or interval < 1):
        # Training is counted in steps, not epochs (check_val_every_n_epoch is None): a fraction has no meaning.
        raise UserError(f"--trainer.val_check_interval {interval}: give a number of steps >= 1 between validations")
    log_every = trainer.get("log_every_n_steps")
    if log_every is not None and log_every < 1:
        raise UserError(f"--trainer.log_every_n_steps {log_every}: give a number of steps >= 1")
    # Everything fit writes, checked before anything is: the logs (with config.yaml) and checkpoints.
    logger, dirpath = trainer.get("logger"), config.checkpoint.get("dirpath")
    logs = isinstance(logger, Namespace) and logger.get("init_args") and logger.init_args.get("save_dir")
    if logs:
        check_writable(Path(logs), "--trainer.logger.init_args.save_dir")
    if dirpath:
        check_writable(Path(dirpath), "--checkpoint.dirpath")
    if not logs or not dirpath:  # Lightning's fallback for whatever has no folder of its own
        check_writable(Path(trainer.get("default_root_dir") or "."), "--trainer.default_root_dir")


def check_memory(config: Namespace, subcommand: str | None) -> None:
    """Refuse, before anything is allocated, a model and batch that cannot fit in this machine's memory."""
    if not is_char_model(config.model.class_path):  # the estimate knows this project's GPT only
        return
    args = config.model.init_args
    model = {k: args[k] for k in (f.name for f in dataclasses.fields(GPTConfig)) if k in args}
    arch = GPTConfig(**model)  # vocab_size stays at its default (65): a stand-in that changes little
    training = subcommand in ("fit", None)
    batch, flag = config.data.batch_size, "--data.batch_size"
    if subcommand in ("validate", "test"):
        batch, flag = config.data.val_batch_size or config.data.batch_size, "--data.val_batch_size"
    if subcommand == "predict":
        batch, flag = config.sample.num_samples, "--sample.num_samples"
    need = arch.memory_bytes(batch, training)
    cuda = str(config.trainer.get("accelerator")) in ("gpu", "cuda", "auto") and torch.cuda.is_available()
    if cuda:
        have = torch.cuda.get_device_properties(0).total_memory
    else:
        have = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if need > have:
        raise UserError(
            f"--model.block_size {arch.block_size} with {flag} {batch} needs at least {need / 2**30:.0f} GiB "
            f"({'weights, masks and one step' if training else 'weights, masks and activations'}), more than the "
            f"{have / 2**30:.0f} GiB {'this GPU' if cuda else 'this machine'} has: "
            f"choose a smaller {flag}{' or --model.block_size' if subcommand != 'predict' else ''}"
        )


def runs_in(root: Path) -> list[Path]:
    """The ``version_N`` run folders under ``root``, oldest first."""
    runs = [p for p in root.glob("version_*") if p.is_dir() and p.name.removeprefix("version_").isdigit()]
    return sorted(runs, key=lambda p: int(p.name.removeprefix("version_")))


def best_checkpoint(folder: Path) -> Path:
    """The checkpoint with the lowest val loss among the runs under ``folder``.

    ``folder`` is a run (it holds ``checkpoints/``) or a folder of runs (``version_N``). Without
    any ``best-*.ckpt`` (runs stopped before their first validation), the newest ``last.ckpt``.
    """

    def val_loss(p: Path) -> float:
        m = re.search(r"val(\d+\.\d+)", p.stem)
        return float(m.group(1)) if m else float("inf")

    runs = [folder] if (folder / "checkpoints").is_dir() else runs_in(folder)
    if not runs:
        raise UserError(f"--ckpt_path {folder}: no run here (no checkpoints/ or version_N/ folder); {CHECKPOINT_HINT}")
    if best := sorted((p for run in runs for p in (run / "checkpoints").glob("best-*.ckpt")), key=val_loss):
        return best[0]
    if last := [run / "checkpoints" / "last.ckpt" for run in runs if (run / "checkpoints" / "last.ckpt").is_file()]:
        return last[-1]
    raise UserError(f"--ckpt_path {folder}: no run here has a checkpoint yet; {CHECKPOINT_HINT}")


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
    logger_class = str(logger.get("class_path")) if isinstance(logger, Namespace) else ""
    tensorboard = logger_class.endswith(("TensorBoardLogger", ".TensorBoard"))
    if dirpath or not tensorboard:
        folder = Path(dirpath or config.trainer.get("default_root_dir") or ".", "" if dirpath else "checkpoints")
        path = _last_checkpoint(folder, folder)
        return str(path), read_checkpoint(str(path)), None
    args = logger.init_args
    root = Path(args.save_dir) / (args.get("name") or "")
    if args.get("version") is not None:
        run = root / (args.version if isinstance(args.version, str) else f"version_{args.version}")
    else:
        if not (runs := runs_in(root)):
            raise UserError(f"nothing to resume: there is no run under {root}; start one without --ckpt_path")
        run = runs[-1]
        args.version = int(run.name.removeprefix("version_"))  # the same folder; the progress bar shows N
    # Only asks; the other processes of a multi-process run find the lock their rank 0 took.
    if rank_zero_only.rank == 0 and (probe := lock_run(run, create=False)) is not None:
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
    hparams = ckpt.get("hyper_parameters", {}) if isinstance(ckpt, dict) else {}
    if "state_dict" not in ckpt or not ("vocab" in hparams or "pretrained" in hparams):
        raise UserError(
            f"{path} is not a shakespeare-gpt checkpoint (no weights, vocabulary or model name in it); "
            f"{CHECKPOINT_HINT}"
        )
    return ckpt


def model_defaults(class_path: str = CHAR_MODEL) -> dict:
    """Every setting the command line takes for the model class ``class_path``, with its default."""
    model_class = ShakespeareGPT if is_char_model(class_path) else PretrainedLM
    params = inspect.signature(model_class.__init__).parameters.values()
    defaults = {p.name: p.default for p in params if p.default is not inspect.Parameter.empty}
    if model_class is ShakespeareGPT:
        defaults.update({f.name: f.default for f in dataclasses.fields(GPTConfig) if f.name != "vocab_size"})
    return defaults


def check_matches(model: Namespace, ckpt: dict, path: str) -> None:
    """Refuse, in one line, model settings given by the user that the checkpoint contradicts.

    Lightning rebuilds the model from the checkpoint's settings and would silently ignore these.
    A setting at its default was not given, so it is not a contradiction.
    """
    saved = ckpt["hyper_parameters"]
    saved_class = saved.get("_class_path", CHAR_MODEL)
    holds = class_name(saved_class)
    if is_char_model(model.class_path) and not is_char_model(saved_class):
        # The command line was read for the default class, the character model: keep what it changed.
        char_defaults, saved_defaults = model_defaults(CHAR_MODEL), model_defaults(saved_class)
        asked = {k: v for k, v in model.init_args.as_dict().items() if k != "vocab" and v != char_defaults.get(k)}
        if foreign := sorted(set(asked) - set(saved_defaults)):
            raise UserError(
                f"{path} holds a {holds}, which has no setting --model.{foreign[0]}: drop it; "
                f"see {PROG} fit --model.help {holds}"
            )
        model.init_args = Namespace(**asked)
    if not is_char_model(model.class_path) and class_name(model.class_path) != holds:
        raise UserError(
            f"{path} holds a {holds}, not the {class_name(model.class_path)} "
            "this config asks for: a checkpoint decides its model; drop the config's model section"
        )
    model.class_path = saved_class  # the checkpoint's class, with its defaults, for what follows
    model, defaults = model.init_args, model_defaults(saved_class)
    if unknown := sorted(set(saved) - set(defaults) - {"vocab", "_instantiator", "_class_path"}):
        raise UserError(
            f"{path} was written by another version of shakespeare-gpt (settings {', '.join(unknown)} are unknown "
            "here): use the version that wrote it"
        )
    clashes = [
        f"{key}={saved[key]!r} (asked: {model.get(key)!r})"
        for key in saved
        if key in defaults and key in model and key not in RUNTIME_SETTINGS
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
    # Errors come back as exceptions (explain() words them), and no flag is matched by a prefix of its name.
    strict = {"exit_on_error": False, "allow_abbrev": False}
    subcommands = {
        name: {"prog": f"{PROG} {name}", "usage": f"{PROG} {name} [options]", **strict}
        for name in ShakespeareCLI.subcommands()
    }
    return ShakespeareCLI(
        LanguageModel,
        ShakespeareDataModule,
        subclass_mode_model=True,
        trainer_class=Trainer,
        parser_kwargs={"prog": PROG, "description": DESCRIPTION, **strict, **subcommands},
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
                "class_path": "shakespeare_gpt.callbacks.TensorBoard",
                "init_args": {"save_dir": "lightning_logs", "name": "", "default_hp_metric": False},
            },
        },
        args=args,
        run=run,
    )


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
    # Advertisements for Lightning's cloud services, printed on every run; and the seed (config.yaml records it).
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(DropLines("💡 Tip"))
    logging.getLogger("lightning.fabric.utilities.seed").addFilter(DropLines("Seed set to"))
    # "Received SIGTERM: 2" on Ctrl-C: the interrupt callback says what the signal did instead.
    logging.getLogger("lightning.pytorch.trainer.connectors.signal_connector").addFilter(DropLines("[rank"))


def cli_main(args: list[str] | None = None) -> ShakespeareCLI:
    """The command line; ``args`` replaces ``sys.argv[1:]``. A ``UserError`` ends as one line and exit status 1."""
    try:
        return build(args, run=True)
    except (UserError, MisconfigurationException) as e:  # the latter: settings Lightning itself refuses
        message = " ".join(str(e).split())
        sys.stderr.write(f"error: {message}\n")
        raise SystemExit(1) from None
