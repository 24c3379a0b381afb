"""The LightningModules: training, validation and predict steps, AdamW and its schedule, ``generate``.

``LanguageModel`` holds what every model of this project shares: the optimiser and its schedule,
the validation loss and bits per character (one definition for every tokenizer), and sampling
in ``predict``. ``ShakespeareGPT`` is the from-scratch character model; ``pretrained.PretrainedLM``
wraps a Hugging Face causal LM. The CLI chooses between them from ``--model`` (``class_path``).

Everything else that happens during training (checkpoints, the learning-rate curve, throughput,
interrupts, the NaN guard, the random state of a resumed run) is a callback: see ``callbacks.py``.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import asdict, dataclass
from typing import Literal

import lightning as L
import torch
from jsonargparse.typing import NonNegativeFloat, NonNegativeInt, PositiveInt
from torch.nn import functional as F
from torchmetrics import SumMetric

from .model import GPT, GPTConfig
from .sampling import Sampling, generate
from .tokenizer import CharTokenizer
from .utils import Fraction, LearningRate, UserError, builtin_fields


@dataclass
class Recipe:
    """How a model is trained: AdamW, a linear warmup, then a constant or cosine learning rate.

    Declared once, for every model class: the command line takes each field as ``--model.<field>``.

    Attributes:
        learning_rate: peak AdamW learning rate.
        lr_schedule: ``constant``, or ``cosine`` decay to ``min_lr`` after the warmup.
        min_lr: learning rate at the end of the cosine decay.
        warmup_steps: linear warmup from 0 over this many steps.
        decay_steps: length of the cosine decay, warmup included (default: ``trainer.max_steps``).
        weight_decay: AdamW weight decay, applied to matrices only (not biases or norm gains).
        beta1: AdamW beta1.
        beta2: AdamW beta2.
    """

    learning_rate: LearningRate = 3e-4
    lr_schedule: Literal["constant", "cosine"] = "constant"
    min_lr: NonNegativeFloat = 0.0
    warmup_steps: NonNegativeInt = 0
    decay_steps: PositiveInt | None = None
    weight_decay: NonNegativeFloat = 0.01
    beta1: Fraction = 0.9
    beta2: Fraction = 0.999

    def __post_init__(self) -> None:  # the types check each field; this, what they cannot
        builtin_fields(self)
        if self.lr_schedule == "cosine" and self.min_lr > self.learning_rate:
            raise UserError(
                f"--model.min_lr {self.min_lr}: give a number from 0 to --model.learning_rate "
                f"({self.learning_rate}): the cosine schedule decays to it"
            )

    def decay_steps_of(self, max_steps: int | None) -> int:
        """The cosine decay's length, warmup included, for a run of ``max_steps`` (-1: no end)."""
        if self.lr_schedule == "cosine" and not self.decay_steps and (max_steps is None or max_steps < 0):
            raise UserError("a cosine schedule needs an end: give --trainer.max_steps or --model.decay_steps")
        return self.decay_steps or max_steps

    def lr_factor(self, step: int, max_steps: int) -> float:
        """Multiplier of the peak learning rate at ``step``: linear warmup, then constant or cosine."""
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if self.lr_schedule == "constant":
            return 1.0
        total = self.decay_steps_of(max_steps)
        progress = min(1.0, (step - self.warmup_steps) / max(1, total - self.warmup_steps))
        min_factor = self.min_lr / self.learning_rate
        return min_factor + (1 - min_factor) * 0.5 * (1.0 + math.cos(math.pi * progress))


class LanguageModel(L.LightningModule):
    """What every model here shares: the training recipe, the val loss and bits per character, and
    sampling in ``predict``.

    A subclass sets ``self.tokenizer`` (``encode``, ``decode``, ``len``, ``encode_with_chars``) and
    defines ``logits`` and ``generate``; it saves its settings with ``save_settings``. In ``predict``,
    ``token_sink`` (set by ``callbacks.SampleWriter``) sees the tokens of each batch as they are drawn.

    Bits per character (``val/bpc``): the val split's total negative log-likelihood in bits
    divided by the number of characters it covers. The data's ``ValWindows`` score every token
    but the split's first once, with at least half a window of context after the first window,
    and say how many characters each token completes; a character model's ``val/bpc`` is
    therefore ``val/loss / ln 2``, and any tokenizer's is comparable with it.
    """

    def __init__(self, recipe: Recipe) -> None:
        super().__init__()
        self.recipe = recipe
        self.token_sink = None  # predict_step hands it to ``generate``: see ``sampling.generate``
        # Sums over the pass, synchronised across processes: nats, scored tokens, their characters. A NaN
        # stays a NaN (torchmetrics would drop it, and a broken run would log a val loss of 0).
        self.eval_sums = torch.nn.ModuleDict(
            {
                f"{split}_{what}": SumMetric(nan_strategy="disable").set_dtype(torch.float64)
                for split in ("val", "train_eval")
                for what in ("nll", "tokens", "chars")
            }
        )

    def save_settings(self, **settings) -> None:
        """Save the subclass's init args as ``hparams``, with ``settings`` (defaults included): the
        checkpoint then describes the model exactly."""
        self.save_hyperparameters(frame=inspect.currentframe().f_back)
        self.hparams.update(settings)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, vocab) next-token logits for (B, T) token ids."""
        raise NotImplementedError

    def generate(
        self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=1.0, generator=None, on_token=None
    ) -> torch.Tensor:
        """Extend each row of ``idx`` (B, T) by ``max_new_tokens`` sampled tokens: ``sampling.generate``'s arguments."""
        raise NotImplementedError

    def attention_maps(self, idx: torch.Tensor) -> torch.Tensor | None:
        """(n_layer, B, n_head, T, T) attention weights for (B, T) token ids; None where this project does not
        read them."""
        return None

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

    def predict_step(self, batch: Sampling | None, batch_idx: int) -> list[str]:
        """Samples drawn as ``batch``, the ``--sample.*`` settings for this batch of them, asks (None: the defaults).

        One random generator, seeded at the first batch, draws every batch: a first batch is the
        same whatever the batches after it.
        """
        batch = batch or Sampling()
        if batch_idx == 0:
            self.sample_generator = torch.Generator(device=self.device).manual_seed(batch.seed)
        idx = batch.encode(self.tokenizer).to(self.device)
        settings = (batch.temperature, batch.top_k, batch.top_p, self.sample_generator)
        out = self.generate(idx, batch.max_new_tokens, *settings, on_token=self.token_sink)
        return [self.tokenizer.decode(row) for row in out.tolist()]

    def configure_optimizers(self):
        r = self.recipe
        # Weight decay only on matrices (linear and embedding weights), never on biases or norm gains.
        params = [p for p in self.parameters() if p.requires_grad]
        groups = [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": r.weight_decay, "name": "decayed"},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0, "name": "not_decayed"},
        ]
        # The fused kernel (CUDA and CPU) is one call for all tensors instead of a dozen per tensor.
        optimizer = torch.optim.AdamW(groups, lr=r.learning_rate, betas=(r.beta1, r.beta2), fused=True)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: r.lr_factor(step, self.trainer.max_steps))
        # LearningRateMonitor draws train/lr/<group name>.
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step", "name": "train/lr"},
        }


@dataclass
class CharModelSettings(GPTConfig, Recipe):
    """The character model's settings: its architecture (``GPTConfig``) and its training recipe (``Recipe``)."""

    def __post_init__(self) -> None:
        GPTConfig.__post_init__(self)
        Recipe.__post_init__(self)


class ShakespeareGPT(LanguageModel):
    """A character-level GPT trained with AdamW.

    Every setting is a flat primitive saved in checkpoints, the vocabulary and the whole
    architecture included, so a checkpoint rebuilds the model on its own.

    Args:
        vocab: the characters the model reads and writes; ``fit`` takes them from the data.
        sample_tokens: characters of sample text logged to TensorBoard at each validation (0: none).
        compile: ``torch.compile`` the network for training and validation; sampling stays eager
            (compiled generation recompiles for every new length). Parameter names do not change,
            so checkpoints move freely between compiled and eager models.
        **settings: the architecture (``GPTConfig``'s fields, all but ``vocab_size``, which the
            vocabulary decides) and the training recipe (``Recipe``'s fields), listed under ``--help``.
    """

    def __init__(
        self, vocab: str | None = None, sample_tokens: NonNegativeInt = 200, compile: bool = False, **settings
    ) -> None:
        if vocab is None:
            raise UserError(
                "the character model needs a vocabulary: give --ckpt_path (a trained model carries its own); "
                "fit takes it from the corpus"
            )
        config = CharModelSettings(vocab_size=len(vocab), **settings)
        super().__init__(config)
        self.save_settings(**{k: v for k, v in asdict(config).items() if k != "vocab_size"})
        self.config = config
        self.tokenizer = CharTokenizer(vocab)
        self.model = GPT(config)
        self.flops_per_token = self.model.flops_per_token()  # for throughput and MFU
        self.compiled_forward = None
        self.example_input_array = torch.zeros(1, config.block_size, dtype=torch.long)  # the summary counts its FLOPs

    def configure_model(self) -> None:
        if self.hparams.compile and self.compiled_forward is None:
            # A compiled function, not a wrapping module: parameter names, and so checkpoints,
            # stay those of the eager model, and sampling keeps calling the eager one.
            self.compiled_forward = torch.compile(self.model.forward)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The eager network's logits: what the model summary runs ``example_input_array`` through (no compiling)."""
        return self.model(x)[0]

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return (self.compiled_forward or self.model)(x)[0]

    def attention_maps(self, idx: torch.Tensor) -> torch.Tensor | None:
        return self.model.attention_maps(idx) if self.config.n_layer else None  # the bigram model has none

    def loss(self, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        x, y = batch[0], batch[1]
        return (self.compiled_forward or self.model)(x, y)[1]  # the model's own cross-entropy

    def generate(self, idx: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """Extend each row of ``idx`` (B, T) by sampled characters: ``sampling.generate``'s arguments."""
        return generate(self.model, idx, *args, **kwargs)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        # Networks wrapped by ``torch.compile(model)`` name parameters ``model._orig_mod.<name>``.
        state = checkpoint["state_dict"]
        checkpoint["state_dict"] = {k.replace("._orig_mod.", ".", 1): v for k, v in state.items()}
