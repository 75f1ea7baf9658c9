"""Target responses: sampled from the target (or GSM8K references), stored with their token ids.

Storage: ``responses.jsonl``, one JSON object per response, in prompt order, R per prompt::

    {"prompt": 17, "sample": 2, "question": "...", "reference": "45",
     "prompt_ids": [1, 53, ...], "response_ids": [24, 23, ..., 2],
     "text": "37+8=<<37+8=45>>45\\n#### 45", "finished": true, "correct": true}

``prompt_ids`` are the encoded prompt (:func:`epikern.data.encode_prompt`, no padding);
``response_ids`` the tokens after it, up to and including the first eos (``finished``) or the
``max_new_tokens`` cap; ``text`` the response decoded without special tokens, graded against
``reference`` (the problem's final answer). The file is written atomically.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Optional, Sequence

import torch
from tqdm.auto import tqdm

from ..data import encode_prompt, encode_prompts, encode_response, is_correct
from .batches import Example
from .outputs import write_jsonl

RESPONSES_NAME = "responses.jsonl"


@dataclass(frozen=True)
class Response:
    """One response to prompt ``prompt`` (its ``sample``-th of R); see the module docstring."""

    prompt: int
    sample: int
    question: str
    reference: str
    prompt_ids: tuple[int, ...]
    response_ids: tuple[int, ...]
    text: str
    finished: bool
    correct: bool

    def example(self) -> Example:
        """The distillation example: the prompt is context, the response tokens are counted."""
        return Example(self.prompt_ids + self.response_ids, len(self.prompt_ids))


@torch.no_grad()
def generate(model, tokenizer, questions: Sequence[str], *, max_new_tokens: int, do_sample: bool,
             num_return_sequences: int = 1, batch_size: int = 64, seed: int = 0,
             desc: str = "generate") -> list[list[int]]:
    """Responses of ``model`` to ``questions`` through HF ``generate`` (batched, left-padded prompts).

    Sampling is at temperature 1 from the full distribution (``top_k=0``, ``top_p=1``), seeded by
    ``seed`` (torch's global RNG, reseeded per batch from ``seed`` and the batch index, so the
    result does not depend on what ran before). Greedy decoding with ``do_sample=False``.

    Returns:
        ``len(questions) · num_return_sequences`` token-id lists (prompt-major), each cut after its
        first eos (kept) or at ``max_new_tokens``.
    """
    device = next(model.parameters()).device
    eos = tokenizer.eos_token_id
    out: list[list[int]] = []
    starts = range(0, len(questions), batch_size)
    for b, start in enumerate(tqdm(starts, desc=desc, disable=None, leave=False)):
        ids, mask = encode_prompts(tokenizer, questions[start:start + batch_size], device=device)
        torch.manual_seed(seed * 1_000_003 + b)
        sampling = dict(do_sample=True, temperature=1.0, top_k=0, top_p=1.0) if do_sample else dict(do_sample=False)
        seqs = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                              num_return_sequences=num_return_sequences, eos_token_id=eos,
                              pad_token_id=tokenizer.pad_token_id, **sampling)
        for row in seqs[:, ids.shape[1]:].tolist():
            out.append(row[:row.index(eos) + 1] if eos in row else row)
    return out


def sample_responses(model, tokenizer, questions: Sequence[str], references: Sequence[str], *,
                     responses_per_prompt: int, max_new_tokens: int, seed: int,
                     batch_size: int = 64) -> list[Response]:
    """R sampled responses (temperature 1) of ``model`` per question, graded against ``references``."""
    rows = generate(model, tokenizer, questions, max_new_tokens=max_new_tokens, do_sample=True,
                    num_return_sequences=responses_per_prompt, batch_size=max(1, batch_size // responses_per_prompt),
                    seed=seed, desc="sample responses")
    out = []
    for i, (question, reference) in enumerate(zip(questions, references)):
        ids = tuple(encode_prompt(tokenizer, question))
        for r in range(responses_per_prompt):
            response = rows[i * responses_per_prompt + r]
            out.append(_response(tokenizer, i, r, question, reference, ids, response))
    return out


def reference_responses(tokenizer, problems: Iterable) -> list[Response]:
    """The problems' own worked answers as responses (``--responses reference``; one per prompt)."""
    out = []
    for i, p in enumerate(problems):
        out.append(_response(tokenizer, i, 0, p.question, p.final, tuple(encode_prompt(tokenizer, p.question)),
                             encode_response(tokenizer, p.answer)))
    return out


def _response(tokenizer, prompt: int, sample: int, question: str, reference: str, ids: tuple,
              response: list[int]) -> Response:
    text = tokenizer.decode(response, skip_special_tokens=True)
    finished = bool(response) and response[-1] == tokenizer.eos_token_id
    return Response(prompt, sample, question, reference, ids, tuple(response), text, finished,
                    is_correct(text, reference))


def write_responses(path: Path, responses: Sequence[Response]) -> None:
    """Write ``responses.jsonl`` atomically (temporary file + ``os.replace``)."""
    write_jsonl(path, [asdict(r) for r in responses])


def read_responses(path: Path, vocab_size: Optional[int] = None) -> list[Response]:
    """Read ``responses.jsonl``.

    Raises:
        ValueError: a missing or malformed file (names the line), or token ids outside
            ``[0, vocab_size)`` (responses of another tokenizer).
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"no responses at {path}")
    out = []
    with open(path) as f:
        for n, line in enumerate(f, start=1):
            try:
                row = json.loads(line)
                row["prompt_ids"], row["response_ids"] = tuple(row["prompt_ids"]), tuple(row["response_ids"])
                r = Response(**row)
            except (json.JSONDecodeError, TypeError, KeyError) as exc:
                raise ValueError(f"{path}:{n} is not a response record: {exc}") from exc
            if vocab_size is not None and any(not 0 <= t < vocab_size for t in r.prompt_ids + r.response_ids):
                raise ValueError(f"{path}:{n} has token ids outside the model's vocabulary [0, {vocab_size}): "
                                 "these responses were made with another tokenizer")
            out.append(r)
    if not out:
        raise ValueError(f"{path} holds no responses")
    return out
