"""The LightningModule: training, validation and predict steps, AdamW and its schedule, ``generate``.

Everything else that happens during training (checkpoints, the learning-rate curve, throughput,
interrupts, the NaN guard, the random state of a resumed run) is a callback: see ``callbacks.py``.
"""

from __future__ import annotations

import math
from dataclasses import asdict
from typing import Literal

import lightning as L
import torch
from torchmetrics import MeanMetric

from .data import CharTokenizer
from .errors import UserError
from .model import GPT, GPTConfig
from .sampling import generate


def check_optimizer(learning_rate, lr_schedule, min_lr, warmup_steps, decay_steps, weight_decay, beta1, beta2) -> None:
    """A one-line ``UserError`` for optimiser and schedule settings that cannot train."""

    def finite(x) -> bool:
        return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)

    def whole(x) -> bool:
        return isinstance(x, int) and not isinstance(x, bool)

    checks = [
        ("learning_rate", learning_rate, finite(learning_rate) and learning_rate > 0, "give a number > 0, e.g. 1e-3"),
        ("lr_schedule", lr_schedule, lr_schedule in ("constant", "cosine"), "give constant or cosine"),
        (
            "min_lr",
            min_lr,
            finite(min_lr) and min_lr >= 0 and (lr_schedule != "cosine" or min_lr <= learning_rate),
            f"give a number from 0 to --model.learning_rate ({learning_rate}): the cosine schedule decays to it",
        ),
        ("warmup_steps", warmup_steps, whole(warmup_steps) and warmup_steps >= 0, "give a whole number >= 0"),
        (
            "decay_steps",
            decay_steps,
            decay_steps is None or (whole(decay_steps) and decay_steps >= 1),
            "give a whole number >= 1, or null for --trainer.max_steps",
        ),
        ("weight_decay", weight_decay, finite(weight_decay) and weight_decay >= 0, "give a number >= 0"),
        ("beta1", beta1, finite(beta1) and 0 <= beta1 < 1, "give a number in [0, 1), e.g. 0.9"),
        ("beta2", beta2, finite(beta2) and 0 <= beta2 < 1, "give a number in [0, 1), e.g. 0.99"),
    ]
    for name, value, ok, what in checks:
        if not ok:
            raise UserError(f"--model.{name} {value!r}: {what}")


class ShakespeareGPT(L.LightningModule):
    """A character-level GPT trained with AdamW.

    Every init arg is a flat primitive saved in checkpoints, the vocabulary and the whole
    architecture included, so a checkpoint rebuilds the model on its own.

    Args:
        vocab: the characters the model reads and writes; the CLI links it from the data.
        learning_rate: peak AdamW learning rate.
        lr_schedule: ``constant``, or ``cosine`` decay to ``min_lr`` after the warmup.
        min_lr: learning rate at the end of the cosine decay.
        warmup_steps: linear warmup from 0 over this many steps.
        decay_steps: length of the cosine decay, warmup included (default: ``trainer.max_steps``).
        weight_decay: AdamW weight decay, applied to matrices only (not biases or norm gains).
        beta1: AdamW beta1.
        beta2: AdamW beta2.
        sample_tokens: characters of sample text logged to TensorBoard at each validation (0: none).
        compile: ``torch.compile`` the network for training and validation; sampling stays eager
            (compiled generation recompiles for every new length). Parameter names do not change,
            so checkpoints move freely between compiled and eager models.
        **arch: the architecture: the fields of ``GPTConfig`` (all but ``vocab_size``, which the
            vocabulary decides), listed with their descriptions under ``--help``.
    """

    def __init__(
        self,
        vocab: str | None = None,
        learning_rate: float = 3e-4,
        lr_schedule: Literal["constant", "cosine"] = "constant",
        min_lr: float = 0.0,
        warmup_steps: int = 0,
        decay_steps: int | None = None,
        weight_decay: float = 0.01,
        beta1: float = 0.9,
        beta2: float = 0.999,
        sample_tokens: int = 200,
        compile: bool = False,
        **arch,
    ) -> None:
        super().__init__()
        if vocab is None:
            raise UserError("the model needs a vocabulary: train it through the CLI, which takes it from the data")
        check_optimizer(learning_rate, lr_schedule, min_lr, warmup_steps, decay_steps, weight_decay, beta1, beta2)
        if isinstance(sample_tokens, bool) or not isinstance(sample_tokens, int) or sample_tokens < 0:
            raise UserError(f"--model.sample_tokens {sample_tokens!r}: give a number of characters >= 0 (0: none)")
        self.config = GPTConfig(vocab_size=len(vocab), **arch)
        self.save_hyperparameters()
        # Every field, defaults included: the checkpoint then describes this network exactly.
        self.hparams.update({k: v for k, v in asdict(self.config).items() if k != "vocab_size"})
        self.tokenizer = CharTokenizer(vocab)
        self.model = GPT(self.config)
        self.flops_per_token = self.model.flops_per_token()  # for throughput and MFU
        self.compiled_forward = None
        self.val_loss = MeanMetric()
        self.train_eval_loss = MeanMetric()  # used when the data module adds a train-split pass

    def configure_model(self) -> None:
        if self.hparams.compile and self.compiled_forward is None:
            # A compiled function, not a wrapping module: parameter names, and so checkpoints,
            # stay those of the eager model, and sampling keeps calling the eager one.
            self.compiled_forward = torch.compile(self.model.forward)

    def loss(self, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x, y = batch
        return (self.compiled_forward or self.model)(x, y)[1]

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self.loss(batch)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int, dataloader_idx: int = 0):
        metric = self.val_loss if dataloader_idx == 0 else self.train_eval_loss
        # Weight each batch's mean by its number of real targets: the last window masks some.
        metric.update(self.loss(batch), weight=(batch[1] != -1).sum())

    def on_validation_epoch_end(self) -> None:
        loss = self.val_loss.compute()  # averaged over every process
        self.val_loss.reset()
        metrics = {"val/loss": loss, "val/bpc": loss / math.log(2)}
        if self.train_eval_loss.update_called:
            metrics["train_eval/loss"] = self.train_eval_loss.compute()
            self.train_eval_loss.reset()
        self.log_dict(metrics, prog_bar=True)

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self.validation_step(batch, batch_idx)

    def on_test_epoch_end(self) -> None:
        loss = self.val_loss.compute()
        self.val_loss.reset()
        self.log_dict({"test/loss": loss, "test/bpc": loss / math.log(2)})

    def predict_step(self, batch: dict, batch_idx: int) -> list[str]:
        g = torch.Generator(device=self.device).manual_seed(batch["seed"])
        out = self.generate(batch["idx"], batch["max_new_tokens"], batch["temperature"], batch["top_k"], g)
        return [self.tokenizer.decode(row) for row in out.tolist()]

    def generate(
        self,
        idx: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Extend each row of ``idx`` (B, T) by ``max_new_tokens`` sampled characters."""
        return generate(self.model, idx, max_new_tokens, temperature, top_k, generator)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        # Networks wrapped by ``torch.compile(model)`` name parameters ``model._orig_mod.<name>``.
        state = checkpoint["state_dict"]
        checkpoint["state_dict"] = {k.replace("._orig_mod.", ".", 1): v for k, v in state.items()}

    def configure_optimizers(self):
        hp = self.hparams
        # Weight decay only on matrices (linear and embedding weights), never on biases or norm gains.
        params = [p for p in self.parameters() if p.requires_grad]
        groups = [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": hp.weight_decay, "name": "decayed"},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0, "name": "not_decayed"},
        ]
        # The fused kernel (CUDA and CPU) is one call for all tensors instead of a dozen per tensor.
        optimizer = torch.optim.AdamW(groups, lr=hp.learning_rate, betas=(hp.beta1, hp.beta2), fused=True)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, self.lr_factor)
        # LearningRateMonitor draws train/lr/<group name>.
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step", "name": "train/lr"},
        }

    def lr_factor(self, step: int) -> float:
        """Multiplier of the peak learning rate at ``step``: linear warmup, then constant or cosine."""
        hp = self.hparams
        if step < hp.warmup_steps:
            return (step + 1) / hp.warmup_steps
        if hp.lr_schedule == "constant":
            return 1.0
        total = hp.decay_steps or self.trainer.max_steps
        if total is None or total <= 0:
            raise UserError("a cosine schedule needs --model.decay_steps or --trainer.max_steps")
        progress = min(1.0, (step - hp.warmup_steps) / max(1, total - hp.warmup_steps))
        min_factor = hp.min_lr / hp.learning_rate
        return min_factor + (1 - min_factor) * 0.5 * (1.0 + math.cos(math.pi * progress))
