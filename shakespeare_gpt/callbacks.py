"""The callbacks the CLI attaches: everything that cuts across training, kept out of the LightningModule.

Lightning's own callbacks are used where one does the job (``ModelCheckpoint``,
``LearningRateMonitor``); where a callback here does what one of Lightning's nearly does
(``OnExceptionCheckpoint``, ``ThroughputMonitor``), its docstring says why it is not that one.
"""

from __future__ import annotations

import math
import os
import shutil
import signal
import sys
import threading
import time
from pathlib import Path

import numpy
import torch
from lightning.fabric.utilities.throughput import get_available_flops
from lightning.pytorch.callbacks import Callback, ModelCheckpoint, TQDMProgressBar
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn

from .checkpoints import lock_run, samples_file
from .pictures import attention_image, axis_label, char_kind, char_name
from .sampling import Sampling
from .utils import NonFiniteLossError, UserError, atomic_open, check_writable


def fitting(trainer) -> bool:
    """Whether ``trainer`` is in ``fit`` proper (not its sanity check)."""
    return trainer.state.fn == TrainerFn.FITTING and not trainer.sanity_checking


def at_last_step(trainer) -> bool:
    """Whether ``trainer`` has done the run's last step (``max_steps``)."""
    return 0 < trainer.max_steps <= trainer.global_step


def heading(i: int) -> str:
    """The line above sample ``i`` (from 1), printed and written."""
    return f"----- sample {i} -----\n"


class SampleWriter(Callback):
    """Prints the predicted samples to stdout as they are drawn, and writes them all to one text file.

    Samples are drawn in batches (``--sample.batch_size``): the first of each batch is printed as
    ``generate`` draws it, token by token (the module's ``token_sink``), the others, drawn alongside
    it, when the batch is done. stdout is flushed after each piece, so a pipe or a file gets the
    text as it comes. The text file gets the same text, written under a temporary name and renamed
    when complete, so an interrupted run never leaves a half-written file behind.

    Ctrl-C (SIGINT), SIGTERM, or a reader that stops reading (``| head``) stops the sampling at once:
    the file then holds what was printed (the finished samples and the start of the one being drawn),
    and the exit status is 128 + the signal number (130, 143, 141), as a shell reports a process a
    signal ended.

    Args:
        path: the text file the samples are written to (replaced on each predict run); by default
            ``samples.txt`` in the folder of the run sampled (see ``checkpoints.samples_file``).
    """

    def __init__(self, path: str | None = None) -> None:
        self.path = Path(path) if path else samples_file(None)
        self.samples: list[str] = []  # as printed; the last may be the one being drawn
        self.finished = 0  # how many of them are whole
        self.window = (0, 0)  # where the last piece printed of the one being drawn starts and ends, in tokens
        self.signum: int | None = None
        self.decode = None  # the model's tokenizer's

    def setup(self, trainer, pl_module, stage: str) -> None:
        # The samples show the progress; a progress bar would draw on stdout, among them.
        if trainer.progress_bar_callback is not None:
            trainer.progress_bar_callback.disable()

    def on_predict_start(self, trainer, pl_module) -> None:
        self.samples, self.finished, self.signum = [], 0, None
        if not trainer.is_global_zero:
            return
        self.decode = pl_module.tokenizer.decode
        pl_module.token_sink = self.stream  # what predict_step hands to generate
        if threading.current_thread() is threading.main_thread():  # Lightning puts back the handlers it found
            signal.signal(signal.SIGINT, self._on_signal)  # when predict ends, however it ends
            signal.signal(signal.SIGTERM, self._on_signal)

    def _on_signal(self, signum: int, frame) -> None:
        # Lightning 2.6 would end a KeyboardInterrupt with exit status 1, and ignores SIGTERM in predict.
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second signal must not cut the saving short
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        self.signum = signum
        raise SIGTERMException(128 + signum)

    def print_now(self, text: str) -> None:
        try:
            sys.stdout.write(text)
            sys.stdout.flush()
        except BrokenPipeError:  # the reader stopped reading (| head): stop as a shell's SIGPIPE would
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # Python's exit flushes nothing more
            self.signum = signal.SIGPIPE
            raise SIGTERMException(128 + signal.SIGPIPE) from None

    def on_predict_batch_start(self, trainer, pl_module, batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        if trainer.is_global_zero:
            self.samples.append("")
            self.window = (0, 0)
            self.print_now(heading(len(self.samples)))

    def stream(self, idx: torch.Tensor) -> None:
        """Prints what the new tokens add to the batch's first sample: the ``on_token`` of ``sampling.generate``.

        Each step decodes only the tokens of the last piece printed, alone and followed by the new ones
        (as Hugging Face's text-generation-inference does): the difference is the new text, a leading
        space included, and a character split across tokens (a byte-level BPE's) is printed once whole.
        """
        start, end = self.window
        ids = idx[0, start:].tolist()
        before, text = self.decode(ids[: end - start]), self.decode(ids)
        if len(text) > len(before) and not text.endswith("\ufffd"):
            piece = text[len(before) :]
            self.samples[-1] += piece
            self.print_now(piece)
            self.window = (end, idx.size(1))

    def on_predict_batch_end(self, trainer, pl_module, outputs: list[str], batch, batch_idx, dataloader_idx=0):
        if not trainer.is_global_zero:
            return
        first, *others = outputs
        self.print_now(first[len(self.samples[-1]) :] + "\n")
        self.samples[-1], self.finished = first, self.finished + 1
        for text in others:
            self.samples.append("")
            self.print_now(heading(len(self.samples)) + text + "\n")
            self.samples[-1], self.finished = text, self.finished + 1
        if (batches := trainer.num_predict_batches[0]) > 1:  # progress, apart from the samples
            sys.stderr.write(f"batch {batch_idx + 1} of {batches}: {len(self.samples)} samples drawn\n")

    def save(self) -> None:
        with atomic_open(self.path) as f:
            f.writelines(heading(i) + text + "\n" for i, text in enumerate(self.samples, 1))

    def on_predict_end(self, trainer, pl_module) -> None:
        pl_module.token_sink = None
        if trainer.is_global_zero:
            self.save()
            sys.stdout.write(f"wrote {len(self.samples)} sample(s) to {self.path}\n")

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        pl_module.token_sink = None
        if self.signum is None or not trainer.is_global_zero:
            return
        cut = len(self.samples) > self.finished
        if cut and self.signum != signal.SIGPIPE:
            sys.stdout.write("\n")  # the sample cut short ends as the file's does
        self.save()
        start = f" and the start of sample {len(self.samples)}" if cut else ""
        name = signal.Signals(self.signum).name
        sys.stderr.write(f"interrupted by {name}: wrote {self.finished} sample(s){start} to {self.path}\n")


class TextSample(Callback):
    """After each validation of ``fit``, logs a sample to TensorBoard's Text tab.

    ``pl_module.hparams.sample_tokens`` tokens from ``predict``'s default prompt, with the same seed each time,
    so the samples can be compared across steps.
    """

    def on_validation_end(self, trainer, pl_module) -> None:
        tokens, logger = pl_module.hparams.sample_tokens, trainer.logger
        if (
            not fitting(trainer)
            or tokens <= 0
            or not trainer.is_global_zero
            or not isinstance(logger, TensorBoardLogger)
        ):
            return
        g = torch.Generator(device=pl_module.device).manual_seed(0)
        start = Sampling().encode(pl_module.tokenizer).to(pl_module.device)  # predict's default prompt
        text = pl_module.tokenizer.decode(pl_module.generate(start, tokens, generator=g)[0].tolist())
        # Four leading spaces make TensorBoard's markdown keep the line breaks.
        logger.experiment.add_text("sample", "\n".join("    " + line for line in text.split("\n")), trainer.global_step)


class AttentionMaps(Callback):
    """Pictures of what the model attends to: every layer's attention weights for one prompt, its heads side by side.

    In ``fit``, after each validation, one image per layer goes to TensorBoard's Images tab
    (``attention/layer_<n>``), drawn by ``pictures.attention_image``. The weights come from an evaluation
    pass through the written-out softmax (``GPT.attention_maps``) whichever kernel trains, so a training
    step pays nothing for them. In ``predict``, ``png`` names a file to draw them into.

    Args:
        enabled: draw them (in fit, at each validation).
        prompt: the text drawn, cut to the model's block size. By default, in fit the val split's first
            characters (the same at every validation), in predict the sampling prompt.
        png: predict: draw the maps of every layer into this PNG file (and print its path).
    """

    def __init__(self, enabled: bool = True, prompt: str | None = None, png: str | None = None) -> None:
        self.enabled, self.prompt, self.png = enabled, prompt, png
        self.drawable = False  # the model has maps to draw: known at setup

    @staticmethod
    def has_maps(pl_module) -> bool:
        return pl_module.attention_maps(torch.zeros(1, 1, dtype=torch.long, device=pl_module.device)) is not None

    def check(self, pl_module, subcommand: str | None) -> None:
        """Refuse, in one line and before anything is written, what cannot be drawn or written."""
        if self.png and subcommand != "predict":
            raise UserError("--attention_maps.png: predict writes it; fit draws the maps into TensorBoard")
        if self.prompt:
            try:
                pl_module.tokenizer.encode(self.prompt)
            except UserError as e:
                raise UserError(f"--attention_maps.prompt {self.prompt!r}: {e}") from None
        if self.png and self.enabled:
            if not self.has_maps(pl_module):
                raise UserError(f"--attention_maps.png: this {type(pl_module).__name__} has no attention maps to draw")
            check_writable(Path(self.png), "--attention_maps.png", folder=False)

    def setup(self, trainer, pl_module, stage: str) -> None:
        self.drawable = self.enabled and self.has_maps(pl_module)
        if self.enabled and not self.drawable and stage == "fit" and isinstance(trainer.logger, TensorBoardLogger):
            rank_zero_info(
                f"attention maps: none drawn, this {type(pl_module).__name__} has no attention weights to show"
            )

    def maps(self, pl_module, default: torch.Tensor) -> tuple[torch.Tensor, list[str]]:
        """The (n_layer, n_head, T, T) maps of the prompt (else ``default``, token ids) and a label per position."""
        ids = torch.tensor(pl_module.tokenizer.encode(self.prompt)) if self.prompt else default
        ids = ids[None, : pl_module.hparams.block_size].long().to(pl_module.device)
        labels = [axis_label(pl_module.tokenizer.decode([i])) for i in ids[0].tolist()]
        return pl_module.attention_maps(ids)[:, 0], labels

    def on_validation_end(self, trainer, pl_module) -> None:
        logger = trainer.logger
        if not (
            self.drawable and fitting(trainer) and trainer.is_global_zero and isinstance(logger, TensorBoardLogger)
        ):
            return
        (maps, labels), step = self.maps(pl_module, trainer.datamodule.val_data), trainer.global_step
        for layer in range(len(maps)):
            image = numpy.asarray(attention_image(maps[layer : layer + 1], labels, f"step {step}", first_layer=layer))
            logger.experiment.add_image(f"attention/layer_{layer}", image, step, dataformats="HWC")

    def on_predict_start(self, trainer, pl_module) -> None:
        if self.png and self.drawable and trainer.is_global_zero:
            prompt = trainer.datamodule.sampling.encode(pl_module.tokenizer, 1)[0]
            with atomic_open(Path(self.png), "wb") as f:
                attention_image(*self.maps(pl_module, prompt), "rows: queries, columns: keys").save(f, format="png")
            sys.stdout.write(f"wrote the attention maps to {self.png}\n")


class EmbeddingProjector(Callback):
    """At the end of ``fit``, the character model's token embeddings go to TensorBoard's Projector tab.

    Each point is named by its character, spelt out where it is invisible (newline, space), with its
    kind (vowel, capital consonant, punctuation, ...) to colour the points by: with "Color by: kind", a
    learner sees which characters the model has learned to treat alike.

    Args:
        enabled: write them.
    """

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled

    def on_train_end(self, trainer, pl_module) -> None:
        vocab, logger = pl_module.hparams.get("vocab"), trainer.logger
        if not (self.enabled and vocab and trainer.is_global_zero and isinstance(logger, TensorBoardLogger)):
            return  # a pretrained model's 50,000 tokens are not what this view is for
        logger.experiment.add_embedding(
            pl_module.model.tok_emb.weight.detach().float().cpu(),
            metadata=[[char_name(c), char_kind(c)] for c in vocab],
            metadata_header=["character", "kind"],
            global_step=trainer.global_step,
            tag="token_embeddings",
        )


class TensorBoard(TensorBoardLogger):
    """Lightning's TensorBoard logger, laid out for this project.

    The Custom Scalars tab draws train and val loss on one chart, val bits per character beside it
    (the measure that compares runs with different tokenizers), then the learning rate and the
    throughput (MFU is under Scalars). A chart colours its lines by run; the lines of one run differ
    by their markers, which the "Matches" list under the chart names. The Scalars tab has no
    ``epoch`` chart (an "epoch" here is only the sampler's length, and Lightning adds that chart to
    every logger).
    """

    LAYOUT = {
        "Loss": {
            "train and val loss (nats per token)": ["Multiline", [r"^(train|val|train_eval)/loss$"]],
            "val bits per character (compares tokenizers)": ["Multiline", [r"^val/bpc$"]],
        },
        "Training": {
            "learning rate": ["Multiline", [r"^train/lr"]],
            "throughput (tokens/s)": ["Multiline", [r"^perf/tokens_per_s$"]],
        },
    }

    def log_hyperparams(self, params, metrics=None) -> None:  # called once when a fit starts
        super().log_hyperparams(params, metrics)
        self.experiment.add_custom_scalars(self.LAYOUT)

    def log_metrics(self, metrics: dict, step: int | None = None) -> None:
        super().log_metrics({k: v for k, v in metrics.items() if k != "epoch"}, step)


class Throughput(Callback):
    """Logs training tokens/s (``perf/tokens_per_s``) and model FLOPs utilisation (``perf/mfu``).

    Time is measured over windows of ``trainer.log_every_n_steps`` steps, validation excluded,
    and the GPU is synchronised only at the end of a window. Not Lightning's ``ThroughputMonitor``,
    which synchronises the GPU after every step (for this small model the GPU would then wait
    for the host at every step), logs its raw counters (time, batches, samples, lengths) and a
    point per validation batch at every log step, and takes the peak FLOP/s only from its table
    of GPUs (no CPUs, no H200).

    Args:
        peak_flops: the device's peak FLOP/s for the training dtype, for MFU. By default Lightning's
            table of known GPUs (e.g. 989e12 for an H100 in bf16); give it for a CPU (without it a
            CPU run logs tokens/s only) or another GPU.
    """

    def __init__(self, peak_flops: float | None = None) -> None:
        self.peak_flops = peak_flops
        self.t0 = 0.0
        self.tokens = 0

    def setup(self, trainer, pl_module, stage: str) -> None:
        if self.peak_flops is None and stage == "fit":
            dtype = torch.bfloat16 if "bf16" in str(trainer.precision) else torch.float32
            self.peak_flops = get_available_flops(trainer.strategy.root_device, dtype)
            if self.peak_flops is None and trainer.strategy.root_device.type != "cpu":
                rank_zero_warn("peak FLOP/s of this device unknown: set --throughput.peak_flops to log perf/mfu")

    def restart(self) -> None:
        self.t0, self.tokens = time.perf_counter(), 0

    def on_train_start(self, trainer, pl_module) -> None:
        self.restart()

    def on_validation_end(self, trainer, pl_module) -> None:
        self.restart()  # validation time is not training time

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        x, _ = batch
        self.tokens += x.numel() * trainer.world_size
        if trainer.global_step % trainer.log_every_n_steps != 0 or trainer.logger is None:
            return
        if x.device.type == "cuda":
            torch.cuda.synchronize()
        tokens_per_s = self.tokens / (time.perf_counter() - self.t0)
        metrics = {"perf/tokens_per_s": tokens_per_s}
        if self.peak_flops:
            metrics["perf/mfu"] = pl_module.flops_per_token * tokens_per_s / (self.peak_flops * trainer.world_size)
        trainer.logger.log_metrics(metrics, step=trainer.global_step)
        self.restart()


class StopOnNonFiniteLoss(Callback):
    """Stops ``fit`` with ``NonFiniteLossError`` at the first NaN or infinite training loss.

    It stops before another checkpoint is written, so the last good one survives. The first bad
    step is recorded on the device at every step and read only at log steps and at the end of
    each validation (before the checkpoint callbacks, which Lightning runs last): a GPU is never
    made to wait for it at every step.
    """

    def __init__(self) -> None:
        self.first_bad_step: torch.Tensor | None = None

    def on_train_start(self, trainer, pl_module) -> None:
        self.first_bad_step = torch.tensor(-1, device=pl_module.device)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        step = trainer.global_step - 1  # the optimiser has stepped: this batch was step global_step - 1
        bad = ~torch.isfinite(outputs["loss"].detach()) & (self.first_bad_step < 0)
        self.first_bad_step = torch.where(bad, step, self.first_bad_step)
        if trainer.global_step % trainer.log_every_n_steps == 0:
            self._check(trainer)

    def on_validation_end(self, trainer, pl_module) -> None:
        if fitting(trainer):
            self._check(trainer)

    def _check(self, trainer) -> None:
        # Every process stops together: the largest first bad step of any rank (-1: none).
        if (step := int(trainer.strategy.reduce(self.first_bad_step, reduce_op="max"))) >= 0:
            raise NonFiniteLossError(
                f"the training loss became NaN or infinite at step {step}: training stopped before "
                "writing another checkpoint; lower --model.learning_rate and resume from the last good one"
            )


class RandomState(Callback):
    """Carries the random state (dropout's) in checkpoints, so a resumed run is exactly the run that never stopped.

    The state is put back at the first training batch, not when the checkpoint is read:
    building the data loaders draws from the same generator, and the uninterrupted run had
    built them long before that step.
    """

    def __init__(self) -> None:
        self.pending: dict | None = None

    def state_dict(self) -> dict:
        state = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        self.pending = state_dict

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        if (state := self.pending) is None:
            return
        torch.set_rng_state(state["torch"])
        if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(state["cuda"])
        self.pending = None


class InterruptCheckpoint(Callback):
    """Keeps ``last.ckpt`` the newest state of the run: after Ctrl-C or SIGTERM, and at the end.

    Left to themselves, both signals stop a run where Lightning's resume is not exact. Ctrl-C
    raises ``KeyboardInterrupt`` wherever Python is, often in the middle of a step, and a checkpoint
    of that state resumes one step short. On SIGTERM Lightning stops at the end of the step, but
    also after the first batch of a validation pass, which a resumed run then skips. So while
    training runs, both signals are only noted here. At the end of a training step they are handed
    to Lightning's SIGTERM handler (by every process at the same step), and Lightning stops before
    the next step. A validation under way, or about to start, is cut short at its next batch: the
    checkpoint records it as begun and not finished, which Lightning's resume runs again from its
    first batch, so a stop takes a batch's time, not a whole pass's. The checkpoint goes where
    ``ModelCheckpoint`` keeps ``last.ckpt``, so ``--ckpt_path last`` resumes from it. The exit
    status is 128 + the signal number, as a shell reports a process a signal ended, so ``fit &&
    predict`` and schedulers see that the run did not finish. A second Ctrl-C stops at once,
    saving nothing; a signal in the last step lets the run finish.

    ``ModelCheckpoint`` writes ``last.ckpt`` at each validation and, at the end, only if it never
    did; when the last step is not a validation step, the final state is written here.
    Other errors (a NaN loss, say) save nothing: the last good checkpoint stays.

    Not a subclass of Lightning's ``OnExceptionCheckpoint``: with one of those attached, Lightning
    2.6 treats every ``fit`` without a checkpoint as ``ckpt_path="last"`` and would silently continue
    whatever ``last.ckpt`` it finds; here a run continues only when asked to.
    """

    def __init__(self) -> None:
        self.signum: int | None = None
        self.lightning_handler = None  # None until training starts: before that, signals act as usual
        self.saved_step = -1  # the step last.ckpt holds, as far as this run knows
        self.cut_short = False  # a validation was stopped in the middle

    def on_train_start(self, trainer, pl_module) -> None:
        # After Lightning has installed its SIGTERM handler; Lightning puts back the handlers it
        # found then (the defaults) when fit ends, however it ends.
        self.signum, self.saved_step, self.trainer = None, trainer.global_step, trainer
        if threading.current_thread() is threading.main_thread():
            self.lightning_handler = signal.getsignal(signal.SIGTERM)
            signal.signal(signal.SIGINT, self._on_signal)
            signal.signal(signal.SIGTERM, self._on_signal)

    def _on_signal(self, signum: int, frame) -> None:
        if self.signum is not None:
            if signum == signal.SIGINT:
                raise KeyboardInterrupt  # a second Ctrl-C: stop now
            return  # already stopping
        self.signum = signum
        again = " (Ctrl-C again: stop now, no save)" if signum == signal.SIGINT else ""
        when = "now" if self.trainer.validating and not at_last_step(self.trainer) else "after this step"
        sys.stderr.write(f"\n{signal.Signals(signum).name}: stopping {when} and saving last.ckpt{again}\n")

    def _signalled(self, trainer) -> bool:
        # Asked on every process (one may have seen the signal and another not yet), so that all
        # of them stop at the same point. The last step is finished whatever happens.
        signalled = trainer.strategy.reduce_boolean_decision(self.signum is not None, all=False)
        return signalled and not at_last_step(trainer)

    def _stop_if_signalled(self, trainer) -> None:
        if self._signalled(trainer) and callable(self.lightning_handler):
            self.lightning_handler(signal.SIGTERM, None)  # Lightning raises before the next step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        self._stop_if_signalled(trainer)

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        if fitting(trainer) and callable(self.lightning_handler) and self._signalled(trainer):
            # Recorded as Lightning 2.6 records a pass stopped inside a batch: begun, not finished.
            trainer.fit_loop.epoch_loop.val_loop.batch_progress.increment_started()
            self.cut_short = True
            raise SIGTERMException

    def on_validation_end(self, trainer, pl_module) -> None:
        if fitting(trainer):
            self.saved_step = trainer.global_step  # ModelCheckpoint writes last.ckpt now (it runs last)
            self._stop_if_signalled(trainer)

    def on_train_end(self, trainer, pl_module) -> None:
        if self.saved_step != trainer.global_step:
            self._save(trainer, pl_module)

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        if not isinstance(exception, SIGTERMException) or trainer.state.fn != TrainerFn.FITTING:
            return  # predict's signals are SampleWriter's
        name = signal.Signals(signum := self.signum or signal.SIGTERM).name
        exception.code = 128 + signum
        if self.lightning_handler is None:
            sys.stderr.write(f"interrupted by {name} before training started: nothing saved\n")
            return
        # After a validation, ModelCheckpoint has just written last.ckpt for this very step, at the
        # point Lightning's resume expects; it is kept rather than written again.
        path = self._save(trainer, pl_module) if self.saved_step != trainer.global_step else self._path(trainer)
        where = f"saved {path}; resume with --ckpt_path last" if path else "nothing saved"
        during = " (in its validation, which a resume runs again)" if self.cut_short else ""
        sys.stderr.write(f"interrupted by {name} after step {trainer.global_step}{during}: {where}\n")

    @staticmethod
    def _path(trainer) -> Path | None:
        checkpoint = next((c for c in trainer.checkpoint_callbacks if isinstance(c, ModelCheckpoint)), None)
        if checkpoint is None or checkpoint.dirpath is None or not checkpoint.save_last:
            return None  # no last checkpoints in this run (the study runner turns them off)
        return Path(checkpoint.dirpath) / f"{checkpoint.CHECKPOINT_NAME_LAST}{checkpoint.FILE_EXTENSION}"

    def _save(self, trainer, pl_module) -> Path | None:
        if (path := self._path(trainer)) is None or not all(p.isfinite().all() for p in pl_module.parameters()):
            return None  # NaN weights never replace the last good checkpoint
        trainer.save_checkpoint(path, weights_only=False)  # the whole state: a resume needs all of it
        self.saved_step = trainer.global_step
        return path


class RunLock(Callback):
    """Holds an exclusive lock on a training run's folder while ``fit`` writes into it.

    A second ``fit`` into the same folder (two resumes of one run, say) stops with a one-line
    error instead of interleaving its checkpoints and curves with the first's. The lock is the
    operating system's (``flock``): it goes when the process ends, however it ends. A resumed
    run's lock is taken by the CLI, before anything is built, and handed over here.

    A new run interrupted before its first checkpoint (a second Ctrl-C, a signal before training
    started) leaves nothing: its folder, which holds nothing to resume, is removed, so that
    ``--ckpt_path last`` goes on with the run before it.

    Args:
        handle: the open lock file of a lock already taken, or None to take it at setup.
        fresh: the run's folder is a new ``version_N`` of the logger's, and its checkpoints go in it:
            one this process may remove.
    """

    def __init__(self, handle=None, fresh: bool = False) -> None:
        self.handle, self.fresh = handle, fresh
        self.new_run: Path | None = None  # the folder of a run this process started

    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage != "fit":
            return
        log_dir = trainer.log_dir  # on every rank: reading it is a collective call
        if trainer.is_global_zero and log_dir is not None and self.handle is None:  # not a resumed run
            self.new_run = Path(log_dir) if self.fresh else None
            self.handle = lock_run(Path(log_dir))

    def teardown(self, trainer, pl_module, stage: str) -> None:
        if self.handle is not None:
            self.handle.close()
            self.handle = None

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        self.teardown(trainer, pl_module, "fit")
        run = self.new_run
        if isinstance(exception, KeyboardInterrupt | SIGTERMException) and run and not any(run.rglob("*.ckpt")):
            if trainer.logger is not None:
                trainer.logger.finalize("failed")  # its writer closed first: it writes no file into the folder again
            shutil.rmtree(run, ignore_errors=True)
            sys.stderr.write(f"removed {run}: the run was stopped before its first checkpoint\n")


class RunSummary(Callback):
    """Measures every run at its end, and says what it reached.

    The last step is always validated (and so checkpointed), whatever ``val_check_interval``:
    Lightning validates the step at which ``trainer.should_stop`` is set. At the end of ``fit``,
    the lowest val loss (with bits per character), its step and checkpoint, and how to see the
    curves. The best so far is kept in checkpoints, so a resumed run's summary covers all of it.
    """

    def __init__(self) -> None:
        self.best: dict | None = None

    def state_dict(self) -> dict:
        return {"best": self.best}

    def load_state_dict(self, state_dict: dict) -> None:
        self.best = state_dict["best"]

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if at_last_step(trainer):
            trainer.should_stop = True

    def on_validation_end(self, trainer, pl_module) -> None:
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k in ("val/loss", "val/bpc")}
        if not fitting(trainer) or not math.isfinite(metrics.get("val/loss", math.nan)):
            return
        if self.best is None or metrics["val/loss"] < self.best["val/loss"]:
            self.best = {**metrics, "step": trainer.global_step}

    def on_fit_end(self, trainer, pl_module) -> None:
        if not trainer.is_global_zero or self.best is None:
            return
        best = self.best
        line = f"best val loss {best['val/loss']:.4f}"
        line += f" ({best['val/bpc']:.3f} bits per character)" if "val/bpc" in best else ""
        path = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
        line += f" at step {best['step']}" + (f": {path}" if path else "")
        if isinstance(trainer.logger, TensorBoardLogger):
            line += f"\ncurves: tensorboard --logdir {Path(trainer.logger.log_dir).parent}"
        sys.stderr.write(line + "\n")


class StepProgressBar(TQDMProgressBar):
    """Lightning's progress bar, counting the run's steps out of ``max_steps``: a resumed run starts
    where it stopped, with its total and time left, and there is no "Epoch 0" (an epoch here is only
    the sampler's length)."""

    def on_train_start(self, trainer, *_) -> None:  # a resumed run starts here, in the middle of an epoch
        super().on_train_start(trainer)
        bar = self.train_progress_bar
        bar.total = trainer.max_steps if trainer.max_steps > 0 else None
        bar.initial = bar.n = trainer.global_step  # the rate and time left count from here
        bar.set_description("Training", refresh=False)

    def on_train_epoch_start(self, trainer, *_) -> None:
        pass  # not Lightning's: no "Epoch N", and the count goes on

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, trainer.global_step - 1)
