"""Characters to token ids and back: the character model's tokenizer.

Owned by the model, which a checkpoint rebuilds with its vocabulary, so sampling never needs the
corpus; the data encodes its text with the tokenizer of the model it trains or scores (a
``PretrainedLM`` brings a Hugging Face one with the same methods).
"""

from __future__ import annotations

import torch

from .utils import UserError


class CharTokenizer:
    """Maps each character of a fixed vocabulary to its index and back."""

    def __init__(self, vocab: str) -> None:
        if not vocab or len(set(vocab)) != len(vocab):
            raise UserError(f"a vocabulary must be a non-empty string of distinct characters, got {vocab!r}")
        self.vocab = vocab
        self.stoi = {ch: i for i, ch in enumerate(vocab)}
        self.fingerprint = f"characters {vocab}"  # what a cache of encoded text is keyed by
        points = torch.tensor([ord(ch) for ch in vocab])
        self.points, self.order = points.sort()  # code points in order, and the id of each

    def __len__(self) -> int:
        return len(self.vocab)

    def encode(self, text: str) -> list[int]:
        try:
            return [self.stoi[ch] for ch in text]
        except KeyError:
            unknown = sorted(set(text) - set(self.vocab))
            raise UserError(
                f"characters not in the model's vocabulary: {''.join(unknown)!r}; use only these: {self.vocab!r}"
            ) from None

    def decode(self, ids: list[int]) -> str:
        return "".join(self.vocab[i] for i in ids)

    def encode_with_chars(self, text: str) -> tuple[torch.Tensor, None]:
        """Token ids of ``text`` as a tensor, and None: each accounts for one character.

        Vectorised (a search among the vocabulary's code points), for texts of any length.
        """
        points = torch.frombuffer(bytearray(text.encode("utf-32-le")), dtype=torch.int32)
        at = torch.searchsorted(self.points, points).clamp_(max=len(self.vocab) - 1)
        if not torch.equal(self.points[at], points.long()):
            self.encode(text)  # says which characters are unknown
        return self.order[at], None
