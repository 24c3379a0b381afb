"""Sampling text from a trained GPT, one character at a time."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn as nn
from torch.nn import functional as F

from .model import GPT
from .utils import UserError


@dataclass
class Sampling:
    """What ``predict`` draws from a checkpoint.

    Attributes:
        prompt: text that every sample starts from; for the character model, only characters of its vocabulary.
            Default: a newline, or the vocabulary's first token where it has no newline.
        num_samples: how many samples to draw, in batches of up to ``batch_size``.
        max_new_tokens: tokens generated after the prompt (characters, for the character model).
        temperature: > 0; below 1 is more conservative, above 1 more random.
        top_k: sample among the k most likely tokens only (1 is greedy); null, or more than the vocabulary, for all.
        top_p: nucleus sampling, after temperature and top_k: sample among the fewest most likely tokens whose
            probabilities add up to at least p (0 < p <= 1; 1 for all).
        seed: seed of the sampling random generator, so a predict run can be repeated exactly.
        batch_size: samples drawn at once; the first of each batch is printed as it is drawn, the others
            when the batch is done.
    """

    # Plain types, checked together by ``check`` against the model's vocabulary: every bad setting is
    # then named in one line (jsonargparse's restricted types stop at the first).
    prompt: str | None = None
    num_samples: int = 1
    max_new_tokens: int = 500
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float = 1.0
    seed: int = 1337
    batch_size: int = 64

    def check(self, tokenizer) -> None:
        """Refuse, in one line that names them all, the settings that cannot be sampled with ``tokenizer``."""
        rules = {
            "prompt": (self.prompt != "", "give some text, or leave it out for the default"),
            "num_samples": (self.num_samples >= 1, "give 1 or more"),
            "max_new_tokens": (self.max_new_tokens >= 0, "give 0 or more"),
            "temperature": (self.temperature > 0, "give a number above 0"),
            "top_k": (self.top_k is None or self.top_k >= 1, "give 1 or more, or null for all"),
            "top_p": (0 < self.top_p <= 1, "give a number above 0 and at most 1 (1 for all)"),
            "batch_size": (self.batch_size >= 1, "give 1 or more"),
        }
        problems = [f"--sample.{name} {getattr(self, name)!r}: {fix}" for name, (ok, fix) in rules.items() if not ok]
        if self.prompt:
            try:
                tokenizer.encode(self.prompt)
            except UserError as e:
                problems.append(f"--sample.prompt {self.prompt!r}: {e}")
        if problems:
            raise UserError("; ".join(problems))

    def encode(self, tokenizer, n: int | None = None) -> torch.Tensor:
        """(n, T): the prompt encoded by ``tokenizer``, once per sample (``n``: ``num_samples``)."""
        if self.prompt is not None:
            self.check(tokenizer)
            ids = tokenizer.encode(self.prompt)
        else:  # a line start where the text has lines
            try:
                ids = tokenizer.encode("\n")[-1:]
            except UserError:
                ids = [0]
        return torch.tensor(ids, dtype=torch.long).repeat(n or self.num_samples, 1)


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
    logits: torch.Tensor,
    temperature: float,
    top_k: int | None,
    top_p: float,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """(B, 1) next tokens drawn from (B, vocab) logits, divided by ``temperature``, among the ``top_k`` likeliest,
    then among the fewest likeliest whose probabilities add up to ``top_p`` (the token that reaches it included)."""
    logits = logits / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.size(-1)), dim=-1).values[:, [-1]]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = F.softmax(logits.float(), dim=-1)
    if top_p < 1:
        sorted_probs, order = torch.sort(probs, dim=-1, descending=True)
        before = sorted_probs.cumsum(dim=-1) - sorted_probs  # the mass of the likelier tokens
        probs = probs.scatter(-1, order, sorted_probs.masked_fill(before >= top_p, 0.0))
    return torch.multinomial(probs, num_samples=1, generator=generator)


@torch.inference_mode()
def generate(
    model: GPT,
    idx: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
    use_cache: bool = True,
    on_token: Callable[[torch.Tensor], None] | None = None,
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
        top_p: then only among the fewest most likely characters whose probabilities add up to ``top_p`` (1: all).
        generator: random source, for reproducible samples.
        use_cache: keep each layer's keys and values so every step computes only the new token.
        on_token: called after each step with the (B, T + steps so far) indices (``predict`` prints
            them as they come); it must not change them.

    Returns:
        (B, T + max_new_tokens) indices: the prompt followed by the sample.
    """
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
                idx = torch.cat((idx, sample_next(logits[:, -1, :], temperature, top_k, top_p, generator)), dim=1)
                if on_token is not None:
                    on_token(idx)
    finally:
        model.train(was_training)
    return idx
