"""A decoder-only transformer written from scratch in plain PyTorch.

Read top to bottom: the config, attention, the feed-forward network, a block, the GPT.
Nothing here imports Lightning; training, logging and the CLI wrap this file.

Every component the ablation study switches off is a field of ``GPTConfig`` and is
implemented by one branch or an ``nn.Identity()``, never by a second copy of a class.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn as nn
from jsonargparse.typing import NonNegativeInt, PositiveInt
from torch.nn import functional as F

from .utils import Fraction, UserError, builtin_fields

Norm = Literal["pre", "post", "none"]
Activation = Literal["relu", "gelu"]
AttentionImpl = Literal["sdpa", "explicit"]


@dataclass
class GPTConfig:
    """Architecture of the network. The defaults are the lecture's model (about 10.8M parameters).

    This is the one place a model field is declared: the LightningModule and the command line
    (``--model.<field>``, described by the lines below) take their architecture arguments from it,
    and the command line refuses a value its type does not allow.

    Attributes:
        vocab_size: number of distinct characters; the data decides it.
        block_size: longest context the model sees, in characters (learned positions exist up to here).
        n_layer: transformer blocks; 0 leaves embeddings and head: the bigram baseline.
        n_head: attention heads per block (1 is the single-head ablation); must divide ``n_embd``.
        n_embd: width of the residual stream.
        dropout: rate on attention weights and on each sub-layer's output, in [0, 1).
        feed_forward: include the MLP sub-layer in each block.
        attn_proj: include the linear projection after the concatenated heads.
        residual: add each sub-layer's input to its output (``x + f(x)``; false: ``x = f(x)``).
        norm: layer norm before each sub-layer (``pre``), after the residual add (``post``), or ``none``.
        activation: feed-forward non-linearity: ``relu`` (the lecture) or ``gelu`` (GPT-2).
        attention: ``sdpa`` (the fused kernel) or ``explicit`` (the softmax written out, weights visible).
        tie_weights: share the token embedding matrix with the output head.
    """

    vocab_size: PositiveInt = 65
    block_size: PositiveInt = 256
    n_layer: NonNegativeInt = 6
    n_head: PositiveInt = 6
    n_embd: PositiveInt = 384
    dropout: Fraction = 0.2
    feed_forward: bool = True
    attn_proj: bool = True
    residual: bool = True
    norm: Norm = "pre"
    activation: Activation = "relu"
    attention: AttentionImpl = "sdpa"
    tie_weights: bool = False

    def __post_init__(self) -> None:  # the types check each field; this, what they cannot
        builtin_fields(self)
        if self.n_embd % self.n_head != 0:
            raise UserError(
                f"--model.n_head {self.n_head} does not divide --model.n_embd {self.n_embd}: "
                "choose them so that every head gets n_embd // n_head dimensions"
            )

    def memory_bytes(self, batch_size: int = 0, training: bool = True) -> int:
        """A lower bound on the memory, in bytes, of this model and of one step on ``batch_size`` windows.

        Counts fp32 weights (with gradients and AdamW's two moments when ``training``), the fp32
        causal masks, and the activations at 2 bytes each (bf16): for training those every layer
        keeps for the backward pass, for inference one layer's. Used to refuse, before anything is
        allocated, a size that cannot fit: it undercounts, so it does not refuse one that can.
        """
        C, T, L, V = self.n_embd, self.block_size, self.n_layer, self.vocab_size
        params = V * C + T * C + L * 12 * C * C + (0 if self.tie_weights else C * V)
        weights = 4 * params * (4 if training else 1) + 4 * L * T * T  # + one float mask per layer
        per_layer = 10 * T * C  # inputs of the linear layers, norms and activations
        if self.attention == "explicit":
            per_layer += 2 * self.n_head * T * T  # scores and their softmax
        activations = batch_size * ((L if training else min(L, 1)) * per_layer + 2 * T * V)  # + logits, softmax
        return weights + 2 * activations


def dropout(p: float) -> nn.Module:
    """``nn.Dropout(p)``, or a no-op module when ``p`` is 0 (cheaper in generation's many small calls)."""
    return nn.Dropout(p) if p > 0 else nn.Identity()


class KVCache:
    """Keys and values one attention layer has computed so far, so generation feeds one new token per step.

    Positions count from the start of the current context window; the cache fills up to
    ``max_len`` (the block size) and is then rebuilt by the caller (see ``generate``).
    """

    def __init__(self, max_len: int) -> None:
        self.max_len = max_len
        self.length = 0
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store (B, nh, T, hs) keys and values after the ones held; return all of them."""
        if self.k is None:  # allocated on first use, in the dtype autocast gives k and v
            B, nh, _, hs = k.shape
            self.k = k.new_empty(B, nh, self.max_len, hs)
            self.v = v.new_empty(B, nh, self.max_len, hs)
        end = self.length + k.size(2)
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions, asked for {end}: rebuild it")
        self.k.narrow(2, self.length, k.size(2)).copy_(k)
        self.v.narrow(2, self.length, v.size(2)).copy_(v)
        self.length = end
        return self.k.narrow(2, 0, end), self.v.narrow(2, 0, end)


class CausalSelfAttention(nn.Module):
    """All heads at once: one fused q/k/v projection, causal attention, optional output projection."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.n_head = config.n_head
        self.attention = config.attention
        self.dropout = config.dropout
        # The lecture's heads have no bias on key, query and value; one matrix computes all three.
        self.qkv = nn.Linear(config.n_embd, 3 * config.n_embd, bias=False)
        self.proj = nn.Linear(config.n_embd, config.n_embd) if config.attn_proj else nn.Identity()
        self.attn_dropout = dropout(config.dropout)
        self.resid_dropout = dropout(config.dropout)
        # Added to the scores: 0 where query i may see key j (j <= i), -inf above the diagonal.
        # Adding is cheaper than masked_fill, forward and backward (its gradient passes through).
        mask = torch.full((config.block_size, config.block_size), float("-inf")).triu(diagonal=1)
        self.register_buffer("causal_mask", mask, persistent=False)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        B, T, C = x.shape
        # (B, T, 3C) -> q, k, v, each (B, nh, T, hs): the heads become a batch dimension.
        qkv = self.qkv(x).view(B, T, 3, self.n_head, C // self.n_head)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        start = 0  # position of x's first token in the context
        if cache is not None:
            start = cache.length
            k, v = cache.append(k, v)  # (B, nh, start + T, hs)
        if self.attention == "sdpa":
            # Dropout inside the kernel must be switched off by hand at evaluation.
            p = self.dropout if self.training else 0.0
            if start == 0:
                y = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)
            else:  # continuing a cached context
                mask = self._causal_mask(start, T, q.dtype)
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
        else:
            # Scores are scaled by 1/sqrt(head_size), not 1/sqrt(n_embd); scaling q is the same
            # product and touches fewer numbers.
            att = (q * (1.0 / math.sqrt(k.size(-1)))) @ k.transpose(-2, -1)  # (B, nh, T, start + T)
            if (mask := self._causal_mask(start, T, q.dtype)) is not None:
                att = att + mask
            # In float32 even under bf16 autocast (where softmax would stay in bf16), as fused kernels do.
            att = F.softmax(att, dim=-1, dtype=torch.float32).to(q.dtype)
            # A forward hook on attn_dropout sees these weights: GPT.attention_maps draws them that way.
            y = self.attn_dropout(att) @ v  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # re-assemble the heads side by side
        return self.resid_dropout(self.proj(y))

    def _causal_mask(self, start: int, T: int, dtype: torch.dtype) -> torch.Tensor | None:
        """Added to the scores of queries at positions start .. start + T - 1: query i may see
        keys 0 .. start + i. None for one new token, which sees them all."""
        return None if T == 1 else self.causal_mask[start : start + T, : start + T].to(dtype)


class FeedForward(nn.Module):
    """Position-wise MLP: widen 4x, non-linearity, project back."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.fc = nn.Linear(config.n_embd, 4 * config.n_embd)
        self.act = nn.ReLU() if config.activation == "relu" else nn.GELU()
        self.proj = nn.Linear(4 * config.n_embd, config.n_embd)
        self.dropout = dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.proj(self.act(self.fc(x))))


class Block(nn.Module):
    """Attention then feed-forward, each wrapped in residual and layer norm as the config says."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.norm = config.norm
        self.residual = config.residual
        self.attn = CausalSelfAttention(config)
        self.ffwd = FeedForward(config) if config.feed_forward else None

        def make_norm() -> nn.Module:
            return nn.LayerNorm(config.n_embd) if config.norm != "none" else nn.Identity()

        self.ln1 = make_norm()
        self.ln2 = make_norm() if config.feed_forward else nn.Identity()

    def forward(self, x: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """Apply both sub-layers.

        ::

            pre  (GPT-2, default):  x -> x + f(ln(x))
            post (original paper):  x -> ln(x + f(x))
            none:                   x -> x + f(x)
            residual=False:         the "x +" is dropped in each of the above
        """
        x = self._sublayer(x, lambda h: self.attn(h, cache), self.ln1)
        if self.ffwd is not None:
            x = self._sublayer(x, self.ffwd, self.ln2)
        return x

    def _sublayer(self, x: torch.Tensor, f: Callable[[torch.Tensor], torch.Tensor], ln: nn.Module) -> torch.Tensor:
        if self.norm == "post":
            out = f(x)
            return ln(x + out if self.residual else out)
        out = f(ln(x))  # ln is Identity when norm == "none"
        return x + out if self.residual else out


class GPT(nn.Module):
    """Token and position embeddings, ``n_layer`` blocks, a final layer norm and a linear head."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        self.tok_emb = nn.Embedding(config.vocab_size, config.n_embd)
        self.pos_emb = nn.Embedding(config.block_size, config.n_embd)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd) if config.norm != "none" else nn.Identity()
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size)
        if config.tie_weights:
            self.lm_head.weight = self.tok_emb.weight
        self.apply(self._init_weights)
        # GPT-2's scaled init: each residual branch adds to the stream, so shrink its last layer.
        for name, p in self.named_parameters():
            if name.endswith("proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))  # only in blocks

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def num_parameters(self) -> int:
        """Distinct parameters (a tied embedding counts once)."""
        return sum(p.numel() for p in self.parameters())

    def flops_per_token(self) -> int:
        """Training FLOPs per token, forward and backward (PaLM, appendix B).

        6 per weight of every matrix multiply (2 forward, 4 backward) plus the attention scores
        and their weighted sum, 12 * n_layer * n_embd * block_size. Embedding lookups cost none.
        """
        cfg = self.config
        matrices = sum(p.numel() for p in self.parameters() if p.dim() == 2)  # a tied matrix counts once
        lookups = self.pos_emb.weight.numel() + (0 if cfg.tie_weights else self.tok_emb.weight.numel())
        return 6 * (matrices - lookups) + 12 * cfg.n_layer * cfg.n_embd * cfg.block_size

    @torch.no_grad()
    def attention_maps(self, idx: torch.Tensor) -> torch.Tensor:
        """(n_layer, B, n_head, T, T) attention weights of every layer and head for ``idx`` (B, T), at evaluation
        (n_layer >= 1: the bigram model has none).

        Computed through the written-out softmax whichever kernel the model trains with (a fused kernel
        never forms the weights): each layer is switched to ``explicit`` for this one pass, and a forward
        hook on its ``attn_dropout`` reads the weights. Row i is query i's weights over keys 0 .. i: it sums
        to 1, and the keys after i get exactly 0.
        """
        maps, attns = [], [block.attn for block in self.blocks]
        hooks = [a.attn_dropout.register_forward_hook(lambda m, args, out: maps.append(args[0].float())) for a in attns]
        kernels, was_training = [a.attention for a in attns], self.training
        self.eval()
        try:
            for a in attns:
                a.attention = "explicit"
            self(idx)
        finally:
            for a, kernel, hook in zip(attns, kernels, hooks, strict=True):
                a.attention = kernel
                hook.remove()
            self.train(was_training)
        return torch.stack(maps)

    def new_cache(self) -> list[KVCache]:
        """An empty KV cache for each block, for ``forward(..., cache=...)``."""
        return [KVCache(self.config.block_size) for _ in self.blocks]

    def forward(
        self, idx: torch.Tensor, targets: torch.Tensor | None = None, cache: list[KVCache] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Next-character logits for every position, and the mean cross-entropy if targets are given.

        Args:
            idx: (B, T) character indices, T <= block_size.
            targets: (B, T) the next character at each position; -1 marks a position to ignore.
            cache: from ``new_cache()``; ``idx`` then continues the tokens the cache has seen.
        """
        B, T = idx.shape
        if cache is not None and len(cache) != len(self.blocks):
            raise ValueError(f"cache has {len(cache)} layers, the model {len(self.blocks)}: use new_cache()")
        start = cache[0].length if cache else 0
        if start + T > self.config.block_size:
            raise ValueError(f"sequence length {start + T} exceeds block_size={self.config.block_size}")
        x = self.tok_emb(idx) + self.pos_emb.weight[start : start + T]  # (B, T, C); positions start.. start+T-1
        for i, block in enumerate(self.blocks):
            x = block(x, cache[i] if cache else None)
        logits = self.lm_head(self.ln_f(x))  # (B, T, vocab_size)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(B * T, -1), targets.reshape(B * T), ignore_index=-1)
        return logits, loss
