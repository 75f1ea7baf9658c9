"""The character tokenizer: one id per character, exact round trips, HF save/load, padding."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoTokenizer

from epikern.data import DEFAULT_ALPHABET, SPECIAL_TOKENS, char_tokenizer, format_prompt, format_response
from epikern.data import generate_problems

TEXTS = [
    "Tom has 3 apples.\nHe buys 4 more.",
    "  leading and trailing spaces  ",
    "a  b\n\n\nc\n",
    "#### $1,000.00 <<3*4=12>> (50%) 'q'! a;b:c/d?",
    "",
]


@pytest.fixture(scope="module")
def tok():
    return char_tokenizer()


def test_vocabulary(tok):
    assert len(tok) == len(SPECIAL_TOKENS) + len(DEFAULT_ALPHABET) == 100 < 128
    assert [tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.unk_token_id] == [0, 1, 2, 3]
    assert (tok.pad_token, tok.bos_token, tok.eos_token, tok.unk_token) == SPECIAL_TOKENS
    for c in "0123456789azAZ<>=+-*/#$.,?'!:;()% \n":
        assert c in DEFAULT_ALPHABET
    vocab = tok.get_vocab()
    assert [vocab[c] for c in DEFAULT_ALPHABET] == list(range(4, 100))


@pytest.mark.parametrize("text", TEXTS)
def test_one_id_per_character_and_exact_round_trip(tok, text):
    vocab = tok.get_vocab()
    ids = tok(text).input_ids
    assert ids == [tok.bos_token_id] + [vocab[c] for c in text]
    assert tok(text, add_special_tokens=False).input_ids == ids[1:]
    assert tok.decode(ids, skip_special_tokens=True) == text
    assert tok.decode(ids) == tok.bos_token + text


def test_round_trip_on_generated_problems(tok):
    for p in generate_problems(200):
        text = format_prompt(tok, p.question) + format_response(p.answer)
        ids = tok(text + tok.eos_token).input_ids
        assert len(ids) == len(text) + 2 and ids[-1] == tok.eos_token_id
        assert tok.unk_token_id not in ids
        assert tok.decode(ids, skip_special_tokens=True) == text


def test_unknown_characters_map_to_unk(tok):
    ids = tok("caf\u00e9 \u2019", add_special_tokens=False).input_ids
    assert ids[3] == ids[5] == tok.unk_token_id and len(ids) == 6
    assert tok.decode(ids, skip_special_tokens=True) == "caf "


def test_save_and_load_with_auto_tokenizer(tok, tmp_path):
    tok.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert loaded.get_vocab() == tok.get_vocab()
    assert loaded.all_special_ids == tok.all_special_ids
    assert loaded.padding_side == "right"
    for text in TEXTS:
        assert loaded(text).input_ids == tok(text).input_ids
        assert loaded.decode(loaded(text).input_ids, skip_special_tokens=True) == text
    a, b = tok(TEXTS, padding=True, return_tensors="pt"), loaded(TEXTS, padding=True, return_tensors="pt")
    assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.attention_mask, b.attention_mask)


@pytest.mark.parametrize("side", ["right", "left"])
def test_batch_padding(side):
    tok = char_tokenizer()
    tok.padding_side = side
    texts = ["ab", "abcde", "x y"]
    batch = tok(texts, padding=True, return_tensors="pt")
    assert batch.input_ids.shape == batch.attention_mask.shape == (3, 6)
    for row, mask, text in zip(batch.input_ids, batch.attention_mask, texts):
        n = len(text) + 1
        real = slice(0, n) if side == "right" else slice(6 - n, 6)
        pad = slice(n, 6) if side == "right" else slice(0, 6 - n)
        assert row[real].tolist() == tok(text).input_ids
        assert mask[real].eq(1).all() and mask[pad].eq(0).all()
        assert row[pad].eq(tok.pad_token_id).all()
        assert tok.decode(row, skip_special_tokens=True) == text
    other = "left" if side == "right" else "right"
    flipped = tok(texts, padding=True, padding_side=other, return_tensors="pt")
    assert not torch.equal(flipped.input_ids, batch.input_ids)
    assert tok.batch_decode(flipped.input_ids, skip_special_tokens=True) == texts


def test_custom_alphabet():
    tok = char_tokenizer("0123456789+=\n0")
    assert len(tok) == 4 + 13
    assert tok("1+1=2\n").input_ids == [1, 5, 14, 5, 15, 6, 16]
    assert tok("1-1", add_special_tokens=False).input_ids == [5, tok.unk_token_id, 5]
    assert char_tokenizer(["a", "b"]).get_vocab()["b"] == 5


@pytest.mark.parametrize("alphabet,message", [("", "empty"), (["a", "bc"], "single characters"),
                                               ([1], "single characters")])
def test_bad_alphabet(alphabet, message):
    with pytest.raises(ValueError, match=message):
        char_tokenizer(alphabet)
