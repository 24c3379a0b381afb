"""Any Hugging Face causal language model, fine-tuned, validated and sampled like the character model.

``PretrainedLM`` is a ``LanguageModel``: the same AdamW and schedule, the same val loss and bits
per character (see ``lightning_module.LanguageModel``), the same ``predict``. A config chooses it::

    model:
      class_path: shakespeare_gpt.pretrained.PretrainedLM
      init_args:
        pretrained: gpt2          # a Hub name, or a local folder (config.json, weights, tokenizer)

and the data encodes the text with the model's own tokenizer. Needs the ``pretrained`` extra
(``pip install "shakespeare-gpt[pretrained]"``): ``transformers`` and ``tokenizers``.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import inspect
import logging
import os
import socket
import urllib.parse
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch
from jsonargparse.typing import NonNegativeInt, PositiveInt

from .hardware import host_memory
from .lightning_module import LanguageModel, Recipe
from .sampling import sample_next
from .utils import UserError

INSTALL_HINT = 'pip install "shakespeare-gpt[pretrained]" (transformers and tokenizers)'


def transformers_module():
    """``transformers``, or a one-line ``UserError`` that says how to install it."""
    try:
        return importlib.import_module("transformers")
    except ImportError:
        raise UserError(f"pretrained models need the transformers package: {INSTALL_HINT}") from None


def shorten(text: str, limit: int = 240) -> str:
    """``text`` on one line, cut at a word boundary."""
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[:limit].rsplit(" ", 1)[0] + " ..."


@functools.cache
def hub_reachable() -> bool:
    """Whether the Hugging Face Hub answers a connection within 5 s (asked once per process)."""
    from huggingface_hub import constants

    host = urllib.parse.urlparse(constants.ENDPOINT).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=5).close()
        return True
    except OSError:
        return False


def load_options(name: str) -> dict:
    """Where ``name`` loads from, as ``from_pretrained`` options; a one-line ``UserError`` if from nowhere.

    A local folder loads as it is. A Hub name loads from the Hub, or from the local cache when the
    Hub cannot be reached; with neither, the answer is immediate, instead of a minute of retries.
    """
    if not name.strip():
        raise UserError("--model.pretrained is empty: give a Hugging Face model name (e.g. gpt2) or a local folder")
    path = Path(name).expanduser()
    if path.is_file():
        hint = f"give it as --ckpt_path {name}" if path.suffix == ".ckpt" else "give the folder that holds it"
        raise UserError(f"--model.pretrained {name} is a file, not a model folder: {hint}")
    if path.is_dir():
        if (path / "checkpoints").is_dir() or any(path.glob("version_*")):
            raise UserError(f"--model.pretrained {name} holds this project's runs: give it as --ckpt_path {name}")
        return {}
    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
    reachable = not offline and hub_reachable()
    a_path = name.startswith(("/", "./", "../", "~"))  # meant as a folder, not a Hub name
    if a_path or (not reachable and path.parent.is_dir() and str(path.parent) != "."):
        raise UserError(
            f"--model.pretrained {name}: there is no such folder here (a fine-tuned checkpoint remembers where "
            "its base model was: if the folder moved, give its new place with --model PretrainedLM --model.pretrained)"
        )
    if reachable:
        return {}
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = isinstance(try_to_load_from_cache(name, "config.json"), str)
    except Exception:  # not a valid Hub name: certainly not cached
        cached = False
    if cached:
        return {"local_files_only": True}
    raise UserError(
        f"cannot load {name!r}: it is not a folder here, and the Hugging Face Hub cannot be reached to download it; "
        f"download it where there is network (e.g. hf download {name}, into the Hugging Face cache) or give a local "
        "folder with its config.json, weights and tokenizer files, e.g. --model.pretrained path/to/folder"
    )


@contextlib.contextmanager
def loading(name: str, what: str):
    """Turns the ways a Hub name or folder fails to load into one line that says what to do."""
    try:
        yield
    except UserError:
        raise
    except ImportError as e:  # a model or tokenizer that needs another package (sentencepiece, einops, ...)
        raise UserError(f"cannot load the {what} of {name!r}: {shorten(e, 300)}") from None
    except (OSError, ValueError, KeyError) as e:
        reason = shorten(e)
        if Path(name).is_dir():
            fix = (
                f"{name} is a folder without a loadable {what} (a saved Hugging Face model has config.json, weights "
                "and tokenizer files, as save_pretrained writes them)"
            )
        else:
            fix = (
                f"there is no folder {name} here, and the Hugging Face Hub has no model of that name that could be "
                "loaded: check the name, or give a local folder with its config.json, weights and tokenizer files"
            )
        raise UserError(f"cannot load the {what} of {name!r} ({reason}): {fix}") from None


class HFTokenizer:
    """A Hugging Face tokenizer behind the interface of ``CharTokenizer``: ``encode``, ``decode``, ``len``."""

    def __init__(self, name: str, trust_remote_code: bool = False) -> None:
        transformers = transformers_module()
        where = load_options(name)
        with loading(name, "tokenizer"):
            self.tokenizer = transformers.AutoTokenizer.from_pretrained(
                name, trust_remote_code=trust_remote_code, **where
            )
        if not self.encode("To be, or not to be"):
            raise UserError(
                f"the tokenizer of {name!r} turns text into no tokens: the folder lacks its tokenizer files "
                "(tokenizer.json and tokenizer_config.json, as save_pretrained writes them)"
            )
        if not self.tokenizer.is_fast:
            raise UserError(
                f"the tokenizer of {name!r} is not a fast (Rust) tokenizer: bits per character need its "
                "character offsets"
            )
        self.name = name
        # What a cache of encoded text is keyed by: the whole tokenizer, as its tokenizer.json holds it.
        self.fingerprint = self.tokenizer.backend_tokenizer.to_str()

    def __len__(self) -> int:
        return len(self.tokenizer)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, clean_up_tokenization_spaces=False)  # the text as the tokens spell it

    def encode_with_chars(self, text: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids of ``text``, and how many characters each accounts for.

        A token accounts for the characters from the end of the previous token's span in the text
        to the end of its own (the tokenizer's offsets); a token whose span ends where an earlier
        one's did (the later bytes of a multi-byte character) accounts for none. The counts add up
        to the length of the text.
        """
        # One long text: the tokenizer's "longer than the model's maximum length" warning does not apply.
        quiet = logging.getLogger("transformers.tokenization_utils_base")
        level = quiet.level
        quiet.setLevel(logging.ERROR)
        try:
            enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
        finally:
            quiet.setLevel(level)
        ids = torch.tensor(enc["input_ids"], dtype=torch.long)
        ends = torch.tensor([end for _, end in enc["offset_mapping"]], dtype=torch.long)
        ends = torch.cummax(ends, dim=0).values if len(ends) else ends
        chars = torch.diff(ends, prepend=torch.zeros(1, dtype=torch.long))
        if len(ends) and ends[-1] < len(text):  # characters no token claims (dropped by the tokenizer): the last
            chars[-1] += len(text) - ends[-1]
        return ids, chars


def check_memory(transformers, config, name: str, trust_remote_code: bool) -> None:
    """Refuse, before any weight is read, a model whose fp32 weights alone exceed this machine's memory.

    The weights are loaded into host memory first, whatever the device; the count comes from the
    model's config, built on the meta device (no memory, no weights).
    """
    with torch.device("meta"):
        skeleton = transformers.AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    n = sum(p.numel() for p in skeleton.parameters())
    need, have = 4 * n, host_memory()
    if need > have:
        raise UserError(
            f"{name} has {f'{n / 1e9:.1f}B' if n >= 1e9 else f'{n / 1e6:.1f}M'} parameters, "
            f"{need / 2**30:.1f} GiB in fp32, more than the "
            f"{have / 2**30:.1f} GiB of memory of this machine: use a machine with more, or a smaller model"
        )


class PretrainedLM(LanguageModel):
    """A Hugging Face causal LM (GPT-2 by default), loaded by name or from a local folder.

    ``fit`` fine-tunes it on the corpus, ``validate`` reports its val loss per token and bits per
    character, and ``predict`` samples from it; a model that is only prompted (zero-shot) needs
    no ``fit``: give ``validate`` or ``predict`` no ``--ckpt_path``.

    A local folder is saved in checkpoints as an absolute path, so a fine-tuned checkpoint finds its
    base model from any working directory; ``--model PretrainedLM --model.pretrained DIR`` tells it a
    new place. ``configs/gpt2_finetune.yaml`` sets a fine-tuning recipe.

    Args:
        pretrained: a Hugging Face Hub name (``gpt2``, ``gpt2-medium``, ``tiiuae/falcon-7b``) or
            the path of a folder saved with ``save_pretrained`` (config, weights and tokenizer).
        block_size: tokens per training and validation window, at most the model's context.
        sample_tokens: tokens of sample text logged to TensorBoard at each validation (0: none).
        trust_remote_code: run Python code that comes with the model (some Hub models need it).
            Off unless you trust its authors: loading such a model runs their code.
        **recipe: the training recipe (``Recipe``'s fields), listed under ``--help``.
    """

    def __init__(
        self,
        pretrained: str = "gpt2",
        block_size: PositiveInt = 256,
        sample_tokens: NonNegativeInt = 200,
        trust_remote_code: bool = False,
        **recipe,
    ) -> None:
        super().__init__(Recipe(**recipe))
        self.save_settings(**asdict(self.recipe))
        self.hparams.pop("vocab", None)  # fit links the corpus's characters to every model; a tokenizer needs none
        transformers = transformers_module()
        self.tokenizer = HFTokenizer(pretrained, trust_remote_code)
        where = load_options(pretrained)
        if Path(pretrained).expanduser().is_dir():  # found again by a checkpoint from any working directory
            self.hparams.pretrained = str(Path(pretrained).expanduser().resolve())
        with loading(pretrained, "model"):
            config = transformers.AutoConfig.from_pretrained(pretrained, trust_remote_code=trust_remote_code, **where)
            causal = type(config) in transformers.MODEL_FOR_CAUSAL_LM_MAPPING or "AutoModelForCausalLM" in getattr(
                config, "auto_map", {}
            )
            if not causal:
                raise UserError(
                    f"{pretrained} is not a causal language model: give one that generates text (GPT-2, ...)"
                )
            self.context = getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None)
            if self.context and block_size > self.context:
                raise UserError(
                    f"--model.block_size {block_size}: {pretrained} reads at most {self.context} tokens; "
                    f"give --model.block_size {self.context} or less"
                )
            check_memory(transformers, config, pretrained, trust_remote_code)
            # fp32 weights whatever the file holds: mixed precision is the trainer's choice (bf16-mixed).
            self.model = transformers.AutoModelForCausalLM.from_pretrained(
                pretrained, config=config, dtype=torch.float32, trust_remote_code=trust_remote_code, **where
            )
        self.model.train()  # from_pretrained returns it in eval mode (dropout off); Lightning switches per stage
        # The key-value cache's name: ``cache`` from transformers 5, ``past_key_values`` before.
        self.cache_name = "cache" if "cache" in inspect.signature(self.model.forward).parameters else "past_key_values"
        n = sum(p.numel() for p in self.model.parameters())
        self.flops_per_token = 6 * n  # for throughput and MFU; attention left out

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=x, use_cache=False).logits

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        # Before Lightning loads the weights: fine-tuned weights fit only the model they started from.
        ours, theirs = self.state_dict(), checkpoint["state_dict"]
        if set(ours) != set(theirs) or any(ours[k].shape != theirs[k].shape for k in ours):
            raise UserError(
                f"the checkpoint's weights do not fit {self.hparams.pretrained}: give --model.pretrained the model "
                f"it was fine-tuned from ({checkpoint['hyper_parameters'].get('pretrained')}), or its new place"
            )

    @torch.inference_mode()
    def generate(
        self,
        idx: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float = 1.0,
        generator: torch.Generator | None = None,
        on_token: Callable[[torch.Tensor], None] | None = None,
    ) -> torch.Tensor:
        """Extend each row of ``idx`` (B, T) by ``max_new_tokens`` sampled tokens: ``sampling.generate``'s arguments.

        The same draw as the character model's (``sampling.sample_next``), with the model's own
        key-value cache. Past the model's context, each step reads the last ``context`` tokens
        again, without a cache (the character model instead moves its window a quarter block at a
        time and refills its cache).
        """
        was_training = self.model.training
        self.model.eval()
        past, context = None, self.context or float("inf")
        try:
            for _ in range(max_new_tokens):
                if idx.size(1) > context:  # no cache holds positions past the context
                    out, past = self.model(input_ids=idx[:, -context:], use_cache=False), None
                elif past is None:
                    out = self.model(input_ids=idx, use_cache=True)
                else:
                    out = self.model(input_ids=idx[:, -1:], use_cache=True, **{self.cache_name: past})
                past = getattr(out, self.cache_name)
                idx = torch.cat((idx, sample_next(out.logits[:, -1, :], temperature, top_k, top_p, generator)), dim=1)
                if on_token is not None:
                    on_token(idx)
        finally:
            self.model.train(was_training)
        return idx
