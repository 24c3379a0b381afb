import gzip
import hashlib
from pathlib import Path

import pytest
import torch

from shakespeare_gpt import data
from shakespeare_gpt.data import (
    RETRIES,
    SHA256,
    ShakespeareDataModule,
    TrainWindows,
    ValWindows,
    cached_download,
    download,
    read_corpus,
    shortest_corpus,
)
from shakespeare_gpt.sampling import Sampling
from shakespeare_gpt.tokenizer import CharTokenizer
from shakespeare_gpt.utils import UserError

from ..conftest import TINY_TEXT

NO_WAIT = RETRIES.new(backoff_factor=0)  # the same retries, without the waits between them


def sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def test_download_from_loopback_server(serve, tmp_path):
    payload = TINY_TEXT.encode()
    dest = tmp_path / "d" / "input.txt"
    download(serve(payload), dest, sha(payload))
    assert dest.read_bytes() == payload
    assert list(dest.parent.iterdir()) == [dest]  # no temporary file left


def test_download_checksum_mismatch_leaves_nothing(serve, tmp_path):
    dest = tmp_path / "input.txt"
    with pytest.raises(UserError, match="sha256"):
        download(serve(b"not shakespeare"), dest, sha(b"something else"))
    assert list(tmp_path.iterdir()) == []


def test_download_of_truncated_canonical_file_is_rejected(serve, tmp_path):
    # The real corpus's checksum has a known size: a short download fails on size, before hashing.
    with pytest.raises(UserError, match="bytes, expected 1115394"):
        download(serve(b"First Citizen:"), tmp_path / "input.txt", SHA256)
    assert list(tmp_path.iterdir()) == []


def test_url_corpus_downloads_once_then_is_used_offline(serve, closed_port_url, tmp_path):
    payload = TINY_TEXT.encode()
    url = serve(payload)
    assert read_corpus(url, sha(payload), tmp_path) == TINY_TEXT
    (path,) = tmp_path.iterdir()
    assert path.name.endswith("-input.txt") and path.read_bytes() == payload
    # The verified copy is used without any network: the server is gone for this URL's next use.
    assert cached_download(url, tmp_path) == path


def test_no_network_says_what_to_do(closed_port_url, tmp_path):
    with pytest.raises(UserError, match=r"could not download .* pass its path as --data.corpus, or use the bundled"):
        cached_download(closed_port_url, tmp_path, retries=NO_WAIT)
    assert list(tmp_path.iterdir()) == []


def test_missing_file_on_the_server_is_not_retried(serve, tmp_path):
    url = serve(TINY_TEXT.encode(), fail_first=1, status=404)  # a second try would get the file
    with pytest.raises(UserError, match="HTTP status 404"):
        cached_download(url, tmp_path, retries=NO_WAIT)


def test_transient_failures_are_retried(serve, tmp_path):
    payload = TINY_TEXT.encode()
    url = serve(payload, fail_first=2)  # two 503 answers, then the file
    path = cached_download(url, tmp_path, sha(payload), retries=NO_WAIT)
    assert path.read_bytes() == payload


def test_download_folder_that_cannot_be_created_is_named_and_nothing_is_left(tmp_path, closed_port_url):
    (tmp_path / "a_file").write_text("not a folder")
    with pytest.raises(UserError, match=r"--data.cache_dir .*a_file/data: .*a_file is a file, not a folder"):
        cached_download(closed_port_url, tmp_path / "a_file" / "data")
    with pytest.raises(UserError, match="could not download"):
        cached_download(closed_port_url, tmp_path / "new" / "cache", retries=NO_WAIT)
    assert not (tmp_path / "new" / "cache").exists()  # the failed first download leaves no empty folder


def test_bundled_corpus_is_tiny_shakespeare_verified():
    text = read_corpus("tinyshakespeare")
    assert len(text) == 1_115_394 and text.startswith("First Citizen:")
    assert hashlib.sha256(text.encode()).hexdigest() == SHA256


def test_damaged_bundled_corpus_is_refused(tmp_path, monkeypatch):
    damaged = tmp_path / "tinyshakespeare.txt.gz"
    damaged.write_bytes(gzip.compress(b"First Citizen: tampered"))
    monkeypatch.setattr(data, "BUNDLED_FILE", damaged)
    with pytest.raises(UserError, match="bundled corpus .* is damaged .* reinstall"):
        read_corpus("tinyshakespeare")


def test_own_text_file_with_wrong_checksum_is_refused(tmp_path):
    (tmp_path / "mine.txt").write_text("tampered")
    with pytest.raises(UserError, match=r"mine.txt has sha256 .*, not the --data.sha256"):
        read_corpus(str(tmp_path / "mine.txt"), sha(b"something else"))
    assert (tmp_path / "mine.txt").read_text() == "tampered"  # the user's file is left alone


@pytest.mark.parametrize(
    "content,message",
    [
        (b"", r"the corpus .*bad.txt is empty"),
        (b"caf\xe9 latin-1", r"the corpus .*bad.txt is not UTF-8 text \(byte 0xe9 at offset 3\): convert it"),
    ],
)
def test_empty_or_non_utf8_corpus_is_named(tmp_path, content, message):
    (tmp_path / "bad.txt").write_bytes(content)
    with pytest.raises(UserError, match=message):
        read_corpus(str(tmp_path / "bad.txt"))


def test_missing_corpus_file_or_a_folder_is_named(tmp_path):
    with pytest.raises(UserError, match=r"--data.corpus .*nope.txt does not exist: give a text file, an http"):
        read_corpus(str(tmp_path / "nope.txt"))
    with pytest.raises(UserError, match=r"--data.corpus .* is a folder"):
        read_corpus(str(tmp_path))


def test_corpus_too_short_for_one_window_names_the_file_and_the_minimum(tmp_path):
    (tmp_path / "short.txt").write_text("x" * 100)
    dm = ShakespeareDataModule(corpus=str(tmp_path / "short.txt"), block_size=16)
    with pytest.raises(UserError, match=rf"{tmp_path}/short.txt has 100 characters: .* at least {shortest_corpus(16)}"):
        dm.vocab  # noqa: B018 (reading it reads the corpus)
    n = shortest_corpus(16)
    dm = ShakespeareDataModule(corpus=str(tmp_path / "enough.txt"), block_size=16)
    (tmp_path / "enough.txt").write_text("ab" * n)
    dm.setup("fit", CharTokenizer(dm.vocab))
    assert len(dm.train_data) >= 17 and len(dm.val_data) >= 17  # each split holds one window


def make_datamodule(corpus_dir: Path, **kwargs) -> ShakespeareDataModule:
    dm = ShakespeareDataModule(corpus=str(corpus_dir / "input.txt"), **kwargs)
    dm.setup("fit", CharTokenizer(dm.vocab))  # without a trainer: the tokenizer a model would hand it
    return dm


def test_split_sizes_and_vocab(corpus_dir):
    dm = make_datamodule(corpus_dir, block_size=8, batch_size=4)
    n = len(TINY_TEXT)
    assert len(dm.train_data) == int(0.9 * n)
    assert len(dm.val_data) == n - int(0.9 * n)
    assert dm.vocab == "".join(sorted(set(TINY_TEXT)))
    tok = CharTokenizer(dm.vocab)
    assert tok.decode(dm.val_data.tolist()) == TINY_TEXT[int(0.9 * n) :]


def test_train_batches_are_shifted_windows(corpus_dir):
    dm = make_datamodule(corpus_dir, block_size=8, batch_size=5)
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == y.shape == (5, 8)
    assert torch.equal(x[:, 1:], y[:, :-1])
    tok = CharTokenizer(dm.vocab)
    text = tok.decode(dm.train_data.tolist())
    for row_x, row_y in zip(x.tolist(), y.tolist(), strict=True):
        window = tok.decode(row_x + row_y[-1:])
        assert window in text


def test_val_pass_is_deterministic(corpus_dir):
    dm = make_datamodule(corpus_dir, block_size=8, batch_size=4, val_batch_size=7)
    batches_a = [tuple(t.clone() for t in b) for b in dm.val_dataloader()]
    batches_b = list(dm.val_dataloader())
    assert len(batches_a) == len(batches_b) == len(ValWindows(dm.val_data, 8)) // 7 + 1
    for a, b in zip(batches_a, batches_b, strict=True):
        assert all(torch.equal(ta, tb) for ta, tb in zip(a, b, strict=True))


def test_train_windows_batch_gather_matches_single_items():
    ds = TrainWindows(torch.arange(50), 6)
    assert len(ds) == 50 - 7 + 1
    x, y = ds.__getitems__([0, 43])
    assert torch.equal(x[1], torch.arange(43, 49)) and torch.equal(y[1], torch.arange(44, 50))
    assert torch.equal(ds[43][0], x[1])


def test_predict_reads_no_corpus_and_hands_the_model_its_sampling_settings(tmp_path):
    dm = ShakespeareDataModule(corpus=str(tmp_path / "absent.txt"))
    dm.sampling = Sampling(prompt="ABC:", num_samples=5, batch_size=2)
    batches = list(dm.predict_dataloader())  # in batches of up to batch_size samples, each printed when done
    assert [b.num_samples for b in batches] == [2, 2, 1] and all(b.prompt == "ABC:" for b in batches)
    assert list(tmp_path.iterdir()) == []


def test_a_corpus_with_characters_the_model_lacks_is_named(corpus_dir):
    dm = ShakespeareDataModule(corpus=str(corpus_dir / "input.txt"), block_size=8)
    with pytest.raises(UserError, match=r"input.txt does not fit the model: characters not in the model's vocab"):
        dm.setup("validate", CharTokenizer("abc"))


def test_splits_are_stored_in_the_smallest_integer_type():
    dm = ShakespeareDataModule(block_size=8)  # the bundled corpus, a character model: a byte a token
    dm.setup("fit", CharTokenizer(dm.vocab))
    assert dm.train_data.dtype == torch.uint8 and dm.train_chars is None
    assert len(dm.train_data) + len(dm.val_data) == 1_115_394


def test_a_long_corpus_is_encoded_into_the_cache_once_and_memory_mapped(tmp_path, monkeypatch):
    text = "".join(chr(0x400 + i % 300) + TINY_TEXT[i % 500] for i in range(20_000))  # 300+ characters: uint16
    (tmp_path / "long.txt").write_text(text)
    in_memory = ShakespeareDataModule(corpus=str(tmp_path / "long.txt"), block_size=8, cache_dir=str(tmp_path / "c"))
    in_memory.setup("fit", CharTokenizer(in_memory.vocab))
    assert not (tmp_path / "c").exists()  # shorter than a chunk: encoded in memory, nothing written
    monkeypatch.setattr(data, "CHUNK", 1000)  # read and encoded 1000 bytes at a time (a character cut in two)
    monkeypatch.setattr(data, "IN_MEMORY", 1000)  # and cached when longer than that
    cached = ShakespeareDataModule(corpus=str(tmp_path / "long.txt"), block_size=8, cache_dir=str(tmp_path / "c"))
    assert cached.vocab == in_memory.vocab
    cached.setup("fit", CharTokenizer(cached.vocab))
    for split in ("train_data", "val_data"):
        assert getattr(cached, split).dtype == torch.uint16
        assert torch.equal(getattr(cached, split), getattr(in_memory, split))
    files = sorted(p.name for p in (tmp_path / "c").iterdir())
    assert len(files) == 2 and files[0].startswith("long.txt.") and files[1].endswith(".val")
    stamps = [p.stat().st_mtime_ns for p in (tmp_path / "c").iterdir()]
    cached.setup("fit", CharTokenizer(cached.vocab))  # the second run reads the cache as it is
    assert [p.stat().st_mtime_ns for p in (tmp_path / "c").iterdir()] == stamps


def test_a_bad_byte_in_a_later_chunk_is_named_at_its_offset(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "CHUNK", 64)
    (tmp_path / "bad.txt").write_bytes(b"a" * 100 + b"\xe9" + b"b" * 100)
    with pytest.raises(UserError, match=r"bad.txt is not UTF-8 text \(byte 0xe9 at offset 100\)"):
        read_corpus(str(tmp_path / "bad.txt"))
    (tmp_path / "cut.txt").write_bytes(b"a" * 127 + "é".encode()[:1])  # a character cut off at the end
    with pytest.raises(UserError, match=r"cut.txt is not UTF-8 text \(byte 0xc3 at offset 127\)"):
        read_corpus(str(tmp_path / "cut.txt"))


def test_a_large_val_split_is_scored_in_evenly_spread_windows_every_time_the_same():
    data_ = torch.arange(10_001) % 50
    full = ValWindows(data_, 16)
    part = ValWindows(data_, 16, max_targets=1000)
    assert full.targets == 10_000 and 1000 <= part.targets < 1000 + 16
    assert len(part) == 125 and part.starts[0] == 0 and part.starts[-1] == full.starts[-1]
    gaps = part.starts.diff()
    assert gaps.max() - gaps.min() <= 8  # evenly spread: one stride apart at most
    # Each kept window scores exactly what it scores in the full pass.
    rows = [int((full.starts == s).nonzero()) for s in part.starts[:5].tolist()]
    for a, b in zip(full.__getitems__(rows), part.__getitems__(list(range(5))), strict=True):
        assert torch.equal(a, b)
    assert ValWindows(data_, 16, max_targets=10_000).targets == 10_000  # not more than the cap: the full pass
    for T in (1, 3, 5, 16):  # each window after the first scores T // 2 targets (1 for T = 1): the cap holds
        assert 1000 <= ValWindows(data_, T, max_targets=1000).targets < 1000 + T
