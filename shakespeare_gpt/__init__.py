"""A character-level GPT on tiny Shakespeare, written from scratch and trained with Lightning.

The core: ``model`` (the network), ``sampling``, ``tokenizer``, ``data``, ``lightning_module``,
``callbacks``, ``checkpoints`` and ``cli``. Tools built on it live in ``shakespeare_gpt.tools``
and are never imported from here.
"""

from .data import ShakespeareDataModule
from .lightning_module import ShakespeareGPT
from .model import GPT, GPTConfig
from .sampling import generate
from .tokenizer import CharTokenizer

__all__ = ["GPT", "CharTokenizer", "GPTConfig", "ShakespeareDataModule", "ShakespeareGPT", "generate"]
