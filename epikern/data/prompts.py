"""The one place that turns a question into model input and an answer into the response text.

Two formats, chosen by the tokenizer:

* with a chat template (SmolLM2-Instruct and other chat models): the template applied to
  ``[{"role": "user", "content": question}]`` with ``add_generation_prompt=True``; for SmolLM2::

      <|im_start|>system\\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>
      <|im_start|>user\\n{question}<|im_end|>\\n<|im_start|>assistant\\n

* without one (the character-level tiny models): :data:`PLAIN_PROMPT`,
  ``"Question: {question}\\nAnswer: "``.

Either way the response is the worked answer (:func:`format_response`) followed by the tokenizer's
eos token, which the caller appends: ``prompt + format_response(answer) + tokenizer.eos_token``.
"""

from __future__ import annotations

from typing import Sequence, Union

import torch

__all__ = [
    "PLAIN_PROMPT",
    "encode_prompt",
    "encode_prompts",
    "encode_response",
    "format_prompt",
    "format_response",
    "uses_chat_template",
]

PLAIN_PROMPT = "Question: {question}\nAnswer: "


def uses_chat_template(tokenizer) -> bool:
    """Whether :func:`format_prompt` formats prompts for ``tokenizer`` with its chat template."""
    return bool(getattr(tokenizer, "chat_template", None))


def format_prompt(tokenizer, question: str) -> str:
    """The prompt text for ``question``: the chat template when the tokenizer has one (user turn +
    generation prompt), else :data:`PLAIN_PROMPT`. The text carries its own special tokens in the
    chat case, so encode it with ``add_special_tokens=False`` there (:func:`encode_prompts` does)."""
    if not isinstance(question, str):
        raise TypeError(f"question must be a str, got {type(question).__name__}")
    if uses_chat_template(tokenizer):
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True
        )
    return PLAIN_PROMPT.format(question=question)


def format_response(answer: str) -> str:
    """The response text the model is trained to produce: the worked answer without surrounding
    whitespace (``"3+4=<<3+4=7>>7\\n#### 7"``); the caller appends the eos token."""
    if not isinstance(answer, str):
        raise TypeError(f"answer must be a str, got {type(answer).__name__}")
    return answer.strip()


def encode_prompt(tokenizer, question: str) -> list[int]:
    """The unpadded ids of ``question``'s prompt: one row of :func:`encode_prompts` without padding
    (the plain format with the tokenizer's own special tokens, a chat prompt with none added)."""
    text = format_prompt(tokenizer, question)
    return tokenizer(text, add_special_tokens=not uses_chat_template(tokenizer)).input_ids


def encode_response(tokenizer, answer: str) -> list[int]:
    """The ids of a training response: :func:`format_response` of ``answer``, then eos.

    ``encode_prompt(tok, q) + encode_response(tok, a)`` is a whole training sequence; the loss counts
    the response part."""
    if tokenizer.eos_token_id is None:
        raise ValueError(f"tokenizer {type(tokenizer).__name__} has no eos token")
    return tokenizer(format_response(answer), add_special_tokens=False).input_ids + [tokenizer.eos_token_id]


def encode_prompts(
    tokenizer, questions: Sequence[str], device: Union[str, torch.device, None] = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """A left-padded batch of prompts, ready for ``model.generate(input_ids, attention_mask=...)``.

    Returns:
        ``input_ids`` [B, T] int64 and ``attention_mask`` [B, T] int64 (0 on the left padding),
        T = the longest prompt; on ``device`` if given. The plain format gets the tokenizer's own
        special tokens (``<bos>`` for :func:`char_tokenizer`); chat prompts get none added.

    Raises:
        ValueError: no questions, or a tokenizer without a pad token.
    """
    if isinstance(questions, str):
        raise TypeError("questions must be a sequence of str, not one str")
    if len(questions) == 0:
        raise ValueError("encode_prompts needs at least one question")
    if tokenizer.pad_token_id is None:
        raise ValueError(f"tokenizer {type(tokenizer).__name__} has no pad token; set tokenizer.pad_token")
    prompts = [format_prompt(tokenizer, q) for q in questions]
    batch = tokenizer(
        prompts,
        padding=True,
        padding_side="left",
        add_special_tokens=not uses_chat_template(tokenizer),
        return_attention_mask=True,
        return_tensors="pt",
    )
    input_ids, attention_mask = batch["input_ids"], batch["attention_mask"]
    if device is not None:
        input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
    return input_ids, attention_mask
