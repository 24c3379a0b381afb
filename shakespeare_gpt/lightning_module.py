"""The LightningModules: training, validation and predict steps, AdamW and its schedule, ``generate``.

``LanguageModel`` holds what every model of this project shares: the optimiser and its schedule,
the validation loss and bits per character (one definition for every tokenizer), and sampling
in ``predict``. ``ShakespeareGPT`` is the from-scratch character model; ``pretrained.PretrainedLM``
wraps a Hugging Face causal LM. The CLI chooses between them from ``--model`` (``class_path``).

Everything else that happens during training (checkpoints, the learning-rate curve, throughput,
interrupts, the NaN guard, the random state of a resumed run) is a callback: see ``callbacks.py``.
"""

from __future__ import annotations

import math
from dataclasses import asdict
from typing import Literal

import lightning as L
import torch
from torch.nn import functional as F
from torchmetrics import SumMetric

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


class LanguageModel(L.LightningModule):
    """What every model here shares: AdamW with warmup and a constant or cosine schedule, the val
    loss and bits per character, and sampling in ``predict``.

    A subclass sets ``self.tokenizer`` (``encode``, ``decode``, ``len``) and defines ``logits``
    and ``generate``; its init args are saved by its own ``save_hyperparameters()``.

    Bits per character (``val/bpc``): the val split's total negative log-likelihood in bits
    divided by the number of characters it covers. The data's ``ValWindows`` score every token
    but the split's first once, with at least half a window of context after the first window,
    and say how many characters each token completes; a character model's ``val/bpc`` is
    therefore ``val/loss / ln 2``, and any tokenizer's is comparable with it.
    """

    def __init__(
        self,
        learning_rate: float,
        lr_schedule: str,
        min_lr: float,
        warmup_steps: int,
        decay_steps: int | None,
        weight_decay: float,
        beta1: float,
        beta2: float,
        sample_tokens: int,
    ) -> None:
        super().__init__()
        check_optimizer(learning_rate, lr_schedule, min_lr, warmup_steps, decay_steps, weight_decay, beta1, beta2)
        if isinstance(sample_tokens, bool) or not isinstance(sample_tokens, int) or sample_tokens < 0:
            raise UserError(f"--model.sample_tokens {sample_tokens!r}: give a number of tokens >= 0 (0: none)")
        # Sums over the pass, synchronised across processes: nats, scored tokens, their characters.
        self.eval_sums = torch.nn.ModuleDict(
            {
                f"{split}_{what}": SumMetric().set_dtype(torch.float64)
                for split in ("val", "train_eval")
                for what in ("nll", "tokens", "chars")
            }
        )

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, vocab) next-token logits for (B, T) token ids."""
        raise NotImplementedError

    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, generator=None) -> torch.Tensor:
        """Extend each row of ``idx`` (B, T) by ``max_new_tokens`` sampled tokens."""
        raise NotImplementedError

    def loss(self, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """Mean cross-entropy, in nats per token, over the targets that are not -1."""
        x, y = batch[0], batch[1]
        return F.cross_entropy(self.logits(x).flatten(0, 1).float(), y.flatten(), ignore_index=-1)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self.loss(batch)

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        # Handed to Lightning only at the steps its logger writes (every log_every_n_steps, and the
        # step a run stops at): one self.log costs about 1.4 ms on a 2-core CPU, a fifth of a
        # step at the ablation study's scale, and a value logged at any other step is dropped.
        if self.trainer.global_step % self.trainer.log_every_n_steps == 0 or self.trainer.should_stop:
            self.log("train/loss", outputs["loss"], prog_bar=True)

    def validation_step(self, batch: tuple[torch.Tensor, ...], batch_idx: int, dataloader_idx: int = 0) -> None:
        x, y, chars = batch
        nll = F.cross_entropy(self.logits(x).flatten(0, 1).float(), y.flatten(), ignore_index=-1, reduction="none")
        # Summed in float64: the total then does not depend on how the windows are batched.
        nll = nll.double().sum()
        split = "val" if dataloader_idx == 0 else "train_eval"
        self.eval_sums[f"{split}_nll"].update(nll)
        self.eval_sums[f"{split}_tokens"].update((y != -1).sum())
        self.eval_sums[f"{split}_chars"].update(chars.sum())

    def eval_metrics(self, split: str, prefix: str) -> dict[str, torch.Tensor]:
        """``<prefix>/loss`` (nats per token) and ``<prefix>/bpc`` (bits per character) of a finished pass."""
        nll, tokens, chars = (self.eval_sums[f"{split}_{what}"] for what in ("nll", "tokens", "chars"))
        if not nll.update_called:
            return {}
        total = nll.compute()  # summed over every process; so are the counts: the ratios stay the same
        metrics = {f"{prefix}/loss": total / tokens.compute(), f"{prefix}/bpc": total / math.log(2) / chars.compute()}
        for metric in (nll, tokens, chars):
            metric.reset()
        return metrics

    def on_validation_epoch_end(self) -> None:
        metrics = self.eval_metrics("val", "val")
        if train := self.eval_metrics("train_eval", "train_eval"):
            metrics["train_eval/loss"] = train["train_eval/loss"]
        self.log_dict(metrics, prog_bar=True)

    def test_step(self, batch: tuple[torch.Tensor, ...], batch_idx: int) -> None:
        self.validation_step(batch, batch_idx)

    def on_test_epoch_end(self) -> None:
        self.log_dict(self.eval_metrics("val", "test"))

    def predict_step(self, batch: dict, batch_idx: int) -> list[str]:
        g = torch.Generator(device=self.device).manual_seed(batch["seed"])
        out = self.generate(batch["idx"], batch["max_new_tokens"], batch["temperature"], batch["top_k"], g)
        return [self.tokenizer.decode(row) for row in out.tolist()]

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


class ShakespeareGPT(LanguageModel):
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
        if vocab is None:
            raise UserError("the model needs a vocabulary: train it through the CLI, which takes it from the data")
        super().__init__(
            learning_rate, lr_schedule, min_lr, warmup_steps, decay_steps, weight_decay, beta1, beta2, sample_tokens
        )
        self.config = GPTConfig(vocab_size=len(vocab), **arch)
        self.save_hyperparameters()
        # Every field, defaults included: the checkpoint then describes this network exactly.
        self.hparams.update({k: v for k, v in asdict(self.config).items() if k != "vocab_size"})
        self.tokenizer = CharTokenizer(vocab)
        self.model = GPT(self.config)
        self.flops_per_token = self.model.flops_per_token()  # for throughput and MFU
        self.compiled_forward = None

    def configure_model(self) -> None:
        if self.hparams.compile and self.compiled_forward is None:
            # A compiled function, not a wrapping module: parameter names, and so checkpoints,
            # stay those of the eager model, and sampling keeps calling the eager one.
            self.compiled_forward = torch.compile(self.model.forward)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return (self.compiled_forward or self.model)(x)[0]

    def loss(self, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        x, y = batch[0], batch[1]
        return (self.compiled_forward or self.model)(x, y)[1]  # the model's own cross-entropy

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
