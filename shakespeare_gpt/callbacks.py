"""Callbacks the CLI attaches: predicted samples, training throughput, a checkpoint on interrupt."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import torch
from lightning.fabric.utilities.throughput import get_available_flops
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.utilities.rank_zero import rank_zero_warn


class SampleWriter(Callback):
    """Prints every predicted sample to stdout and writes them all to one text file.

    The file is written under a temporary name and renamed when complete, so an interrupted
    run never leaves a half-written file behind.

    Args:
        path: the text file the samples are written to (replaced on each predict run).
    """

    def __init__(self, path: str = "lightning_logs/samples.txt") -> None:
        self.path = Path(path)
        self.samples: list[str] = []

    def on_predict_start(self, trainer, pl_module) -> None:
        self.samples = []

    def on_predict_batch_end(self, trainer, pl_module, outputs: list[str], batch, batch_idx, dataloader_idx=0):
        for text in outputs:
            self.samples.append(text)
            sys.stdout.write(f"----- sample {len(self.samples)} -----\n{text}\n")
        sys.stdout.flush()

    def on_predict_end(self, trainer, pl_module) -> None:
        if not trainer.is_global_zero:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.part")
        body = "".join(f"----- sample {i} -----\n{text}\n" for i, text in enumerate(self.samples, 1))
        tmp.write_text(body, encoding="utf-8")
        os.replace(tmp, self.path)
        sys.stdout.write(f"wrote {len(self.samples)} sample(s) to {self.path}\n")


class Throughput(Callback):
    """Logs training tokens/s and model FLOPs utilisation (MFU) to the logger.

    Time is measured over windows of ``trainer.log_every_n_steps`` steps, validation excluded.
    The GPU is synchronised only at the end of a window, never at every step.

    Args:
        peak_flops: the device's peak FLOP/s for the training dtype, for MFU. By default Lightning's
            table of known GPUs (e.g. 989e12 for an H100 in bf16); give it for a CPU or other device.
    """

    def __init__(self, peak_flops: float | None = None) -> None:
        self.peak_flops = peak_flops
        self._t0 = 0.0
        self._tokens = 0

    def setup(self, trainer, pl_module, stage: str) -> None:
        if self.peak_flops is None:
            dtype = torch.bfloat16 if "bf16" in str(trainer.precision) else torch.float32
            device = trainer.strategy.root_device
            self.peak_flops = get_available_flops(device, dtype)
            if self.peak_flops is None:
                rank_zero_warn(f"peak FLOP/s of {device} unknown: set --throughput.peak_flops to log perf/mfu")

    def _restart(self) -> None:
        self._t0, self._tokens = time.perf_counter(), 0

    def on_train_start(self, trainer, pl_module) -> None:
        self._restart()

    def on_validation_end(self, trainer, pl_module) -> None:
        self._restart()  # validation time is not training time

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        x, _ = batch
        self._tokens += x.numel() * trainer.world_size
        if (trainer.global_step % trainer.log_every_n_steps) != 0 or trainer.logger is None:
            return
        if x.device.type == "cuda":
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - self._t0
        tokens_per_s = self._tokens / elapsed
        metrics = {"perf/tokens_per_s": tokens_per_s}
        if self.peak_flops:
            model_flops = pl_module.model.flops_per_token() * tokens_per_s
            metrics["perf/mfu"] = model_flops / (self.peak_flops * trainer.world_size)
        trainer.logger.log_metrics(metrics, step=trainer.global_step)
        self._restart()


class SaveOnInterrupt(Callback):
    """On Ctrl-C or SIGTERM during ``fit``, writes ``last.ckpt`` so ``fit --ckpt_path last`` resumes there.

    Other errors (a NaN loss, say) write nothing: the last good checkpoint stays as it was.
    Lightning writes checkpoints through a file transaction, so none is ever half-written.
    """

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        fitting = trainer.state.fn == TrainerFn.FITTING and not trainer.sanity_checking  # validations too
        if not isinstance(exception, (KeyboardInterrupt, SIGTERMException)) or not fitting:
            return
        callback = trainer.checkpoint_callback
        if callback is None or callback.dirpath is None:
            return
        path = Path(callback.dirpath) / f"{callback.CHECKPOINT_NAME_LAST}{callback.FILE_EXTENSION}"
        trainer.save_checkpoint(path)
        sys.stderr.write(f"interrupted at step {trainer.global_step}: saved {path}; resume with --ckpt_path last\n")
