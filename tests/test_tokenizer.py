"""The offline character tokenizer: one id per character, round trips, chat template, save/load."""

from __future__ import annotations

import functools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer

from erpo_fast.tokenizer import DEFAULT_ALPHABET, SPECIAL_TOKENS, build_char_tokenizer


@functools.cache
def default_tokenizer():
    return build_char_tokenizer()


@pytest.fixture
def tokenizer():
    return default_tokenizer()


def test_vocab_is_tiny_and_ordered(tokenizer):
    vocab = tokenizer.get_vocab()
    assert len(tokenizer) == len(vocab) == len(SPECIAL_TOKENS) + len(DEFAULT_ALPHABET) < 64
    assert [vocab[t] for t in SPECIAL_TOKENS] == list(range(len(SPECIAL_TOKENS)))
    assert (tokenizer.pad_token_id, tokenizer.unk_token_id, tokenizer.eos_token_id) == (0, 1, 2)
    assert sorted(vocab.values()) == list(range(len(vocab)))


@settings(max_examples=60, deadline=None)
@given(st.text(alphabet=DEFAULT_ALPHABET, max_size=40))
def test_encode_decode_round_trip_one_token_per_character(text):
    tokenizer = default_tokenizer()
    ids = tokenizer.encode(text, add_special_tokens=False)
    vocab = tokenizer.get_vocab()
    assert ids == [vocab[c] for c in text]
    assert tokenizer.decode(ids) == text


def test_unknown_characters_and_special_tokens(tokenizer):
    vocab = tokenizer.get_vocab()
    assert tokenizer.encode("1é2", add_special_tokens=False) == [vocab["1"], tokenizer.unk_token_id, vocab["2"]]
    # A special token written in text is one id, not its characters.
    assert tokenizer.encode("7<eos>", add_special_tokens=False) == [vocab["7"], tokenizer.eos_token_id]
    assert tokenizer.decode([vocab["7"], tokenizer.eos_token_id], skip_special_tokens=True) == "7"


def test_chat_template_is_compact(tokenizer):
    vocab = tokenizer.get_vocab()
    messages = [{"role": "user", "content": "47+38="}]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text == "<user>47+38=<assistant>"
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert list(ids) == [vocab["<user>"], *(vocab[c] for c in "47+38="), vocab["<assistant>"]]
    turn = messages + [{"role": "assistant", "content": "85"}]
    assert tokenizer.apply_chat_template(turn, tokenize=False) == "<user>47+38=<assistant>85<eos>"
    system = [{"role": "system", "content": "be brief"}] + messages
    assert tokenizer.apply_chat_template(system, add_generation_prompt=True, tokenize=False) == \
        "<system>be brief<user>47+38=<assistant>"


def test_batches_pad_on_the_left(tokenizer):
    batch = tokenizer(["1+1=", "12+34="], padding=True, add_special_tokens=False)
    assert batch["input_ids"][0][:2] == [tokenizer.pad_token_id] * 2
    assert batch["attention_mask"][0] == [0, 0, 1, 1, 1, 1]


def test_save_and_reload_offline(tokenizer, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    text = "12*3=36\nwhat is 4-9? -5"
    assert loaded.encode(text, add_special_tokens=False) == tokenizer.encode(text, add_special_tokens=False)
    assert loaded.decode(loaded.encode(text, add_special_tokens=False)) == text
    assert loaded.get_vocab() == tokenizer.get_vocab()
    assert (loaded.pad_token_id, loaded.eos_token_id, loaded.padding_side) == (0, 2, "left")
    messages = [{"role": "user", "content": "5-7="}]
    assert loaded.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) == "<user>5-7=<assistant>"


@pytest.mark.parametrize("alphabet, message", [
    ("0123456789+=+", "repeated"),
    (["12", "3"], "single characters"),
    ([chr(0x100 + i) for i in range(60)], "64-token limit"),
])
def test_bad_alphabets_raise(alphabet, message):
    with pytest.raises(ValueError, match=message):
        build_char_tokenizer(alphabet)


def test_custom_alphabet():
    tokenizer = build_char_tokenizer("01+=")
    assert len(tokenizer) == len(SPECIAL_TOKENS) + 4
    assert tokenizer.decode(tokenizer.encode("10+1=", add_special_tokens=False)) == "10+1="
    assert tokenizer.encode("2", add_special_tokens=False) == [tokenizer.unk_token_id]
