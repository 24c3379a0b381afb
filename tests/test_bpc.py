"""Bits per character: one definition for every tokenizer, checked against sums done by hand.

The definition (README, "Bits per character"): the val split's total negative log-likelihood in
bits, over the characters of every token but the split's first, each token scored once by
strided windows that give it at least half a window of context after the first window.
"""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch

from shakespeare_gpt.data import ShakespeareDataModule, ValWindows
from shakespeare_gpt.lightning_module import LanguageModel

from .conftest import TINY_TEXT


@pytest.mark.parametrize("n,T", [(101, 10), (100, 10), (11, 10), (57, 7), (300, 9), (40, 2)])
def test_windows_score_every_token_but_the_first_once_with_half_a_window_of_context(n, T):
    ds = ValWindows(torch.arange(n), T)
    x, y, chars = ds.x, ds.y, ds.chars
    assert torch.equal(y[y != -1].sort().values, torch.arange(1, n))  # every target once; token 0 never
    assert torch.equal(x + 1, torch.where(y == -1, x + 1, y))  # a target is the token after its input
    assert torch.equal(chars, (y != -1).long())  # characters: one per scored token
    for row in range(1, len(y)):  # after the first window: context of at least half a window
        positions = (y[row] != -1).nonzero().flatten()
        assert (positions + 1 >= T / 2).all(), (row, positions.tolist())


class Fixed(LanguageModel):
    """A model whose next-token distribution is known: ``q``, whatever the context."""

    def __init__(self, q: torch.Tensor) -> None:
        super().__init__(1e-3, "constant", 0.0, 0, None, 0.0, 0.9, 0.99, 0)
        self.register_buffer("log_q", q.log())

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.log_q.expand(*x.shape, -1)


class Chunks:
    """A tokenizer whose tokens cover 1, 2, 3, 4, 1, 2, ... characters: uneven on purpose.

    Its id for a chunk is the chunk's length minus one, so four ids in all.
    """

    def __len__(self) -> int:
        return 4

    def encode_with_chars(self, text: str) -> tuple[torch.Tensor, torch.Tensor]:
        lengths, i, k = [], 0, 0
        while i < len(text):
            step = min(k % 4 + 1, len(text) - i)
            lengths.append(step)
            i, k = i + step, k + 1
        chars = torch.tensor(lengths)
        return chars - 1, chars


def validate(model: LanguageModel, dm: ShakespeareDataModule) -> dict[str, float]:
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    (metrics,) = trainer.validate(model, dm, verbose=False)
    return metrics


@pytest.mark.parametrize("block_size", [5, 8, 16])
def test_bpc_of_a_known_distribution_equals_the_sum_done_by_hand(corpus_dir, block_size):
    dm = ShakespeareDataModule(str(corpus_dir / "input.txt"), block_size=block_size, batch_size=4, val_batch_size=3)
    dm.tokenizer = Chunks()  # uneven characters per token
    q = torch.tensor([0.1, 0.2, 0.3, 0.4])
    metrics = validate(Fixed(q), dm)

    # By hand, from the val text alone: its tokens, each but the first scored once.
    val_text = TINY_TEXT[int(0.9 * len(TINY_TEXT)) :]
    ids, chars = Chunks().encode_with_chars(val_text)
    assert chars.sum() == len(val_text)
    bits = sum(-math.log2(q[i]) for i in ids[1:].tolist())
    assert metrics["val/bpc"] == pytest.approx(bits / chars[1:].sum().item(), rel=1e-5)
    assert metrics["val/loss"] == pytest.approx(bits * math.log(2) / (len(ids) - 1), rel=1e-5)


def test_a_character_model_bpc_is_its_loss_in_bits(corpus_dir):
    from shakespeare_gpt.lightning_module import ShakespeareGPT

    dm = ShakespeareDataModule(str(corpus_dir / "input.txt"), block_size=16, batch_size=4)
    torch.manual_seed(0)
    model = ShakespeareGPT(dm.vocab, block_size=16, n_layer=1, n_head=2, n_embd=16, dropout=0.0)
    metrics = validate(model, dm)
    assert metrics["val/bpc"] == pytest.approx(metrics["val/loss"] / math.log(2), rel=1e-6)

    # And the same number as scoring each token of the val split once, by hand, with the
    # context the windows give it (inputs from the window's start).
    val = dm.encoded["val"][0]
    ds = ValWindows(val, 16)
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for x, y in zip(ds.x, ds.y, strict=True):
            for j in (y != -1).nonzero().flatten().tolist():
                logits = model.model(x[None, : j + 1])[0][0, -1]
                total -= torch.log_softmax(logits, -1)[y[j]].item()
                count += 1
    assert count == len(val) - 1
    assert metrics["val/bpc"] == pytest.approx(total / math.log(2) / count, rel=1e-4)
