"""Sampling: the ``--sample.*`` settings, top-k and nucleus (top-p) draws, generation with and without the KV
cache, the sliding window, the split matrix products of batch-1 decoding on a CPU, and ``predict``'s printing
of samples as they are drawn."""

import math
import signal
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from jsonargparse import ArgumentParser

from shakespeare_gpt.callbacks import SampleWriter
from shakespeare_gpt.data import ShakespeareDataModule
from shakespeare_gpt.lightning_module import ShakespeareGPT
from shakespeare_gpt.model import GPT, GPTConfig
from shakespeare_gpt.sampling import Sampling, generate, sample_next
from shakespeare_gpt.tokenizer import CharTokenizer
from shakespeare_gpt.utils import UserError

from .test_model import tiny

VOCAB = "\n !',-.:;?ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
torch.manual_seed(0)
MODEL = GPT(GPTConfig(vocab_size=len(VOCAB), block_size=8, n_layer=1, n_head=2, n_embd=16, dropout=0.0)).eval()


def test_any_text_is_a_prompt_a_space_or_a_newline_too():
    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(Sampling, "sample")
    for prompt in (" ", "\n", "ROMEO:"):
        assert parser.parse_args([f"--sample.prompt={prompt}"]).sample.prompt == prompt


def test_the_prompt_is_encoded_once_per_sample_and_unknown_characters_are_named():
    idx = Sampling(prompt="To be", num_samples=3).encode(CharTokenizer(VOCAB))
    assert idx.shape == (3, 5) and torch.equal(idx[0], idx[2])
    with pytest.raises(UserError, match=r"--sample.prompt 'ROMEO@#': characters not in the model's vocabulary: '#@'"):
        Sampling(prompt="ROMEO@#").encode(CharTokenizer(VOCAB))


def test_every_setting_that_cannot_sample_is_named_at_once():
    bad = Sampling(
        prompt="Zebra@#", num_samples=0, max_new_tokens=-1, temperature=0.0, top_k=0, top_p=0.0, batch_size=0
    )
    with pytest.raises(UserError) as e:
        bad.check(CharTokenizer(VOCAB))
    flags = ("num_samples 0", "max_new_tokens -1", "temperature 0.0", "top_k 0", "top_p 0.0", "batch_size 0")
    for flag in (*flags, "prompt 'Zebra@#'"):
        assert f"--sample.{flag}: " in str(e.value)
    assert "'#@'" in str(e.value) and "\n" not in str(e.value)  # the unknown characters, on one line
    with pytest.raises(UserError, match=r"--sample.prompt '': give some text"):
        Sampling(prompt="").check(CharTokenizer(VOCAB))
    for top_p in (-0.1, 1.5):
        with pytest.raises(UserError, match=rf"^--sample.top_p {top_p}: give a number above 0 and at most 1 \(1 "):
            Sampling(top_p=top_p).check(CharTokenizer(VOCAB))
    Sampling(top_k=10**6, top_p=1.0).check(CharTokenizer(VOCAB))  # more than the vocabulary: all of it
    Sampling(top_p=0.01).check(CharTokenizer(VOCAB))


def test_the_default_prompt_is_a_newline_or_the_vocabulary_s_first_character():
    assert Sampling().encode(CharTokenizer("\nab")).tolist() == [[0]]
    assert Sampling(num_samples=2).encode(CharTokenizer("xyz")).tolist() == [[0], [0]]  # a text without lines


@settings(max_examples=30, deadline=None)
@given(
    prompt_len=st.integers(1, 20),
    max_new_tokens=st.integers(0, 20),
    temperature=st.floats(0.05, 5.0),
    top_k=st.one_of(st.none(), st.integers(1, 2 * len(VOCAB))),  # above the vocabulary: all of it
    top_p=st.floats(0.001, 1.0),
    seed=st.integers(0, 2**31),
)
def test_valid_sampling_settings_extend_the_prompt(prompt_len, max_new_tokens, temperature, top_k, top_p, seed):
    idx = torch.randint(0, len(VOCAB), (2, prompt_len), generator=torch.Generator().manual_seed(seed))
    out = generate(MODEL, idx, max_new_tokens, temperature, top_k, top_p, torch.Generator().manual_seed(seed))
    assert out.shape == (2, prompt_len + max_new_tokens)
    assert torch.equal(out[:, :prompt_len], idx)
    assert int(out.min()) >= 0 and int(out.max()) < len(VOCAB)
    again = generate(MODEL, idx, max_new_tokens, temperature, top_k, top_p, torch.Generator().manual_seed(seed))
    assert torch.equal(out, again)


def test_a_top_p_of_1_computes_nothing_and_draws_what_was_drawn_without_it(monkeypatch):
    model = tiny()
    idx = torch.zeros(2, 3, dtype=torch.long)
    without = generate(model, idx, 30, 0.8, 5, generator=torch.Generator().manual_seed(3))
    monkeypatch.setattr(torch, "sort", None)  # the nucleus's sort: not even called
    assert torch.equal(generate(model, idx, 30, 0.8, 5, 1.0, torch.Generator().manual_seed(3)), without)


# Two rows, the same five probabilities in two orders: the kept tokens are the likeliest whatever their ids.
PROBS = torch.tensor([[0.5, 0.3, 0.1, 0.06, 0.04], [0.06, 0.3, 0.04, 0.5, 0.1]])


@pytest.mark.parametrize(
    ("top_p", "top_k", "kept"),
    [
        (0.45, None, [{0}, {3}]),  # 0.5 reaches 0.45 alone
        (0.75, None, [{0, 1}, {3, 1}]),  # 0.5 does not reach it; 0.5 + 0.3 does: the token that crosses p is kept
        (0.85, None, [{0, 1, 2}, {3, 1, 4}]),
        (0.99, None, [{0, 1, 2, 3, 4}, {0, 1, 2, 3, 4}]),
        (0.6, 2, [{0}, {3}]),  # after top_k: 0.5 / 0.8 = 0.625 of the two left
        (0.7, 2, [{0, 1}, {3, 1}]),
    ],
)
def test_a_small_top_p_draws_only_the_fewest_likeliest_tokens_that_reach_it(top_p, top_k, kept):
    logits = PROBS.log().repeat(2000, 1)  # 2000 draws from each row
    drawn = sample_next(logits, 1.0, top_k, top_p, torch.Generator().manual_seed(0)).view(2000, 2)
    assert [set(drawn[:, row].tolist()) for row in (0, 1)] == kept
    # In proportion to their probabilities, renormalised: the likeliest's share of the kept mass.
    share = (drawn[:, 0] == 0).float().mean().item()
    assert math.isclose(share, 0.5 / PROBS[0, list(kept[0])].sum().item(), abs_tol=0.04)


def test_greedy_generation_is_deterministic_and_runs_past_block_size():
    model = tiny()
    idx = torch.zeros(2, 3, dtype=torch.long)
    a = generate(model, idx, 20, top_k=1, generator=torch.Generator().manual_seed(1))
    b = generate(model, idx, 20, top_k=1, generator=torch.Generator().manual_seed(2))
    assert a.shape == (2, 23)  # longer than block_size=8: the context slides
    assert torch.equal(a, b)
    assert torch.equal(a[:, :3], idx)


def test_sampling_is_reproducible_with_a_seed_and_restores_training_mode():
    model = tiny().train()
    idx = torch.zeros(1, 1, dtype=torch.long)
    a = generate(model, idx, 30, temperature=1.5, generator=torch.Generator().manual_seed(7))
    b = generate(model, idx, 30, temperature=1.5, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, b)
    assert model.training


@pytest.mark.parametrize("draw", [{"top_k": 1}, {"temperature": 1.5, "top_p": 0.9}, {"top_k": 6, "top_p": 0.7}])
@pytest.mark.parametrize("n_layer", [2, 0])
@pytest.mark.parametrize("attention", ["sdpa", "explicit"])
@pytest.mark.parametrize("prompt_len", [1, 5, 13])
def test_kv_cache_gives_the_same_tokens_as_no_cache(attention, prompt_len, n_layer, draw):
    model = tiny(attention=attention, n_layer=n_layer)
    idx = torch.randint(0, 11, (2, prompt_len), generator=torch.Generator().manual_seed(prompt_len))
    # 40 new tokens with block_size 8: the window moves many times, and the cache is rebuilt each time.
    cached = generate(model, idx, 40, **draw, generator=torch.Generator().manual_seed(1), use_cache=True)
    uncached = generate(model, idx, 40, **draw, generator=torch.Generator().manual_seed(1), use_cache=False)
    assert torch.equal(cached, uncached)


@pytest.fixture
def two_threads():
    """The split matrix-vector path cuts a matrix into one slab per thread: make sure there are two."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(1, 1, 256), (3, 256), (2, 1, 256)])
def test_split_linear_computes_what_nn_linear_does(two_threads, monkeypatch, shape, bias):
    from shakespeare_gpt.sampling import split_linear

    torch.manual_seed(0)
    layer = torch.nn.Linear(256, 1024, bias=bias)
    x = torch.randn(shape)
    calls = []
    for name in ("bmm", "baddbmm"):
        original = getattr(torch, name)
        monkeypatch.setattr(torch, name, lambda *a, _f=original, **k: calls.append(1) or _f(*a, **k))
    with torch.inference_mode():
        y = split_linear(layer, x)
    assert calls, "one row on a CPU without grad should take the split path"
    torch.testing.assert_close(y, layer(x), atol=1e-5, rtol=1e-5)
    calls.clear()
    y = split_linear(layer, x)  # with grad: the plain product, so training is untouched
    assert not calls and y.requires_grad


def test_generation_splits_only_large_matrices_and_puts_the_model_back(two_threads):
    from shakespeare_gpt.sampling import split_matrix_products

    model = tiny(n_embd=256, n_head=4, n_layer=1)  # matrices big enough for the split path
    with split_matrix_products(model):
        split = [name for name, m in model.named_modules() if "forward" in vars(m)]
    # q/k/v (256 x 768) and the feed-forward's two (256 x 1024); not the projection (256 x 256) or the head.
    assert split == ["blocks.0.attn.qkv", "blocks.0.ffwd.fc", "blocks.0.ffwd.proj"]
    assert not any("forward" in vars(m) for m in model.modules())
    assert list(model.state_dict()) == list(tiny(n_embd=256, n_head=4, n_layer=1).state_dict())


def test_kv_cache_with_split_matrix_products_gives_the_same_tokens(two_threads, monkeypatch):
    model = tiny(n_embd=256, n_head=4, n_layer=1)
    calls = []
    original = torch.bmm
    monkeypatch.setattr(torch, "bmm", lambda *a, **k: calls.append(1) or original(*a, **k))
    idx = torch.randint(0, 11, (1, 3))
    cached = generate(model, idx, 24, top_k=1, use_cache=True)
    assert calls  # the split path ran
    uncached = generate(model, idx, 24, top_k=1, use_cache=False)
    assert torch.equal(cached, uncached)


def test_kv_cache_logits_match_a_full_forward():
    model = tiny().eval()
    idx = torch.randint(0, 11, (2, 8))
    full, _ = model(idx)
    cache = model.new_cache()
    first, _ = model(idx[:, :3], cache=cache)
    steps = [model(idx[:, t : t + 1], cache=cache)[0] for t in range(3, 8)]
    torch.testing.assert_close(torch.cat([first, *steps], dim=1), full, atol=1e-5, rtol=1e-5)


def test_window_slides_a_quarter_block_at_a_time():
    from shakespeare_gpt.sampling import window_start

    assert [window_start(n, 8) for n in (1, 8, 9, 10, 11, 12)] == [0, 0, 2, 2, 4, 4]
    assert all(n - window_start(n, 256) <= 256 for n in range(1, 2000))
    assert all(n - window_start(n, 256) >= 192 for n in range(256, 2000))


def test_predict_prints_the_first_sample_of_each_batch_as_it_is_drawn_and_writes_the_same_text(tmp_path, capsys):
    model = ShakespeareGPT(VOCAB, block_size=8, n_layer=1, n_head=2, n_embd=16)
    writer, pieces = SampleWriter(str(tmp_path / "samples.txt")), []
    writer.print_now = lambda text: pieces.append(text) or SampleWriter.print_now(writer, text)
    data = ShakespeareDataModule(corpus=str(tmp_path / "absent.txt"))
    data.sampling = Sampling(prompt="ROMEO:", num_samples=5, max_new_tokens=30, batch_size=2)
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, callbacks=[writer])
    trainer.predict(model, datamodule=data)
    text = (tmp_path / "samples.txt").read_text()
    assert capsys.readouterr().out == text + f"wrote 5 sample(s) to {tmp_path / 'samples.txt'}\n"
    assert "".join(pieces) == text and text.count("----- sample") == 5
    # Samples 1, 3 and 5 (each its batch's first): the header, the prompt with the first character, then a
    # character a step, and the end of the line; samples 2 and 4 whole, when their batch is done.
    assert len(pieces) == 3 * (1 + 30 + 1) + 2
    assert pieces[:3] == ["----- sample 1 -----\n", text[21:28], text[28]] and pieces[1].startswith("ROMEO:")
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # Lightning put back the handlers
    assert model.token_sink is None


WORDS = [" To", " be", ",", " or", " not"]


@pytest.mark.parametrize(
    ("decode", "ids"),
    [
        # GPT-2's byte-level BPE: a token may be half a character
        pytest.param(lambda ids: bytes(ids).decode(errors="replace"), list("né, à Åland".encode()), id="bytes"),
        # SentencePiece drops the space of the text's first token
        pytest.param(lambda ids: "".join(WORDS[i] for i in ids).removeprefix(" "), [0, 1, 2, 3, 4], id="words"),
    ],
)
def test_the_text_printed_token_by_token_is_the_text_of_all_the_tokens(decode, ids, capsys):
    writer = SampleWriter()
    writer.decode = decode
    writer.on_predict_batch_start(SimpleNamespace(is_global_zero=True), None, None, 0)
    capsys.readouterr()
    for t in range(2, len(ids) + 1):  # 2 tokens of prompt (for the bytes: "n" and the first half of "é")
        writer.stream(torch.tensor([ids[:t]]))
    out = capsys.readouterr().out
    assert out == writer.samples[-1] == decode(ids) and "\ufffd" not in out
