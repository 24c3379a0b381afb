"""Tiny Shakespeare: download and verify, encode characters, batch windows of text."""

from __future__ import annotations

import hashlib
import os
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from .errors import UserError
from .sampling import check_sampling

URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
SIZE = 1_115_394
KNOWN_SIZES = {SHA256: SIZE}  # a size mismatch is reported before hashing: "truncated" is clearer
TRAIN_FRACTION = 0.9  # first 90% train, last 10% val, as in the lecture


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def download(url: str, dest: Path, sha256: str | None = SHA256, timeout: float = 30.0) -> None:
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


def ensure_corpus(
    data_dir: str | Path, url: str = URL, sha256: str | None = SHA256, attempts: int = 3, backoff: float = 2.0
) -> Path:
    """Return the path of a verified ``input.txt`` in ``data_dir``, downloading it if absent.

    ``sha256=None`` accepts whatever text is there (or at ``url``): a corpus of your own.
    A failed connection or a timeout is retried ``attempts`` times in all, waiting ``backoff``,
    then twice as long, between tries; a download with the wrong contents is not retried.
    """
    path = Path(data_dir) / "input.txt"
    if not path.exists():
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserError(
                f"cannot create the data folder {path.parent} ({e.strerror}): choose another --data.data_dir"
            ) from None
        if not os.access(path.parent, os.W_OK):
            raise UserError(
                f"cannot write to the data folder {path.parent}: choose a writable --data.data_dir, "
                "or put input.txt there yourself"
            )
        for attempt in range(attempts):
            try:
                download(url, path, sha256)
                break
            except (urllib.error.URLError, OSError) as e:
                permanent = isinstance(e, urllib.error.HTTPError) and e.code < 500  # 404 will not heal
                if attempt + 1 < attempts and not permanent:
                    time.sleep(backoff * 2**attempt)
                    continue
                reason = getattr(e, "reason", e)
                expected = f" (sha256 {sha256})" if sha256 else ""
                tries = f"after {attempt + 1} tries" if attempt else "at the first try"
                raise UserError(
                    f"could not download tiny Shakespeare from {url} {tries} ({reason}); "
                    f"put the file at {path}{expected} and run again"
                ) from e
    if sha256 is not None and (got_sha := sha256_of(path)) != sha256:
        raise UserError(
            f"{path} does not have the expected contents (sha256 {got_sha}, expected {sha256}): "
            "delete it to download it again, put the verified copy there, or pass --data.sha256 null for your own text"
        )
    return path


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
            raise UserError(f"the train split has {len(data)} characters, fewer than block_size + 1 = {block_size + 1}")
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


class ValWindows(Dataset):
    """Non-overlapping windows that predict every character of the split exactly once.

    The last window is aligned to the end of the split; its targets that an earlier window
    already covered are set to -1, which the loss ignores. The pass is deterministic, so the
    same weights always give the same validation loss.
    """

    def __init__(self, data: torch.Tensor, block_size: int) -> None:
        T, n_targets = block_size, len(data) - 1
        if n_targets < T:
            raise UserError(f"the val split has {len(data)} characters, fewer than block_size + 1 = {T + 1}")
        starts = list(range(0, n_targets - T + 1, T))
        covered = starts[-1] + T  # targets at positions 1..covered are predicted so far
        tail = n_targets - T  # a window starting here ends exactly at the last character
        if covered < n_targets:
            starts.append(tail)
        idx = torch.tensor(starts, device=data.device)[:, None] + torch.arange(T, device=data.device)
        self.x, self.y = data[idx], data[idx + 1].clone()
        if covered < n_targets:
            self.y[-1, : covered - tail] = -1

    def __len__(self) -> int:
        return len(self.x)

    def __getitems__(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        i = torch.tensor(indices, device=self.x.device)
        return self.x[i], self.y[i]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[i], self.y[i]


class ShakespeareDataModule(L.LightningDataModule):
    """Tiny Shakespeare as characters: random train windows, a full val pass, prompts to predict.

    Args:
        data_dir: folder of ``input.txt``; it is downloaded there (and verified) when missing.
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
        prompt: text that every predicted sample starts from.
        num_samples: how many samples ``predict`` draws.
        max_new_tokens: characters generated after the prompt.
        temperature: > 0; below 1 is more conservative, above 1 more random.
        top_k: sample among the k most likely characters only (1 is greedy); None for all.
        seed: seed of the sampling random generator, so a predict run can be repeated exactly.
        url: where to download ``input.txt`` from.
        sha256: checksum that ``input.txt`` must have; null accepts any text (a corpus of your own).
    """

    def __init__(
        self,
        data_dir: str = "data/tinyshakespeare",
        block_size: int = 256,
        batch_size: int = 64,
        val_batch_size: int | None = None,
        num_workers: int = 0,
        on_device: bool = False,
        eval_train: bool = False,
        vocab: str | None = None,
        prompt: str = "\n",
        num_samples: int = 1,
        max_new_tokens: int = 500,
        temperature: float = 1.0,
        top_k: int | None = None,
        seed: int = 1337,
        url: str = URL,
        sha256: str | None = SHA256,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["vocab"])
        self.data_dir = data_dir
        self.block_size = block_size
        self.batch_size = batch_size
        self.val_batch_size = val_batch_size or batch_size
        self.num_workers = num_workers
        self.on_device = on_device
        self.eval_train = eval_train
        self.url = url
        self.sha256 = sha256
        self._vocab = vocab
        self.train_data: torch.Tensor | None = None
        self.val_data: torch.Tensor | None = None

    @property
    def vocab(self) -> str:
        """The characters the model is built for; reading it fetches the corpus if needed."""
        if self._vocab is None:
            self._vocab = CharTokenizer.from_text(self._read_text()).vocab
        return self._vocab

    @property
    def tokenizer(self) -> CharTokenizer:
        return CharTokenizer(self.vocab)

    def _read_text(self) -> str:
        return ensure_corpus(self.data_dir, self.url, self.sha256).read_text(encoding="utf-8")

    def prepare_data(self) -> None:
        if self.trainer is not None and self.trainer.predicting:
            return  # sampling needs a vocabulary, not the corpus
        ensure_corpus(self.data_dir, self.url, self.sha256)

    def setup(self, stage: str) -> None:
        if stage == "predict" or self.train_data is not None:
            return
        text = self._read_text()
        try:
            data = torch.tensor(self.tokenizer.encode(text), dtype=torch.long)
        except UserError as e:
            raise UserError(f"{self.data_dir}/input.txt does not fit the checkpoint: {e}") from None
        if self.on_device and self.trainer is not None:
            data = data.to(self.trainer.strategy.root_device)
        n = int(TRAIN_FRACTION * len(data))
        self.train_data, self.val_data = data[:n], data[n:]

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
        return DataLoader(
            windows,
            batch_sampler=batches,
            collate_fn=_batch_as_is,
            num_workers=0 if self.on_device else self.num_workers,
            persistent_workers=self.num_workers > 0 and not self.on_device,
        )

    def val_dataloader(self) -> DataLoader | list[DataLoader]:
        if not self.eval_train:
            return self._eval_loader(self.val_data)
        # The same full pass over a stretch of train text as long as the val split: with dropout
        # off, its loss minus the val loss is the generalisation gap.
        return [self._eval_loader(self.val_data), self._eval_loader(self.train_data[: len(self.val_data)])]

    def test_dataloader(self) -> DataLoader:
        # Tiny Shakespeare has no separate test split; "test" reports on the val split.
        return self._eval_loader(self.val_data)

    def _eval_loader(self, data: torch.Tensor) -> DataLoader:
        return DataLoader(
            ValWindows(data, self.block_size),
            batch_size=self.val_batch_size,
            shuffle=False,
            collate_fn=_batch_as_is,
        )

    def predict_dataloader(self) -> DataLoader:
        """One batch: ``num_samples`` copies of the prompt and the sampling settings."""
        hp = self.hparams
        if hp.prompt == "":
            raise UserError('the prompt is empty: give at least one character, e.g. --data.prompt "ROMEO:"')
        if hp.num_samples < 1:
            raise UserError(f"num_samples must be >= 1, got {hp.num_samples}")
        check_sampling(hp.max_new_tokens, hp.temperature, hp.top_k, len(self.vocab))
        prompt = torch.tensor(self.tokenizer.encode(hp.prompt), dtype=torch.long)
        request = {
            "idx": prompt.repeat(hp.num_samples, 1),
            "max_new_tokens": hp.max_new_tokens,
            "temperature": hp.temperature,
            "top_k": hp.top_k,
            "seed": hp.seed,
        }
        return DataLoader([request], batch_size=None)
