"""Prompt formats: the plain one for the character models, SmolLM2's chat template, left padding."""

from __future__ import annotations

import pytest
import torch

from epikern.data import (PLAIN_PROMPT, char_tokenizer, encode_prompt, encode_prompts, encode_response,
                          format_prompt, format_response, generate_problems, load_gsm8k, uses_chat_template)

QUESTIONS = ["Tom has 3 apples. He buys 4 more. How many apples does Tom have now?", "What is 2+3?"]


def _check_left_padded(tokenizer, input_ids, attention_mask, expected_rows):
    assert input_ids.dtype == attention_mask.dtype == torch.long
    assert input_ids.shape == attention_mask.shape == (len(expected_rows), max(map(len, expected_rows)))
    width = input_ids.shape[1]
    for row, mask, expected in zip(input_ids, attention_mask, expected_rows):
        pad = width - len(expected)
        assert row[pad:].tolist() == expected
        assert row[:pad].eq(tokenizer.pad_token_id).all()
        assert mask[:pad].eq(0).all() and mask[pad:].eq(1).all()


def test_plain_format():
    tok = char_tokenizer()
    assert not uses_chat_template(tok)
    assert format_prompt(tok, "Q?") == "Question: Q?\nAnswer: " == PLAIN_PROMPT.format(question="Q?")
    assert format_response("  3+4=<<3+4=7>>7\n#### 7\n") == "3+4=<<3+4=7>>7\n#### 7"
    input_ids, attention_mask = encode_prompts(tok, QUESTIONS, device="cpu")
    expected = [[tok.bos_token_id] + tok(f"Question: {q}\nAnswer: ", add_special_tokens=False).input_ids
                for q in QUESTIONS]
    _check_left_padded(tok, input_ids, attention_mask, expected)
    assert tok.padding_side == "right", "encode_prompts must not change the tokenizer"
    assert [encode_prompt(tok, q) for q in QUESTIONS] == expected


def test_training_sequence_round_trips():
    tok = char_tokenizer()
    for p in generate_problems(20):
        prompt, response = encode_prompt(tok, p.question), encode_response(tok, p.answer)
        assert prompt[0] == tok.bos_token_id and response[-1] == tok.eos_token_id
        assert tok.eos_token_id not in prompt + response[:-1]
        text = tok.decode(prompt + response, skip_special_tokens=True)
        assert text == f"Question: {p.question}\nAnswer: {p.answer}"
        assert tok.decode(response, skip_special_tokens=True) == p.answer


def test_chat_format_with_smollm2(smollm2):
    _, tok = smollm2
    assert uses_chat_template(tok)
    question = load_gsm8k("test", limit=1)[0].question
    prompt = format_prompt(tok, question)
    assert prompt.endswith(f"<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n")
    assert prompt.startswith("<|im_start|>system\n")
    assert prompt.count("<|im_start|>") == 3 and prompt.count("<|im_end|>") == 2

    questions = ["What is 2+3?", "Tom has 3 apples and buys 4 more. How many apples does he have?"]
    input_ids, attention_mask = encode_prompts(tok, questions)
    expected = [tok(format_prompt(tok, q), add_special_tokens=False).input_ids for q in questions]
    assert tok.convert_ids_to_tokens(expected[0][:1]) == ["<|im_start|>"]   # no extra bos
    _check_left_padded(tok, input_ids, attention_mask, expected)
    assert tok.padding_side == "right", "encode_prompts must not change the shared tokenizer"
    assert [encode_prompt(tok, q) for q in questions] == expected
    response = encode_response(tok, "2+3=<<2+3=5>>5\n#### 5")
    assert response[-1] == tok.eos_token_id == tok.convert_tokens_to_ids("<|im_end|>")
    full = tok.decode(expected[0] + response)
    assert full == format_prompt(tok, questions[0]) + "2+3=<<2+3=5>>5\n#### 5<|im_end|>"



def test_bad_input():
    tok = char_tokenizer()
    with pytest.raises(ValueError, match="at least one question"):
        encode_prompts(tok, [])
    with pytest.raises(TypeError, match="not one str"):
        encode_prompts(tok, "What is 2+3?")
    with pytest.raises(TypeError, match="question must be a str"):
        format_prompt(tok, 3)
    with pytest.raises(TypeError, match="answer must be a str"):
        format_response(None)
    tok.pad_token = None
    with pytest.raises(ValueError, match="no pad token"):
        encode_prompts(tok, ["q"])
    tok.eos_token = None
    with pytest.raises(ValueError, match="no eos token"):
        encode_response(tok, "#### 1")
