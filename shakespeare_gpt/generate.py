"""Sampling text from a trained GPT, one character at a time."""

from __future__ import annotations

import torch
from torch.nn import functional as F

from .errors import UserError
from .model import GPT


def check_sampling(max_new_tokens: int, temperature: float, top_k: int | None, vocab_size: int) -> None:
    """Raise a one-line ``UserError`` for settings that cannot sample."""
    if max_new_tokens < 0:
        raise UserError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if not temperature > 0:
        raise UserError(f"temperature must be > 0 (use top_k=1 for greedy decoding), got {temperature}")
    if top_k is not None and not 1 <= top_k <= vocab_size:
        raise UserError(f"top_k must be between 1 and the vocabulary size {vocab_size}, or None; got {top_k}")


@torch.no_grad()
def generate(
    model: GPT,
    idx: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Extend each row of ``idx`` by ``max_new_tokens`` sampled characters.

    The context is cropped to the last ``block_size`` characters, so the text can grow past the
    longest sequence the model was trained on.

    Args:
        model: the network; it is put in eval mode for the duration and restored afterwards.
        idx: (B, T) prompt indices.
        max_new_tokens: how many characters to add.
        temperature: divides the logits; below 1 is more conservative, above 1 more random.
        top_k: sample only among the k most likely characters (1 is greedy decoding).
        generator: random source, for reproducible samples.

    Returns:
        (B, T + max_new_tokens) indices: the prompt followed by the sample.
    """
    check_sampling(max_new_tokens, temperature, top_k, model.config.vocab_size)
    was_training = model.training
    model.eval()
    try:
        for _ in range(max_new_tokens):
            idx_cond = idx[:, -model.config.block_size :]
            logits, _ = model(idx_cond)
            logits = logits[:, -1, :] / temperature  # (B, vocab_size)
            if top_k is not None:
                kth = torch.topk(logits, top_k, dim=-1).values[:, [-1]]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            probs = F.softmax(logits.float(), dim=-1)
            idx_next = torch.multinomial(probs, num_samples=1, generator=generator)  # (B, 1)
            idx = torch.cat((idx, idx_next), dim=1)
    finally:
        model.train(was_training)
    return idx
