"""Make a small, untrained GPT-2 and a byte-level BPE tokenizer trained on a corpus, saved as a Hub download is.

    python -m shakespeare_gpt.tools.tiny_gpt2 models/tiny-gpt2

The folder then loads wherever a Hugging Face name does (``--model.pretrained models/tiny-gpt2``),
through the same ``from_pretrained`` calls: the pretrained-model path can be run, tested and
compared on a machine that cannot download GPT-2. It is *not* GPT-2: its weights are random
until fine-tuned, and its tokenizer is trained on tiny Shakespeare, not on GPT-2's web text.
Needs the ``pretrained`` extra.
"""

from __future__ import annotations

import sys
from pathlib import Path

from jsonargparse import ArgumentError, ArgumentParser
from jsonargparse.typing import PositiveInt, restricted_number_type

from ..data import BUNDLED, read_corpus
from ..utils import UserError, check_writable, exit_with, quiet_third_party
from . import WindowLength

PROG = "python -m shakespeare_gpt.tools.tiny_gpt2"
EOS = "<|endoftext|>"
VocabSize = restricted_number_type("VocabSize", int, (">=", 300))  # 256 bytes, the EOS token and some merges


def make_tiny_gpt2(
    folder: str | Path,
    corpus: str = BUNDLED,
    vocab_size: int = 512,
    n_layer: int = 4,
    n_head: int = 4,
    n_embd: int = 128,
    n_positions: int = 256,
    seed: int = 0,
) -> Path:
    """Train the tokenizer on ``corpus``, build the model from a config, and ``save_pretrained`` both to ``folder``."""
    from ..pretrained import transformers_module

    transformers = transformers_module()
    import torch
    from tokenizers import ByteLevelBPETokenizer

    text = read_corpus(corpus)
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator([text], vocab_size=vocab_size, min_frequency=2, special_tokens=[EOS], show_progress=False)
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=bpe, bos_token=EOS, eos_token=EOS, unk_token=EOS, model_max_length=n_positions
    )
    torch.manual_seed(seed)
    config = transformers.GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=n_positions,
        n_embd=n_embd,
        n_layer=n_layer,
        n_head=n_head,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    model = transformers.GPT2LMHeadModel(config)
    folder = Path(folder)
    transformers.utils.logging.disable_progress_bar()  # "Writing model shards" for one small file
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def main(argv: list[str] | None = None) -> None:
    parser = ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0], exit_on_error=False)
    parser.add_argument("folder", help="where to save the model and its tokenizer")
    parser.add_argument("--corpus", default=BUNDLED, help="text to train the tokenizer on (as --data.corpus)")
    parser.add_argument("--vocab-size", type=VocabSize, default=512, help="tokens of the BPE vocabulary")
    parser.add_argument("--n-layer", type=PositiveInt, default=4, help="transformer blocks")
    parser.add_argument("--n-head", type=PositiveInt, default=4, help="attention heads")
    parser.add_argument("--n-embd", type=PositiveInt, default=128, help="width, a multiple of --n-head")
    parser.add_argument("--n-positions", type=WindowLength, default=256, help="context length in tokens")
    try:
        args = parser.parse_args(sys.argv[1:] if argv is None else argv)
        if args.n_embd % args.n_head:
            raise UserError(f"--n-embd {args.n_embd} is not a multiple of --n-head {args.n_head}")
        check_writable(Path(args.folder), "folder")
        folder = make_tiny_gpt2(
            args.folder, args.corpus, args.vocab_size, args.n_layer, args.n_head, args.n_embd, args.n_positions
        )
    except ArgumentError as e:
        exit_with(f"{e}; see {PROG} --help")
    except UserError as e:
        exit_with(e)
    print(f"saved a tiny GPT-2 (random weights) and its tokenizer to {folder}")


if __name__ == "__main__":
    quiet_third_party()
    main()
