"""The LightningModule: optimisation, logging and sampling around the plain-PyTorch GPT."""

from __future__ import annotations

import math
from typing import Literal

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.trainer.states import TrainerFn
from torchmetrics import MeanMetric

from .data import CharTokenizer
from .errors import UserError
from .model import GPT, Activation, AttentionImpl, GPTConfig, Norm
from .sampling import generate


class ShakespeareGPT(L.LightningModule):
    """A character-level GPT trained with AdamW.

    The init args are flat primitives so that a checkpoint rebuilds the model on its own
    (the vocabulary included) and ``--help`` lists every one.

    Args:
        vocab: the characters the model reads and writes; the CLI links it from the data.
        block_size: longest context in characters.
        n_layer: transformer blocks.
        n_head: attention heads per block (1 = single head).
        n_embd: embedding width; must be divisible by ``n_head``.
        dropout: dropout rate on attention weights and sub-layer outputs.
        feed_forward: include the feed-forward sub-layer in each block.
        attn_proj: include the linear projection after the attention heads.
        residual: add each sub-layer's input to its output.
        norm: layer norm placement: ``pre``, ``post`` or ``none``.
        activation: feed-forward non-linearity, ``relu`` or ``gelu``.
        attention: ``sdpa`` (fused kernel) or ``explicit`` (softmax written out).
        tie_weights: share the token embedding matrix with the output head.
        learning_rate: peak AdamW learning rate.
        lr_schedule: ``constant`` or ``cosine`` decay to ``min_lr`` after the warmup.
        min_lr: learning rate at the end of the cosine decay.
        warmup_steps: linear warmup from 0 over this many steps.
        decay_steps: length of the cosine decay, warmup included (default: ``trainer.max_steps``).
        weight_decay: AdamW weight decay, applied to matrices only (weights and embeddings; not biases or norm gains).
        beta1: AdamW beta1.
        beta2: AdamW beta2.
        sample_tokens: characters of sample text logged to TensorBoard at each validation (0: none).
        compile: ``torch.compile`` the network for training and validation (sampling stays eager,
            since compiled generation recompiles for every new length). Parameter names do not
            change, so checkpoints move freely between compiled and eager models.
    """

    def __init__(
        self,
        vocab: str | None = None,
        block_size: int = 256,
        n_layer: int = 6,
        n_head: int = 6,
        n_embd: int = 384,
        dropout: float = 0.2,
        feed_forward: bool = True,
        attn_proj: bool = True,
        residual: bool = True,
        norm: Norm = "pre",
        activation: Activation = "relu",
        attention: AttentionImpl = "sdpa",
        tie_weights: bool = False,
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
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if vocab is None:
            raise UserError("the model needs a vocabulary: train it through the CLI, which takes it from the data")
        if lr_schedule not in ("constant", "cosine"):
            raise UserError(f"lr_schedule must be 'constant' or 'cosine', got {lr_schedule!r}")
        self.tokenizer = CharTokenizer(vocab)
        self.config = GPTConfig(
            vocab_size=len(vocab),
            block_size=block_size,
            n_layer=n_layer,
            n_head=n_head,
            n_embd=n_embd,
            dropout=dropout,
            feed_forward=feed_forward,
            attn_proj=attn_proj,
            residual=residual,
            norm=norm,
            activation=activation,
            attention=attention,
            tie_weights=tie_weights,
        )
        self.model = GPT(self.config)
        self.val_loss = MeanMetric()
        self.train_eval_loss = MeanMetric()  # used when the data module adds a train-split pass
        self._compiled_forward = None
        self._rng_to_restore: dict | None = None  # random state of a checkpoint being resumed
        self._step_lr = learning_rate  # the learning rate of the current training step
        # First step whose loss was NaN or infinite (-1: none). Kept on the device and read only at
        # log steps and validations, so a GPU is never made to wait for it at every step.
        self.register_buffer("first_bad_step", torch.tensor(-1), persistent=False)

    def configure_model(self) -> None:
        if self.hparams.compile and self._compiled_forward is None:
            # A compiled function, not a wrapping module: parameter names, and so checkpoints,
            # stay those of the eager model, and sampling keeps calling the eager one.
            self._compiled_forward = torch.compile(self.model.forward)

    def _loss(self, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x, y = batch
        forward = self._compiled_forward or self.model
        return forward(x, y)[1]

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self._loss(batch)
        bad = ~torch.isfinite(loss.detach()) & (self.first_bad_step < 0)
        self.first_bad_step.copy_(torch.where(bad, self.global_step, self.first_bad_step))
        # Every step: checkpoint and early-stopping callbacks may monitor it, and a run that stops
        # between log steps writes the latest value.
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def _writing_logs(self) -> bool:
        """Whether Lightning writes logs after this batch (every ``log_every_n_steps``).

        ``self.log`` is the largest piece of Python in a cpu.yaml step (cProfile), so the learning
        rate is handed over only when it will be written, the check Lightning's own
        ``LearningRateMonitor`` makes.
        """
        connector = getattr(self.trainer, "_logger_connector", None)
        return bool(getattr(connector, "should_update_logs", True))

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        if self._writing_logs():
            self._stop_if_non_finite()
            # Here rather than at the batch's start: callbacks have run, so a run that was just
            # told to stop (and writes logs now) gets this step's value.
            # A CPU tensor: a float would be copied to the GPU, and waited for, at every step.
            self.log("train/lr", torch.tensor(self._step_lr))

    def _stop_if_non_finite(self) -> None:
        step = int(self.first_bad_step)
        if step >= 0:
            raise UserError(
                f"the training loss became NaN or infinite at step {step}: training stopped before "
                "writing another checkpoint; lower --model.learning_rate and resume from the last good one"
            )

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        if states := self._rng_to_restore:
            torch.set_rng_state(states["torch"])
            if "cuda" in states and torch.cuda.is_available() and len(states["cuda"]) == torch.cuda.device_count():
                torch.cuda.set_rng_state_all(states["cuda"])
            self._rng_to_restore = None
        self._step_lr = self.trainer.optimizers[0].param_groups[0]["lr"]  # the scheduler moves it before batch end

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int, dataloader_idx: int = 0):
        metric = self.val_loss if dataloader_idx == 0 else self.train_eval_loss
        # Weight each batch's mean by its number of real targets: the last window masks some.
        metric.update(self._loss(batch), weight=(batch[1] != -1).sum())

    def on_validation_epoch_end(self) -> None:
        if self.trainer.state.fn == TrainerFn.FITTING:
            self._stop_if_non_finite()  # before the checkpoint callbacks save these weights
        loss = self.val_loss.compute()  # averaged over every process
        self.val_loss.reset()
        metrics = {"val/loss": loss, "val/bpc": loss / math.log(2)}
        if self.train_eval_loss.update_called:
            metrics["train_eval/loss"] = self.train_eval_loss.compute()
            self.train_eval_loss.reset()
        self.log_dict(metrics, prog_bar=True)
        if not self.trainer.sanity_checking and self.trainer.is_global_zero:
            self._log_sample()

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self.validation_step(batch, batch_idx)

    def on_test_epoch_end(self) -> None:
        loss = self.val_loss.compute()
        self.val_loss.reset()
        self.log_dict({"test/loss": loss, "test/bpc": loss / math.log(2)})

    def _log_sample(self) -> None:
        if self.hparams.sample_tokens <= 0 or not isinstance(self.logger, TensorBoardLogger):
            return
        g = torch.Generator(device=self.device).manual_seed(0)  # same seed each time: compare across steps
        start = torch.tensor([self.tokenizer.encode("\n")], device=self.device)
        text = self.tokenizer.decode(self.generate(start, self.hparams.sample_tokens, generator=g)[0].tolist())
        # Four leading spaces make TensorBoard's markdown keep the line breaks.
        markdown = "\n".join("    " + line for line in text.split("\n"))
        self.logger.experiment.add_text("sample", markdown, self.global_step)

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

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # Dropout's random state, so a resumed run continues exactly as an uninterrupted one.
        checkpoint["rng_states"] = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            checkpoint["rng_states"]["cuda"] = torch.cuda.get_rng_state_all()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        # Applied at the first training step, not now: creating data loaders draws from the same
        # generator, and an uninterrupted run did not create them at this point.
        self._rng_to_restore = checkpoint.get("rng_states")
        # Checkpoints of networks wrapped by ``torch.compile(model)`` name parameters
        # ``model._orig_mod.<name>``; strip that so they load into this (eager or compiled) model.
        state = checkpoint["state_dict"]
        checkpoint["state_dict"] = {k.replace("._orig_mod.", ".", 1): v for k, v in state.items()}

    def configure_optimizers(self):
        hp = self.hparams
        # Weight decay only on matrices (linear and embedding weights), never on biases or norm gains.
        params = [p for p in self.parameters() if p.requires_grad]
        groups = [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": hp.weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ]
        # The fused kernel (CUDA and CPU) is one call for all tensors instead of a dozen per tensor.
        optimizer = torch.optim.AdamW(groups, lr=hp.learning_rate, betas=(hp.beta1, hp.beta2), fused=True)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, self._lr_factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def _lr_factor(self, step: int) -> float:
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
