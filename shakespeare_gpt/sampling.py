"""Sampling text from a trained GPT, one character at a time."""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn as nn
from torch.nn import functional as F

from .errors import UserError
from .model import GPT


def check_sampling(max_new_tokens: int, temperature: float, top_k: int | None, vocab_size: int) -> None:
    """Raise a one-line ``UserError`` for settings that cannot sample."""
    if max_new_tokens < 0:
        raise UserError(f"--sample.max_new_tokens {max_new_tokens}: give a number of tokens >= 0")
    if not temperature > 0 or math.isinf(temperature):
        raise UserError(f"--sample.temperature {temperature}: give a finite number > 0 (--sample.top_k 1 is greedy)")
    if top_k is not None and not 1 <= top_k <= vocab_size:
        raise UserError(
            f"--sample.top_k {top_k}: give a number from 1 to the vocabulary size {vocab_size}, or null for all"
        )


@dataclass
class Sampling:
    """What ``predict`` draws from a checkpoint.

    Attributes:
        prompt: text that every sample starts from; for the character model, only characters of its vocabulary.
        num_samples: how many samples to draw, as one batch.
        max_new_tokens: tokens generated after the prompt (characters, for the character model).
        temperature: > 0; below 1 is more conservative, above 1 more random.
        top_k: sample among the k most likely tokens only (1 is greedy); null for all.
        seed: seed of the sampling random generator, so a predict run can be repeated exactly.
    """

    prompt: str = "\n"
    num_samples: int = 1
    max_new_tokens: int = 500
    temperature: float = 1.0
    top_k: int | None = None
    seed: int = 1337

    def __post_init__(self) -> None:
        if self.prompt == "":
            raise UserError('--sample.prompt is empty: give at least one character, e.g. --sample.prompt "ROMEO:"')
        if self.num_samples < 1:
            raise UserError(f"--sample.num_samples {self.num_samples}: give a number >= 1")
        if self.top_k is not None and self.top_k < 1:
            raise UserError(f"--sample.top_k {self.top_k}: give a number >= 1 (1 is greedy), or null for all")
        check_sampling(self.max_new_tokens, self.temperature, None, vocab_size=1)  # top_k: against the vocabulary

    def request(self, tokenizer) -> dict:
        """The predict batch: ``num_samples`` copies of the encoded prompt, and these settings."""
        check_sampling(self.max_new_tokens, self.temperature, self.top_k, len(tokenizer))
        try:
            prompt = torch.tensor(tokenizer.encode(self.prompt), dtype=torch.long)
        except UserError as e:
            raise UserError(f"--sample.prompt {self.prompt!r}: {e}") from None
        return {
            "idx": prompt.repeat(self.num_samples, 1),
            "max_new_tokens": self.max_new_tokens,
            "temperature": self.temperature,
            "top_k": self.top_k,
            "seed": self.seed,
        }


def window_start(length: int, block_size: int) -> int:
    """Index of the first character the model sees when the text has ``length`` characters.

    Learned positions stop at ``block_size``, so a longer text is seen through a window. The
    window jumps forward a quarter block at a time rather than one character: a KV cache is then
    rebuilt once every ``block_size // 4`` steps instead of at every step, and the model always
    sees at least three quarters of a block. The cached and uncached paths share this rule, so
    they produce the same text.
    """
    if length <= block_size:
        return 0
    shift = max(1, block_size // 4)
    return -(-(length - block_size) // shift) * shift  # the smallest multiple of shift that fits


SPLIT_MIN_WEIGHTS = 2**17  # 512 KB in fp32: smaller matrices stay in cache, where one core is fast enough


def split_linear(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """``layer(x)`` for a few rows on a CPU, with the matrix cut into one slab of rows per thread.

    MKL multiplies a matrix by one vector on a single core; on the 2-core benchmark machine it
    streams the weights at about 9 GB/s. Handed to ``bmm`` as slabs, every core streams its own:
    about 36 GB/s there, so batch-1 decoding of the 6x6x384 model spends ~1.1 ms per token on
    matrix products instead of ~4 ms. Only the float rounding differs from ``nn.Linear``.
    """
    rows = x.numel() // layer.in_features
    slabs = math.gcd(layer.out_features, torch.get_num_threads())
    if rows > 16 or slabs == 1 or torch.is_grad_enabled():
        return F.linear(x, layer.weight, layer.bias)
    w = layer.weight.reshape(slabs, layer.out_features // slabs, layer.in_features)
    xt = x.reshape(rows, layer.in_features).t().expand(slabs, -1, -1)  # (slabs, in, rows), no copy
    b = None if layer.bias is None else layer.bias.reshape(slabs, -1, 1)
    y = torch.bmm(w, xt) if b is None else torch.baddbmm(b, w, xt)  # (slabs, out / slabs, rows)
    return y.reshape(layer.out_features, rows).t().reshape(*x.shape[:-1], layer.out_features)


@contextmanager
def split_matrix_products(model: nn.Module) -> Iterator[None]:
    """While generating on a CPU, run the model's large ``nn.Linear`` layers through ``split_linear``.

    The layers keep their weights and parameter names; only their ``forward`` is swapped, and
    restored on exit. On other devices, or with one thread, nothing changes.
    """
    on_cpu = next(model.parameters()).device.type == "cpu"
    layers = [m for m in model.modules() if isinstance(m, nn.Linear) and m.weight.numel() >= SPLIT_MIN_WEIGHTS]
    if not on_cpu or torch.get_num_threads() == 1:
        layers = []
    for layer in layers:
        layer.forward = partial(split_linear, layer)
    try:
        yield
    finally:
        for layer in layers:
            del layer.forward  # back to the class's forward


def sample_next(
    logits: torch.Tensor, temperature: float, top_k: int | None, generator: torch.Generator | None
) -> torch.Tensor:
    """(B, 1) next tokens drawn from (B, vocab) logits, divided by ``temperature``, among the ``top_k`` likeliest."""
    logits = logits / temperature
    if top_k is not None:
        kth = torch.topk(logits, top_k, dim=-1).values[:, [-1]]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = F.softmax(logits.float(), dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator)


@torch.inference_mode()
def generate(
    model: GPT,
    idx: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    generator: torch.Generator | None = None,
    use_cache: bool = True,
) -> torch.Tensor:
    """Extend each row of ``idx`` by ``max_new_tokens`` sampled characters.

    The text can grow past ``block_size``: the model then sees a sliding window of it (see
    ``window_start``); a prompt longer than ``block_size`` is cropped to its end the same way.

    Args:
        model: the network; it is put in eval mode for the duration and restored afterwards.
        idx: (B, T) prompt indices.
        max_new_tokens: how many characters to add.
        temperature: divides the logits; below 1 is more conservative, above 1 more random.
        top_k: sample only among the k most likely characters (1 is greedy decoding).
        generator: random source, for reproducible samples.
        use_cache: keep each layer's keys and values so every step computes only the new token.

    Returns:
        (B, T + max_new_tokens) indices: the prompt followed by the sample.
    """
    check_sampling(max_new_tokens, temperature, top_k, model.config.vocab_size)
    was_training = model.training
    model.eval()
    cache, cache_start = None, None
    use_cache = use_cache and len(model.blocks) > 0  # a model without blocks has nothing to cache
    try:
        with split_matrix_products(model):
            for _ in range(max_new_tokens):
                start = window_start(idx.size(1), model.config.block_size)
                if not use_cache:
                    logits, _ = model(idx[:, start:])
                elif start != cache_start:  # first step, or the window moved: fill a new cache
                    cache, cache_start = model.new_cache(), start
                    logits, _ = model(idx[:, start:], cache=cache)
                else:
                    logits, _ = model(idx[:, -1:], cache=cache)
                idx = torch.cat((idx, sample_next(logits[:, -1, :], temperature, top_k, generator)), dim=1)
    finally:
        model.train(was_training)
    return idx
