"""A character-level GPT on tiny Shakespeare, written from scratch and trained with Lightning.

The core: ``model`` (the network), ``sampling``, ``data``, ``lightning_module``, ``callbacks`` and
``cli``. Tools built on it live in ``shakespeare_gpt.tools`` and are never imported from here.
"""

from .data import CharTokenizer, ShakespeareDataModule
from .lightning_module import ShakespeareGPT
from .model import GPT, GPTConfig
from .sampling import generate

__all__ = ["GPT", "CharTokenizer", "GPTConfig", "ShakespeareDataModule", "ShakespeareGPT", "generate"]
