"""The character tokenizer, over generated text."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shakespeare_gpt.tokenizer import CharTokenizer
from shakespeare_gpt.utils import UserError

VOCAB = "\n !',-.:;?ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"


@given(st.text(alphabet=VOCAB))
def test_encode_decode_round_trip(text):
    tok = CharTokenizer(VOCAB)
    ids = tok.encode(text)
    assert all(0 <= i < len(VOCAB) for i in ids)
    assert tok.decode(ids) == text


@given(st.text(min_size=1))
def test_vocabulary_of_any_text_encodes_it(text):
    tok = CharTokenizer("".join(sorted(set(text))))  # as a model trained on ``text`` has it
    assert tok.decode(tok.encode(text)) == text
    ids, chars = tok.encode_with_chars(text)  # vectorised: the same ids, one character each
    assert ids.tolist() == tok.encode(text) and chars is None


@given(st.text(min_size=1), st.text(min_size=1))
def test_vocabulary_of_a_shuffled_order_encodes_text_with_unknown_characters_named(vocab, text):
    tok = CharTokenizer("".join(dict.fromkeys(vocab)))  # any order, as a checkpoint may hold it
    try:
        ids = tok.encode_with_chars(text)[0].tolist()
    except UserError as e:
        unknown = set(text) - set(tok.vocab)
        assert unknown and all(repr(ch)[1:-1] in str(e) for ch in unknown)  # named as repr() spells them
    else:
        assert ids == tok.encode(text)


@given(st.text(alphabet=VOCAB), st.text(alphabet="0123456789@#$%&", min_size=1))
def test_unknown_characters_are_named(text, alien):
    tok = CharTokenizer(VOCAB)
    try:
        tok.encode(text + alien)
    except UserError as e:
        assert all(ch in str(e) for ch in set(alien))
    else:
        raise AssertionError("characters outside the vocabulary were accepted")


@pytest.mark.parametrize("vocab", ["", "aa"])
def test_a_vocabulary_is_distinct_characters(vocab):
    with pytest.raises(UserError, match="distinct characters"):
        CharTokenizer(vocab)
