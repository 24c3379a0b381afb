"""A character-level GPT on tiny Shakespeare, written from scratch and trained with Lightning."""

from .data import CharTokenizer, ShakespeareDataModule
from .lit import ShakespeareGPT
from .model import GPT, GPTConfig
from .sampling import generate

__all__ = ["GPT", "CharTokenizer", "GPTConfig", "ShakespeareDataModule", "ShakespeareGPT", "generate"]
