"""Make a small, untrained GPT-2 and a byte-level BPE tokenizer trained on a corpus, saved as a Hub download is.

    python -m shakespeare_gpt.tools.tiny_gpt2 models/tiny-gpt2

The folder then loads wherever a Hugging Face name does (``--model.pretrained models/tiny-gpt2``),
through the same ``from_pretrained`` calls: the pretrained-model path can be run, tested and
compared on a machine that cannot download GPT-2. It is *not* GPT-2: its weights are random
until fine-tuned, and its tokenizer is trained on tiny Shakespeare, not on GPT-2's web text.
Needs the ``pretrained`` extra.
"""

from __future__ import annotations

from pathlib import Path

from ..data import BUNDLED, read_corpus
from ..errors import UserError
from .checks import ToolParser, fail, whole, writable_place

EOS = "<|endoftext|>"


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
    parser = ToolParser(prog="python -m shakespeare_gpt.tools.tiny_gpt2", description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", help="where to save the model and its tokenizer")
    parser.add_argument("--corpus", default=BUNDLED, help="text to train the tokenizer on (as --data.corpus)")
    parser.add_argument("--vocab-size", type=whole("--vocab-size", 300, "a vocabulary size", 512), default=512)
    parser.add_argument("--n-layer", type=whole("--n-layer", 1, "a number of blocks", 4), default=4)
    parser.add_argument("--n-head", type=whole("--n-head", 1, "a number of heads", 4), default=4)
    parser.add_argument("--n-embd", type=whole("--n-embd", 1, "a width", 128), default=128)
    parser.add_argument("--n-positions", type=whole("--n-positions", 2, "a context length", 256), default=256)
    try:
        args = parser.parse_args(argv)
        if args.n_embd % args.n_head:
            raise UserError(f"--n-embd {args.n_embd} is not a multiple of --n-head {args.n_head}")
        writable_place("folder", args.folder, "folder")
        folder = make_tiny_gpt2(
            args.folder, args.corpus, args.vocab_size, args.n_layer, args.n_head, args.n_embd, args.n_positions
        )
    except UserError as e:
        fail(e)
    print(f"saved a tiny GPT-2 (random weights) and its tokenizer to {folder}")


if __name__ == "__main__":
    from ..cli import quiet_third_party

    quiet_third_party()
    main()
