"""Property tests: the tokenizer round trip and the sampling settings, over generated inputs."""

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from shakespeare_gpt.data import CharTokenizer
from shakespeare_gpt.errors import UserError
from shakespeare_gpt.model import GPT, GPTConfig
from shakespeare_gpt.sampling import check_sampling, generate

VOCAB = "\n !',-.:;?ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
torch.manual_seed(0)
MODEL = GPT(GPTConfig(vocab_size=len(VOCAB), block_size=8, n_layer=1, n_head=2, n_embd=16, dropout=0.0)).eval()


@given(st.text(alphabet=VOCAB))
def test_encode_decode_round_trip(text):
    tok = CharTokenizer(VOCAB)
    ids = tok.encode(text)
    assert all(0 <= i < len(VOCAB) for i in ids)
    assert tok.decode(ids) == text


@given(st.text(min_size=1))
def test_vocabulary_of_any_text_encodes_it(text):
    tok = CharTokenizer.from_text(text)
    assert tok.decode(tok.encode(text)) == text
    assert list(tok.vocab) == sorted(set(text))


@given(st.text(alphabet=VOCAB), st.text(alphabet="0123456789@#$%&", min_size=1))
def test_unknown_characters_are_named(text, alien):
    tok = CharTokenizer(VOCAB)
    try:
        tok.encode(text + alien)
    except UserError as e:
        assert all(ch in str(e) for ch in set(alien))
    else:
        raise AssertionError("characters outside the vocabulary were accepted")


@settings(max_examples=30, deadline=None)
@given(
    prompt_len=st.integers(1, 20),
    max_new_tokens=st.integers(0, 20),
    temperature=st.floats(0.05, 5.0),
    top_k=st.one_of(st.none(), st.integers(1, len(VOCAB))),
    seed=st.integers(0, 2**31),
)
def test_valid_sampling_settings_extend_the_prompt(prompt_len, max_new_tokens, temperature, top_k, seed):
    idx = torch.randint(0, len(VOCAB), (2, prompt_len), generator=torch.Generator().manual_seed(seed))
    out = generate(MODEL, idx, max_new_tokens, temperature, top_k, torch.Generator().manual_seed(seed))
    assert out.shape == (2, prompt_len + max_new_tokens)
    assert torch.equal(out[:, :prompt_len], idx)
    assert int(out.min()) >= 0 and int(out.max()) < len(VOCAB)
    again = generate(MODEL, idx, max_new_tokens, temperature, top_k, torch.Generator().manual_seed(seed))
    assert torch.equal(out, again)


@given(
    max_new_tokens=st.integers(-100, 100),
    temperature=st.floats(allow_nan=True, allow_infinity=True),
    top_k=st.one_of(st.none(), st.integers(-100, 200)),
)
def test_sampling_settings_are_accepted_exactly_when_valid(max_new_tokens, temperature, top_k):
    valid = max_new_tokens >= 0 and 0 < temperature < math.inf and (top_k is None or 1 <= top_k <= len(VOCAB))
    try:
        check_sampling(max_new_tokens, temperature, top_k, len(VOCAB))
    except UserError:
        assert not valid
    else:
        assert valid
