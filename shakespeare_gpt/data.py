"""The corpus (tiny Shakespeare, bundled; or any text), its characters, and windows of it in batches."""

from __future__ import annotations

import functools
import gzip
import hashlib
import os
import re
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from .errors import UserError, check_whole, check_writable
from .sampling import Sampling

BUNDLED = "tinyshakespeare"  # --data.corpus of the copy shipped in the package
BUNDLED_FILE = Path(__file__).parent / "corpora" / "tinyshakespeare.txt.gz"
URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"  # its source
SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
SIZE = 1_115_394
KNOWN_SIZES = {SHA256: SIZE}  # a size mismatch is reported before hashing: "truncated" is clearer
TRAIN_FRACTION = 0.9  # first 90% train, last 10% val, as in the lecture


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def download(url: str, dest: Path, sha256: str | None = None, timeout: float = 30.0) -> None:
    """Fetch ``url`` into ``dest``, which appears only once its size and sha256 are right.

    The bytes go to a temporary file beside ``dest`` and are renamed into place after the
    check, so an interrupted or corrupted download never leaves a file a later run would trust.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as f, urllib.request.urlopen(url, timeout=timeout) as response:
            while chunk := response.read(1 << 16):
                f.write(chunk)
        got_size, size = tmp.stat().st_size, KNOWN_SIZES.get(sha256)
        if size is not None and got_size != size:
            raise UserError(f"download from {url} has {got_size} bytes, expected {size}; nothing was saved")
        got_sha = sha256_of(tmp)
        if sha256 is not None and got_sha != sha256:
            raise UserError(f"download from {url} has sha256 {got_sha}, expected {sha256}; nothing was saved")
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)


def ensure_download(
    url: str, cache_dir: str | Path, sha256: str | None = None, attempts: int = 3, backoff: float = 2.0
) -> Path:
    """The local copy of ``url`` in ``cache_dir``, downloaded (and verified, given ``sha256``) if absent.

    The file is named after the URL, so two corpora never share a copy, and a verified copy is
    used with no network. A failed connection or a timeout is retried ``attempts`` times in all,
    waiting ``backoff``, then twice as long, between tries; a download with the wrong contents is
    not retried.
    """
    name = Path(urllib.parse.urlparse(url).path).name or "corpus.txt"
    key = hashlib.blake2b(url.encode(), digest_size=4).hexdigest()
    path = Path(cache_dir) / f"{key}-{name}"
    if path.exists():
        return path
    check_writable(path.parent, "--data.cache_dir")
    created = not path.parent.exists()
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        return _download_with_retries(url, path, sha256, attempts, backoff)
    finally:
        if created and not any(path.parent.iterdir()):
            path.parent.rmdir()  # a failed first download leaves no empty folder behind


def _download_with_retries(url: str, path: Path, sha256: str | None, attempts: int, backoff: float) -> Path:
    for attempt in range(attempts):
        try:
            download(url, path, sha256)
            return path
        except (urllib.error.URLError, OSError) as e:
            permanent = isinstance(e, urllib.error.HTTPError) and e.code < 500  # 404 will not heal
            if attempt + 1 < attempts and not permanent:
                time.sleep(backoff * 2**attempt)
                continue
            reason = getattr(e, "reason", e)
            tries = f"after {attempt + 1} tries" if attempt else "at the first try"
            raise UserError(
                f"could not download {url} {tries} ({reason}); download it yourself and pass its path "
                "as --data.corpus, or use the bundled --data.corpus tinyshakespeare"
            ) from e
    raise AssertionError("unreachable")


def bundled_text() -> str:
    """Tiny Shakespeare as shipped inside the package, checked against its published sha256."""
    data = gzip.decompress(BUNDLED_FILE.read_bytes())
    if hashlib.sha256(data).hexdigest() != SHA256:
        raise UserError(f"the bundled corpus {BUNDLED_FILE} is damaged (wrong sha256): reinstall shakespeare-gpt")
    return data.decode("utf-8")


def read_corpus(corpus: str, sha256: str | None = None, cache_dir: str | Path = "data") -> str:
    """The text named by ``--data.corpus``: ``tinyshakespeare`` (bundled), a text file, or an http(s) URL.

    ``sha256``, when given, is checked against the file's bytes. An empty file or one that is not
    UTF-8 text is refused in one line that names it.
    """
    if corpus == BUNDLED:
        if sha256 is not None and sha256 != SHA256:
            raise UserError(f"--data.sha256 {sha256} is not the bundled tiny Shakespeare's ({SHA256}): drop it")
        return bundled_text()
    if corpus.startswith(("http://", "https://")):
        path = ensure_download(corpus, cache_dir, sha256)
    else:
        path = Path(corpus).expanduser()
        if not path.is_file():
            what = "is a folder" if path.is_dir() else "does not exist"
            raise UserError(
                f"--data.corpus {corpus} {what}: give a text file, an http(s) URL, or {BUNDLED} (the bundled corpus)"
            )
    try:
        data = path.read_bytes()
    except OSError as e:
        raise UserError(f"cannot read the corpus {path} ({e.strerror})") from None
    if sha256 is not None and (got := hashlib.sha256(data).hexdigest()) != sha256:
        raise UserError(
            f"the corpus {path} has sha256 {got}, not the --data.sha256 {sha256} asked for: "
            "check the file, or drop --data.sha256"
        )
    if not data:
        raise UserError(f"the corpus {path} is empty: give a file with text in it")
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise UserError(
            f"the corpus {path} is UTF-16 text, not UTF-8: convert it first, "
            f"e.g. iconv -f utf-16 -t utf-8 {path} > corpus.txt"
        )
    if b"\0" in data[: 1 << 16]:
        raise UserError(f"the corpus {path} is not a text file (it holds NUL bytes): give a UTF-8 text file")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(
            f"the corpus {path} is not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start}): "
            f"convert it first, e.g. iconv -f latin1 -t utf-8 {path} > corpus.txt"
        ) from None


def shortest_corpus(block_size: int) -> int:
    """Fewest characters whose train and val splits each hold one window of ``block_size + 1``."""
    n = block_size + 1
    while int(TRAIN_FRACTION * n) < block_size + 1 or n - int(TRAIN_FRACTION * n) < block_size + 1:
        n += 1
    return n


class CharTokenizer:
    """Maps each character of a fixed vocabulary to its index and back."""

    def __init__(self, vocab: str) -> None:
        if not vocab or len(set(vocab)) != len(vocab):
            raise UserError(f"a vocabulary must be a non-empty string of distinct characters, got {vocab!r}")
        self.vocab = vocab
        self.stoi = {ch: i for i, ch in enumerate(vocab)}

    @classmethod
    def from_text(cls, text: str) -> CharTokenizer:
        return cls("".join(sorted(set(text))))

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

    def encode_with_chars(self, text: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids of ``text``, and how many characters each accounts for: one, for characters."""
        ids = torch.tensor(self.encode(text), dtype=torch.long)
        return ids, torch.ones_like(ids)


def _batch_as_is(batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The datasets below build whole batches themselves; nothing is left to collate."""
    return batch


class TrainWindows(Dataset):
    """Every window of ``block_size + 1`` characters; item i starts at offset i.

    ``__getitems__`` gathers a whole batch with one indexing operation instead of a Python loop
    per window; ``RandomBatches`` picks the offsets.
    """

    def __init__(self, data: torch.Tensor, block_size: int) -> None:
        if len(data) < block_size + 1:
            raise UserError(f"the train split has {len(data)} tokens, fewer than block_size + 1 = {block_size + 1}")
        self.data = data
        self.offsets = torch.arange(block_size + 1, device=data.device)

    def __len__(self) -> int:
        return len(self.data) - len(self.offsets) + 1

    def __getitems__(self, indices: torch.Tensor | list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        starts = torch.as_tensor(indices)
        if self.data.is_cuda:  # from pinned memory the copy does not wait for the GPU to catch up
            starts = starts.pin_memory().to(self.data.device, non_blocking=True)
        chunk = self.data[starts[:, None] + self.offsets]  # (B, T + 1)
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

    Items are ``(x, y, chars)``: inputs, targets, and how many characters of text each target
    token accounts for (0 where not scored), so that bits per character is the same quantity for
    every tokenizer. The pass is deterministic: the same weights always give the same loss.
    """

    def __init__(self, data: torch.Tensor, block_size: int, chars: torch.Tensor | None = None) -> None:
        T, n_targets = block_size, len(data) - 1
        if n_targets < T:
            raise UserError(f"the val split has {len(data)} tokens, fewer than block_size + 1 = {T + 1}")
        stride = max(1, T // 2)
        starts = list(range(0, n_targets - T + 1, stride))
        if starts[-1] + T < n_targets:
            starts.append(n_targets - T)  # a window that ends exactly at the last token
        idx = torch.tensor(starts, device=data.device)[:, None] + torch.arange(T, device=data.device)
        self.x, self.y = data[idx], data[idx + 1].clone()
        chars = torch.ones_like(data) if chars is None else chars.to(data.device)
        self.chars = chars[idx + 1].clone()
        covered = 0  # targets at positions 1..covered are scored by an earlier window
        for row, start in enumerate(starts):
            seen = max(0, min(T, covered - start))  # this window's targets an earlier one scored
            self.y[row, :seen] = -1
            self.chars[row, :seen] = 0
            covered = start + T

    def __len__(self) -> int:
        return len(self.x)

    def __getitems__(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        i = torch.tensor(indices, device=self.x.device)
        return self.x[i], self.y[i], self.chars[i]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.x[i], self.y[i], self.chars[i]


class ShakespeareDataModule(L.LightningDataModule):
    """A corpus as tokens: random train windows, a full pass over the val split, prompts to predict.

    The first 90% of the characters train, the last 10% validate, whatever the text and the
    tokenizer: each split is encoded on its own, so every model sees the same two texts.

    Args:
        corpus: ``tinyshakespeare`` (bundled with the package: no network), the path of a UTF-8
            text file of your own, or an http(s) URL to download it from.
        sha256: checksum the corpus file must have (checked when given; the bundled corpus
            always checks its own).
        cache_dir: where a corpus given by URL is downloaded to.
        block_size: context length; the CLI links it from ``--model.block_size``.
        batch_size: training windows per step.
        val_batch_size: windows per validation batch (default: ``batch_size``).
        num_workers: DataLoader worker processes; batches are cheap, 0 is usually fastest.
        on_device: keep the encoded text on the training device (a GPU): batches are gathered
            there and never copied from the host. The whole corpus is 9 MB as int64.
        eval_train: at each validation also pass over a val-sized stretch of the train split in
            eval mode, logged as ``train_eval/loss`` (for the train-val gap of the ablation study).
        vocab: fixed characters to encode with; by default the sorted characters of the corpus.
            Predicting from a checkpoint fills this in from the checkpoint, so no corpus is needed.

    A model with a tokenizer of its own (``PretrainedLM``) encodes the text with it: the CLI sets
    ``tokenizer`` to the model's before anything is read.
    """

    def __init__(
        self,
        corpus: str = BUNDLED,
        sha256: str | None = None,
        cache_dir: str = "data",
        block_size: int = 256,
        batch_size: int = 64,
        val_batch_size: int | None = None,
        num_workers: int = 0,
        on_device: bool = False,
        eval_train: bool = False,
        vocab: str | None = None,
    ) -> None:
        super().__init__()
        for flag, value, least in [
            ("--model.block_size", block_size, 1),  # the CLI links it from the model's
            ("--data.batch_size", batch_size, 1),
            ("--data.val_batch_size", val_batch_size, 1),
            ("--data.num_workers", num_workers, 0),
        ]:
            if value is not None:
                check_whole(flag, value, least)
        if sha256 is not None and not re.fullmatch(r"[0-9a-f]{64}", sha256):
            raise UserError(f"--data.sha256 {sha256!r}: give 64 lowercase hex digits, as sha256sum prints them")
        self.save_hyperparameters(ignore=["vocab"])
        self.corpus = corpus
        self.sha256 = sha256
        self.cache_dir = cache_dir
        self.block_size = block_size
        self.batch_size = batch_size
        self.val_batch_size = val_batch_size or batch_size
        self.num_workers = num_workers
        self.on_device = on_device
        self.eval_train = eval_train
        self.sampling = Sampling()  # what ``predict`` draws; the CLI sets it from ``--sample.*``
        self._vocab = vocab
        self._text: str | None = None
        # Set by ``setup``: each split's token ids, and the characters each token accounts for.
        self.train_data: torch.Tensor | None = None
        self.train_chars: torch.Tensor | None = None
        self.val_data: torch.Tensor | None = None
        self.val_chars: torch.Tensor | None = None

    @property
    def vocab(self) -> str:
        """The characters the model is built for; reading it reads the corpus if needed."""
        if self._vocab is None:
            self._vocab = CharTokenizer.from_text(self.text).vocab
        return self._vocab

    @functools.cached_property
    def tokenizer(self):
        """Characters of ``vocab``, unless a model's own tokenizer is set here."""
        return CharTokenizer(self.vocab)

    @property
    def text(self) -> str:
        """The whole corpus, read (and checked: long enough for one window in each split) once."""
        if self._text is None:
            text = read_corpus(self.corpus, self.sha256, self.cache_dir)
            if len(text) < (need := shortest_corpus(self.block_size)):
                raise UserError(
                    f"the corpus {self.corpus} has {len(text)} characters: too short for one window of "
                    f"block_size + 1 = {self.block_size + 1} in each split (90% train, 10% val); give at least "
                    f"{need} characters, or a smaller --model.block_size"
                )
            self._text = text
        return self._text

    @functools.cached_property
    def encoded(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Each split as token ids and the characters each token accounts for, on the host; encoded once."""
        n = int(TRAIN_FRACTION * len(self.text))
        splits = {}
        for name, text in (("train", self.text[:n]), ("val", self.text[n:])):
            try:
                splits[name] = ids, _ = self.tokenizer.encode_with_chars(text)
            except UserError as e:
                raise UserError(f"the corpus {self.corpus} does not fit the checkpoint: {e}") from None
            if len(ids) < self.block_size + 1:
                raise UserError(
                    f"the corpus {self.corpus}'s {name} split is {len(ids)} tokens: too short for one window of "
                    f"block_size + 1 = {self.block_size + 1}; give a longer text, or a smaller --model.block_size"
                )
        return splits

    def setup(self, stage: str) -> None:
        if stage == "predict":
            return
        device = self.trainer.strategy.root_device if self.on_device and self.trainer is not None else "cpu"
        (self.train_data, self.train_chars), (self.val_data, self.val_chars) = (
            tuple(t.to(device) for t in self.encoded[name]) for name in ("train", "val")
        )

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
        if not self.eval_train:
            return self._eval_loader(self.val_data, self.val_chars)
        # The same full pass over a stretch of train text as long as the val split: with dropout
        # off, its loss minus the val loss is the generalisation gap.
        n = len(self.val_data)
        return [
            self._eval_loader(self.val_data, self.val_chars),
            self._eval_loader(self.train_data[:n], self.train_chars[:n]),
        ]

    def test_dataloader(self) -> DataLoader:
        # Tiny Shakespeare has no separate test split; "test" reports on the val split.
        return self._eval_loader(self.val_data, self.val_chars)

    def _eval_loader(self, data: torch.Tensor, chars: torch.Tensor) -> DataLoader:
        return DataLoader(
            ValWindows(data, self.block_size, chars),
            batch_size=self.val_batch_size,
            shuffle=False,
            collate_fn=_batch_as_is,
        )

    def predict_dataloader(self) -> DataLoader:
        """One batch: ``num_samples`` copies of the prompt, with the sampling settings."""
        return DataLoader([self.sampling.request(self.tokenizer)], batch_size=None)
