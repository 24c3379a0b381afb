"""The corpus (tiny Shakespeare, bundled; or any text), and windows of its tokens in batches.

The text is encoded by the tokenizer of the model being trained or scored (the model owns it:
see ``tokenizer.py``); what the data decides is the corpus, its split, and which windows go in
which batch.
"""

from __future__ import annotations

import codecs
import contextlib
import dataclasses
import functools
import gzip
import hashlib
from collections.abc import Callable, Iterator
from pathlib import Path

import lightning as L
import torch
import urllib3
from jsonargparse.typing import NonNegativeInt, PositiveInt, restricted_string_type
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader, Dataset, Sampler

from .utils import Text, UserError, atomic_open, check_writable

BUNDLED = "tinyshakespeare"  # --data.corpus of the copy shipped in the package
BUNDLED_FILE = Path(__file__).parent / "corpora" / "tinyshakespeare.txt.gz"
# Its source: https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt
SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
KNOWN_SIZES = {SHA256: 1_115_394}  # a size mismatch is reported before hashing: "truncated" is clearer
TRAIN_FRACTION = 0.9  # first 90% train, last 10% val, as in the lecture
CHUNK = 1 << 20  # bytes of a corpus file read, checked and encoded at a time
# A text of more characters is encoded into the cache folder and memory-mapped, never whole in
# memory; a shorter one (tiny Shakespeare, say) is encoded in memory.
IN_MEMORY = 1 << 24
Sha256 = restricted_string_type("Sha256", r"^[0-9a-f]{64}$")  # as sha256sum prints it
# A failed connection or a server error (5xx) is tried 3 times in all; a 404 or a wrong file is not.
RETRIES = urllib3.Retry(total=2, backoff_factor=2.0, status_forcelist=(500, 502, 503, 504), raise_on_status=False)


def download(url: str, dest: Path, sha256: str | None = None, retries: urllib3.Retry = RETRIES) -> None:
    """Fetch ``url`` into ``dest``, which appears only once complete and, given ``sha256``, verified."""
    response = None
    try:
        response = urllib3.request("GET", url, preload_content=False, retries=retries, timeout=30.0)
        if response.status != 200:
            raise urllib3.exceptions.HTTPError(f"HTTP status {response.status}")
        digest = hashlib.sha256()
        with atomic_open(dest, "wb") as f:
            for chunk in response.stream(1 << 16):
                digest.update(chunk)
                f.write(chunk)
            got_size, size = f.tell(), KNOWN_SIZES.get(sha256)
            if size is not None and got_size != size:
                raise UserError(f"download from {url} has {got_size} bytes, expected {size}; nothing was saved")
            if sha256 is not None and digest.hexdigest() != sha256:
                raise UserError(
                    f"download from {url} has sha256 {digest.hexdigest()}, expected {sha256}; nothing saved"
                )
    except urllib3.exceptions.HTTPError as e:
        raise UserError(
            f"could not download {url} ({getattr(e, 'reason', None) or e}); download it yourself and pass its path "
            "as --data.corpus, or use the bundled --data.corpus tinyshakespeare"
        ) from None
    finally:
        if response is not None:
            response.release_conn()


def cached_download(url: str, cache_dir: str | Path, sha256: str | None = None, **kwargs) -> Path:
    """The local copy of ``url`` in ``cache_dir``, downloaded (and verified) if absent; named after the URL."""
    name = Path(urllib3.util.parse_url(url).path or "").name or "corpus.txt"
    path = Path(cache_dir) / f"{hashlib.blake2b(url.encode(), digest_size=4).hexdigest()}-{name}"
    if not path.exists():
        check_writable(path.parent, "--data.cache_dir")
        created = not path.parent.exists()
        try:
            download(url, path, sha256, **kwargs)
        finally:
            if created and path.parent.exists() and not any(path.parent.iterdir()):
                path.parent.rmdir()  # a failed first download leaves no empty folder behind
    return path


def corpus_file(corpus: str, cache_dir: str | Path = "data") -> Path:
    """The file named by ``--data.corpus``: the bundled corpus (gzip), a text file, or the local copy of a URL."""
    if corpus == BUNDLED:
        return BUNDLED_FILE
    if corpus.startswith(("http://", "https://")):
        return cached_download(corpus, cache_dir)
    path = Path(corpus).expanduser()
    if not path.is_file():
        what = "is a folder" if path.is_dir() else "does not exist"
        raise UserError(
            f"--data.corpus {corpus} {what}: give a text file, an http(s) URL, or {BUNDLED} (the bundled corpus)"
        )
    return path


def text_chunks(path: Path, digest=None) -> Iterator[str]:
    """The text of the corpus file ``path``, ``CHUNK`` bytes at a time (``digest`` sees the bytes).

    A file that is empty, UTF-16, holds NUL bytes or is not UTF-8 is refused in one line that names it.
    """
    decoder, offset = codecs.getincrementaldecoder("utf-8")(), 0
    try:
        f = gzip.open(path) if path == BUNDLED_FILE else open(path, "rb")  # noqa: SIM115 (closed below)
        with f:
            while True:
                block = f.read(CHUNK)
                if offset == 0 and block.startswith((b"\xff\xfe", b"\xfe\xff")):
                    raise UserError(
                        f"the corpus {path} is UTF-16 text, not UTF-8: convert it first, "
                        f"e.g. iconv -f utf-16 -t utf-8 {path} > corpus.txt"
                    )
                if b"\0" in block:
                    raise UserError(
                        f"the corpus {path} is not a text file (it holds NUL bytes): give a UTF-8 text file"
                    )
                if digest is not None:
                    digest.update(block)
                try:
                    text = decoder.decode(block, final=not block)  # an empty block: the end of the file
                except UnicodeDecodeError as e:
                    at = offset + e.start - (len(e.object) - len(block))  # e.object: the bytes held back, then block
                    raise UserError(
                        f"the corpus {path} is not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset {at}): "
                        f"convert it first, e.g. iconv -f latin1 -t utf-8 {path} > corpus.txt"
                    ) from None
                if not block:
                    break
                offset += len(block)
                yield text
    except OSError as e:
        raise UserError(f"cannot read the corpus {path} ({e.strerror or e})") from None
    if offset == 0:
        raise UserError(f"the corpus {path} is empty: give a file with text in it")


@dataclasses.dataclass
class Scan:
    """What one pass over a corpus file tells: its length in characters, its characters, its sha256."""

    chars: int
    vocab: str
    sha256: str


def scan(corpus: str, sha256: str | None = None, cache_dir: str | Path = "data") -> Scan:
    """Read ``--data.corpus`` once, in chunks, and check it (``sha256``, when given, against its bytes)."""
    if corpus == BUNDLED and sha256 is not None and sha256 != SHA256:
        raise UserError(f"--data.sha256 {sha256} is not the bundled tiny Shakespeare's ({SHA256}): drop it")
    path, digest, n, seen = corpus_file(corpus, cache_dir), hashlib.sha256(), 0, set()
    for text in text_chunks(path, digest):
        n += len(text)
        seen.update(text)
    got = digest.hexdigest()
    if corpus == BUNDLED and got != SHA256:
        raise UserError(f"the bundled corpus {BUNDLED_FILE} is damaged (wrong sha256): reinstall shakespeare-gpt")
    if sha256 is not None and got != sha256:
        raise UserError(
            f"the corpus {path} has sha256 {got}, not the --data.sha256 {sha256} asked for: "
            "check the file, or drop --data.sha256"
        )
    return Scan(n, "".join(sorted(seen)), got)


def read_corpus(corpus: str, sha256: str | None = None, cache_dir: str | Path = "data") -> str:
    """The whole text named by ``--data.corpus`` (``tinyshakespeare``, a text file or an http(s) URL), checked."""
    scan(corpus, sha256, cache_dir)
    return "".join(text_chunks(corpus_file(corpus, cache_dir)))


def chars_between(path: Path, start: int, end: int) -> Iterator[str]:
    """Characters ``start`` to ``end`` of the corpus file ``path``, a chunk at a time."""
    at = 0
    for text in text_chunks(path):
        if at + len(text) > start and at < end:
            yield text[max(0, start - at) : end - at]
        at += len(text)


def encode(pieces: Iterator[str], tokenizer, cache: Path | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The token ids of the text in ``pieces``, in the smallest integer type that holds the vocabulary, and
    the characters each accounts for (None: one each, as for characters).

    Without ``cache``, the text is encoded whole, in memory. With it, a piece at a time into the
    file ``cache`` (the counts into ``<cache>.chars``), which is then memory-mapped: the text is
    never whole in memory, nor are its ids (a tokenizer of several characters a token may then
    cut a token differently where pieces meet). A cache already there is used as it is.
    """
    dtype = next(t for t in (torch.uint8, torch.uint16, torch.int32) if len(tokenizer) <= torch.iinfo(t).max + 1)
    if cache is None:
        ids, chars = tokenizer.encode_with_chars("".join(pieces))
        return ids.to(dtype), None if chars is None else chars.to(torch.int32)
    counts = cache.with_name(cache.name + ".chars")
    if not cache.exists():
        with contextlib.ExitStack() as stack:  # on leaving: the counts' file renamed into place, then the ids'
            files = []
            for text in pieces:
                ids, chars = tokenizer.encode_with_chars(text)
                if not files:  # the tokenizer's first answer says whether there are counts to keep
                    files = [stack.enter_context(atomic_open(p, "wb")) for p in (cache, counts)[: 2 - (chars is None)]]
                files[0].write(ids.to(dtype).numpy().tobytes())
                if chars is not None:
                    files[1].write(chars.to(torch.int32).numpy().tobytes())
    return memory_mapped(cache, dtype), memory_mapped(counts, torch.int32) if counts.exists() else None


def memory_mapped(path: Path, dtype: torch.dtype) -> torch.Tensor:
    """The array of ``dtype`` in the file ``path``, memory-mapped: read from disk as it is used."""
    return torch.from_file(str(path), shared=False, size=path.stat().st_size // dtype.itemsize, dtype=dtype)


def corpus_memory(corpus: str, on_device: bool) -> int:
    """A lower bound on the bytes the encoded corpus ``--data.corpus`` takes in memory, before it is read: on
    the training device (``--data.on_device``) all of it, else up to ``IN_MEMORY`` (a longer one is memory-mapped)."""
    path = Path(corpus).expanduser()
    size = KNOWN_SIZES[SHA256] if corpus == BUNDLED else path.stat().st_size if path.is_file() else 0
    return size if on_device else min(size, IN_MEMORY)  # at least a byte a token


def shortest_corpus(block_size: int) -> int:
    """Fewest characters whose train and val splits each hold one window of ``block_size + 1``."""
    n = block_size + 1
    while int(TRAIN_FRACTION * n) < block_size + 1 or n - int(TRAIN_FRACTION * n) < block_size + 1:
        n += 1
    return n


def _batch_as_is(batch):
    """The datasets below build whole batches themselves; nothing is left to collate."""
    return batch


class TrainWindows(Dataset):
    """Every window of ``block_size + 1`` characters; item i starts at offset i.

    ``__getitems__`` gathers a whole batch with one indexing operation instead of a Python loop
    per window; ``RandomBatches`` picks the offsets.
    """

    def __init__(self, data: torch.Tensor, block_size: int) -> None:
        self.data = data
        self.offsets = torch.arange(block_size + 1, device=data.device)

    def __len__(self) -> int:
        return len(self.data) - len(self.offsets) + 1

    def __getitems__(self, indices: torch.Tensor | list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        starts = torch.as_tensor(indices)
        if self.data.is_cuda:  # from pinned memory the copy does not wait for the GPU to catch up
            starts = starts.pin_memory().to(self.data.device, non_blocking=True)
        chunk = self.data[starts[:, None] + self.offsets].long()  # (B, T + 1)
        return chunk[:, :-1], chunk[:, 1:]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.__getitems__([i])
        return x[0], y[0]


class RandomBatches(Sampler[torch.Tensor]):
    """Batches of random window offsets, drawn with replacement; batch k depends only on (seed, rank, k).

    Counting starts at ``start()``, the trainer's step when an epoch's iterator is made. A run
    resumed at step k therefore draws exactly the batches a run that never stopped would have
    drawn, and each rank of a multi-process run draws its own.

    Args:
        n_offsets: number of windows to choose from.
        batch_size: windows per batch.
        seed: the run's seed.
        rank: this process's rank.
        start: returns the step of the first batch of a new iterator.
    """

    def __init__(self, n_offsets: int, batch_size: int, seed: int, rank: int, start: Callable[[], int]) -> None:
        self.n_offsets, self.batch_size, self.seed, self.rank, self.start = n_offsets, batch_size, seed, rank, start

    def __len__(self) -> int:
        return max(1, self.n_offsets // self.batch_size)  # an "epoch": about one pass over the text

    def __iter__(self) -> Iterator[torch.Tensor]:
        first = self.start()
        for k in range(first, first + len(self)):
            key = hashlib.blake2b(f"{self.seed}/{self.rank}/{k}".encode(), digest_size=8).digest()
            g = torch.Generator().manual_seed(int.from_bytes(key, "little") >> 1)
            yield torch.randint(self.n_offsets, (self.batch_size,), generator=g)


class StepKeyedLoader(DataLoader):
    """The train loader: its batches follow from the trainer's step (``RandomBatches``).

    A resumed run therefore continues exactly without any loader state; ``state_dict`` says so
    to Lightning, which otherwise warns that a run resumed mid-"epoch" is not reproducible.
    """

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state_dict: dict) -> None:
        pass


class ValWindows(Dataset):
    """Strided windows that score every token of a split exactly once, from at least half a window of context.

    Windows of ``block_size`` targets start every ``block_size // 2`` tokens, the last one aligned
    to the end of the split. The first window scores all its targets; each later window scores
    only the targets no earlier window scored, the second half of it, so each of them is
    predicted from at least ``block_size - block_size // 2`` tokens of context (the Hugging Face
    perplexity guide's sliding window). Targets not scored are -1, which the loss ignores.
    The split's first token is never a target: nothing precedes it.

    With ``max_targets``, a split that has more targets keeps only evenly spread windows, each
    scoring what it scores in the full pass, up to about ``max_targets`` in all: the same
    quantity, estimated in bounded time. Windows are cut from the split as they are asked for.

    Items are ``(x, y, chars)``: inputs, targets, and how many characters of text each target
    token accounts for (0 where not scored), so that bits per character is the same quantity for
    every tokenizer. The pass is deterministic: the same weights always give the same loss.
    """

    def __init__(
        self, data: torch.Tensor, block_size: int, chars: torch.Tensor | None = None, max_targets: int | None = None
    ) -> None:
        T, n_targets = block_size, len(data) - 1
        if n_targets < T:
            raise UserError(f"the val split has {len(data)} tokens, fewer than block_size + 1 = {T + 1}")
        stride = max(1, T // 2)
        regular = (n_targets - T) // stride + 1  # windows at 0, stride, 2 * stride, ...
        total = regular + ((regular - 1) * stride + T < n_targets)  # and one that ends at the last token
        rows = torch.arange(total)  # the windows kept: all, or evenly spread ones (only these are built)
        if max_targets is not None and n_targets > max_targets:
            rows = torch.linspace(0, total - 1, -(-max_targets // stride)).round().long().unique()  # stride each
        starts = torch.where(rows < regular, rows * stride, n_targets - T)
        # How many of each window's first targets an earlier window scored: none for the first,
        # the overlap with the window before it for the others.
        before = torch.where(rows < regular, rows - 1, regular - 1) * stride
        seen = torch.where(rows == 0, 0, before + T - starts).clamp(0, T)
        self.targets = int((T - seen).sum())  # scored by this pass
        self.data, self.chars = data, chars
        self.starts, self.seen = starts.to(data.device), seen.to(data.device)
        self.offsets = torch.arange(T + 1, device=data.device)

    def __len__(self) -> int:
        return len(self.starts)

    def __getitems__(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        i = torch.as_tensor(indices, device=self.starts.device)
        at = self.starts[i, None] + self.offsets  # (B, T + 1) positions in the split
        window = self.data[at].long()
        scored = self.offsets[1:] > self.seen[i, None]  # target t is scored unless an earlier window did it
        chars = torch.ones_like(window[:, 1:]) if self.chars is None else self.chars[at[:, 1:]].long()
        return window[:, :-1], window[:, 1:].masked_fill(~scored, -1), chars.masked_fill(~scored, 0)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return tuple(t[0] for t in self.__getitems__([i]))


class ShakespeareDataModule(L.LightningDataModule):
    """A corpus as tokens: random train windows, a deterministic pass over the val split, prompts to predict.

    The first 90% of the characters train, the last 10% validate, whatever the text and the
    tokenizer: each split is encoded on its own, so every model sees the same two texts.

    Args:
        corpus: ``tinyshakespeare`` (bundled with the package: no network), the path of a UTF-8
            text file of your own, or an http(s) URL to download it from.
        sha256: checksum the corpus file must have (checked when given; the bundled corpus
            always checks its own).
        cache_dir: where a corpus given by URL is downloaded to, and a corpus of more than 16 M
            characters is encoded to (a byte or two per character, once per tokenizer).
        block_size: context length; the CLI links it from ``--model.block_size``.
        batch_size: training windows per step.
        val_batch_size: windows per validation batch (default: ``batch_size``).
        num_workers: DataLoader worker processes; batches are cheap, 0 is usually fastest.
        on_device: keep the encoded text on the training device (a GPU): batches are gathered
            there and never copied from the host. Tiny Shakespeare is 1.1 MB there (a byte a token).
        eval_train: at each validation also pass over a val-sized stretch of the train split in
            eval mode, logged as ``train_eval/loss`` (for the train-val gap of the ablation study).
        val_tokens: score at most about this many val tokens at each validation, in evenly spread
            windows, the same ones every time (null: every token). Tiny Shakespeare's val split
            (111,539 tokens for the character model) is always scored whole.
    """

    def __init__(
        self,
        corpus: Text = BUNDLED,
        sha256: Sha256 | None = None,
        cache_dir: str = "data",
        block_size: PositiveInt = 256,
        batch_size: PositiveInt = 64,
        val_batch_size: PositiveInt | None = None,
        num_workers: NonNegativeInt = 0,
        on_device: bool = False,
        eval_train: bool = False,
        val_tokens: PositiveInt | None = 2**18,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.corpus, self.sha256, self.cache_dir = corpus, sha256, cache_dir
        self.block_size, self.batch_size = block_size, batch_size
        self.val_batch_size = val_batch_size or batch_size
        self.num_workers, self.on_device, self.eval_train = num_workers, on_device, eval_train
        self.val_tokens = val_tokens
        self.sampling = None  # what ``predict`` draws (a ``sampling.Sampling``); the CLI sets it from --sample.*
        # Set by ``setup``: each split's token ids, and the characters each token accounts for.
        self.train_data = self.train_chars = self.val_data = self.val_chars = None

    @functools.cached_property
    def scan(self) -> Scan:
        """The corpus read once (and checked: long enough for one window in each split)."""
        found = scan(self.corpus, self.sha256, self.cache_dir)
        if found.chars < (need := shortest_corpus(self.block_size)):
            raise UserError(
                f"the corpus {self.corpus} has {found.chars} characters: too short for one window of "
                f"block_size + 1 = {self.block_size + 1} in each split (90% train, 10% val); give at least "
                f"{need} characters, or a smaller --model.block_size"
            )
        return found

    @property
    def vocab(self) -> str:
        """The corpus's characters, sorted: the vocabulary of a character model trained on it."""
        return self.scan.vocab

    def setup(self, stage: str, tokenizer=None) -> None:
        """Encode both splits with ``tokenizer``, by default the tokenizer of the model being run.

        A corpus longer than ``IN_MEMORY`` characters is encoded a chunk at a time into ``cache_dir``,
        once for each tokenizer, and memory-mapped from there.
        """
        if stage == "predict":
            return
        if tokenizer is None:
            tokenizer = self.trainer.lightning_module.tokenizer
        path, n = corpus_file(self.corpus, self.cache_dir), self.scan.chars
        key = hashlib.blake2b(f"{self.scan.sha256}/{tokenizer.fingerprint}".encode(), digest_size=6).hexdigest()
        device = self.trainer.strategy.root_device if self.on_device and self.trainer is not None else "cpu"
        split = int(TRAIN_FRACTION * n)
        for name, start, end in (("train", 0, split), ("val", split, n)):
            cache = None if n <= IN_MEMORY else Path(self.cache_dir) / f"{path.name}.{key}.{name}"
            if cache is not None:
                check_writable(cache.parent, "--data.cache_dir")
            try:
                ids, chars = encode(chars_between(path, start, end), tokenizer, cache)
            except UserError as e:
                raise UserError(f"the corpus {self.corpus} does not fit the model: {e}") from None
            except OSError as e:
                raise UserError(
                    f"cannot write the encoded corpus in {cache.parent} ({e.strerror}): free some space there, "
                    "or give another --data.cache_dir"
                ) from None
            if len(ids) < self.block_size + 1:
                raise UserError(
                    f"the corpus {self.corpus}'s {name} split is {len(ids)} tokens: too short for one window of "
                    f"block_size + 1 = {self.block_size + 1}; give a longer text, or a smaller --model.block_size"
                )
            setattr(self, f"{name}_data", ids.to(device))
            setattr(self, f"{name}_chars", None if chars is None else chars.to(device))

    def train_dataloader(self) -> DataLoader:
        windows = TrainWindows(self.train_data, self.block_size)
        trainer = self.trainer
        batches = RandomBatches(
            len(windows),
            self.batch_size,
            seed=torch.initial_seed(),  # the run's seed: the CLI's seed_everything sets it
            rank=trainer.global_rank if trainer else 0,
            start=lambda: trainer.global_step if trainer else 0,
        )
        return StepKeyedLoader(
            windows,
            batch_sampler=batches,
            collate_fn=_batch_as_is,
            num_workers=0 if self.on_device else self.num_workers,
            persistent_workers=self.num_workers > 0 and not self.on_device,
        )

    def val_dataloader(self) -> DataLoader | list[DataLoader]:
        val = self._eval_loader(self.val_data, self.val_chars)
        if (windows := val.dataset).targets < len(self.val_data) - 1:
            rank_zero_info(
                f"validation: {windows.targets:,} of the val split's {len(self.val_data) - 1:,} tokens, in "
                f"{len(windows):,} evenly spread windows (--data.val_tokens null: all of them)"
            )
        if not self.eval_train:
            return val
        # The same pass over a stretch of train text as long as the val split: with dropout off,
        # its loss minus the val loss is the generalisation gap.
        n = len(self.val_data)
        return [val, self._eval_loader(self.train_data[:n], None if self.train_chars is None else self.train_chars[:n])]

    def test_dataloader(self) -> DataLoader:
        # Tiny Shakespeare has no separate test split; "test" reports on the val split.
        return self._eval_loader(self.val_data, self.val_chars)

    def _eval_loader(self, data: torch.Tensor, chars: torch.Tensor | None) -> DataLoader:
        windows = ValWindows(data, self.block_size, chars, self.val_tokens)
        return DataLoader(windows, batch_size=self.val_batch_size, shuffle=False, collate_fn=_batch_as_is)

    def predict_dataloader(self) -> DataLoader:
        """The sampling settings, one item a batch of up to ``batch_size`` samples, which the model's ``predict_step``
        turns into samples (None: the model's defaults)."""
        s = self.sampling
        if s is None:
            return DataLoader([None], batch_size=None, collate_fn=_batch_as_is)
        sizes = [min(s.batch_size, s.num_samples - i) for i in range(0, s.num_samples, s.batch_size)]
        return DataLoader(
            [dataclasses.replace(s, num_samples=n) for n in sizes], batch_size=None, collate_fn=_batch_as_is
        )
