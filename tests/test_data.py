import hashlib
import os
from pathlib import Path

import pytest
import torch

from shakespeare_gpt.data import (
    CharTokenizer,
    ShakespeareDataModule,
    TrainWindows,
    ValWindows,
    download,
    ensure_corpus,
)
from shakespeare_gpt.errors import UserError

from .conftest import TINY_TEXT


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
        download(serve(b"First Citizen:"), tmp_path / "input.txt")
    assert list(tmp_path.iterdir()) == []


def test_ensure_corpus_downloads_once_then_uses_the_file_offline(serve, closed_port_url, tmp_path):
    payload = TINY_TEXT.encode()
    path = ensure_corpus(tmp_path, serve(payload), sha(payload))
    assert path.read_bytes() == payload
    # The verified file is used without any network: the URL now points nowhere.
    assert ensure_corpus(tmp_path, closed_port_url, sha(payload)) == path


def test_no_file_and_no_network_says_where_to_put_it(closed_port_url, tmp_path):
    with pytest.raises(UserError, match=f"after 3 tries .* put the file at {tmp_path / 'input.txt'}"):
        ensure_corpus(tmp_path, closed_port_url, backoff=0)
    assert list(tmp_path.iterdir()) == []


def test_missing_file_on_the_server_is_not_retried(serve, tmp_path):
    url = serve(b"", fail_first=1, status=404)
    with pytest.raises(UserError, match="at the first try"):
        ensure_corpus(tmp_path, url, backoff=60)  # a retry would wait a minute


def test_transient_failures_are_retried(serve, tmp_path):
    payload = TINY_TEXT.encode()
    url = serve(payload, fail_first=2)  # two 503 answers, then the file
    path = ensure_corpus(tmp_path, url, sha(payload), attempts=3, backoff=0)
    assert path.read_bytes() == payload


def test_data_dir_that_cannot_be_created_is_named(tmp_path, closed_port_url):
    (tmp_path / "a_file").write_text("not a folder")
    with pytest.raises(
        UserError,
        match=r"cannot create the data folder .*a_file/data \(Not a directory\): choose another --data.data_dir",
    ):
        ensure_corpus(tmp_path / "a_file" / "data", closed_port_url)


def test_read_only_data_dir_is_named(tmp_path, closed_port_url, monkeypatch):
    monkeypatch.setattr(os, "access", lambda path, mode: False)  # as root, chmod alone cannot show it
    with pytest.raises(UserError, match=f"cannot write to the data folder {tmp_path}"):
        ensure_corpus(tmp_path, closed_port_url)


def test_existing_file_with_wrong_checksum_is_not_trusted(tmp_path, closed_port_url):
    (tmp_path / "input.txt").write_text("tampered")
    with pytest.raises(UserError, match="does not have the expected contents"):
        ensure_corpus(tmp_path, closed_port_url)
    assert (tmp_path / "input.txt").read_text() == "tampered"  # the user's file is left alone


def test_tokenizer_round_trip_and_vocabulary():
    tok = CharTokenizer.from_text(TINY_TEXT)
    assert tok.vocab == "".join(sorted(set(TINY_TEXT)))
    assert tok.decode(tok.encode(TINY_TEXT)) == TINY_TEXT
    with pytest.raises(UserError, match="'Z'"):
        tok.encode("Zounds")


def make_datamodule(corpus_dir: Path, **kwargs) -> ShakespeareDataModule:
    dm = ShakespeareDataModule(data_dir=str(corpus_dir), sha256=None, **kwargs)
    dm.prepare_data()
    dm.setup("fit")
    return dm


def test_split_sizes_and_vocab(corpus_dir):
    dm = make_datamodule(corpus_dir, block_size=8, batch_size=4)
    n = len(TINY_TEXT)
    assert len(dm.train_data) == int(0.9 * n)
    assert len(dm.val_data) == n - int(0.9 * n)
    assert dm.vocab == "".join(sorted(set(TINY_TEXT)))
    tok = dm.tokenizer
    assert tok.decode(dm.val_data.tolist()) == TINY_TEXT[int(0.9 * n) :]


def test_train_batches_are_shifted_windows(corpus_dir):
    dm = make_datamodule(corpus_dir, block_size=8, batch_size=5)
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == y.shape == (5, 8)
    assert torch.equal(x[:, 1:], y[:, :-1])
    text = dm.tokenizer.decode(dm.train_data.tolist())
    for row_x, row_y in zip(x.tolist(), y.tolist(), strict=True):
        window = dm.tokenizer.decode(row_x + row_y[-1:])
        assert window in text


@pytest.mark.parametrize("n,T", [(101, 10), (100, 10), (11, 10), (57, 7)])
def test_val_windows_predict_every_character_exactly_once(n, T):
    data = torch.arange(n)
    ds = ValWindows(data, T)
    x, y = ds.x, ds.y
    assert torch.equal(y[y != -1].sort().values, torch.arange(1, n))  # every target once
    assert torch.equal(x + 1, torch.where(y == -1, x + 1, y))  # targets are the next character


def test_val_pass_is_deterministic(corpus_dir):
    dm = make_datamodule(corpus_dir, block_size=8, batch_size=4, val_batch_size=7)
    batches_a = [tuple(t.clone() for t in b) for b in dm.val_dataloader()]
    batches_b = list(dm.val_dataloader())
    assert len(batches_a) == len(batches_b) == len(ValWindows(dm.val_data, 8)) // 7 + 1
    for (xa, ya), (xb, yb) in zip(batches_a, batches_b, strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_train_windows_batch_gather_matches_single_items():
    ds = TrainWindows(torch.arange(50), 6)
    assert len(ds) == 50 - 7 + 1
    x, y = ds.__getitems__([0, 43])
    assert torch.equal(x[1], torch.arange(43, 49)) and torch.equal(y[1], torch.arange(44, 50))
    assert torch.equal(ds[43][0], x[1])


def test_predict_needs_no_corpus_when_given_a_vocabulary(tmp_path):
    dm = ShakespeareDataModule(data_dir=str(tmp_path / "absent"), vocab="\n ABCabc:", prompt="ABC:", num_samples=3)
    request = next(iter(dm.predict_dataloader()))
    assert request["idx"].shape == (3, 4)
    assert not (tmp_path / "absent").exists()


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"prompt": ""}, "prompt is empty"),
        ({"prompt": "xyz"}, "not in the model's vocabulary"),
        ({"temperature": 0.0}, "temperature"),
        ({"top_k": 0}, "top_k"),
        ({"top_k": 99}, "top_k"),
        ({"max_new_tokens": -1}, "max_new_tokens"),
        ({"num_samples": 0}, "num_samples"),
    ],
)
def test_bad_sampling_settings_are_refused(kwargs, message):
    dm = ShakespeareDataModule(vocab="\n ABCabc:", **kwargs)
    with pytest.raises(UserError, match=message):
        dm.predict_dataloader()
