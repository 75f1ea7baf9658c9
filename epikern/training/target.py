"""``epikern train target``: the tiny Llama-style target on the synthetic task, and its responses.

Steps (each one resumable):

1. a random ``LlamaForCausalLM`` (:class:`TinyModelConfig`) over the character vocabulary of
   :func:`epikern.data.char_tokenizer`;
2. cross-entropy on the worked answers (``prompt + answer + eos``; the prompt is context only) of
   ``train_problems`` synthetic problems (:func:`epikern.training.loop.train`);
3. greedy answers to ``heldout_problems`` disjoint problems, graded (the accuracy is the point: the
   target must be right on some and wrong on others, so that there is something to detect);
4. R responses per training prompt sampled at temperature 1 (the drafts' data).

Output directory (loadable by ``load_causal_lm(out)``)::

    config.json, model.safetensors, generation_config.json, tokenizer*.json   the HF model
    recipe.json        the TargetRecipe                  responses.jsonl   see epikern.training.responses
    heldout.jsonl      question, reference, greedy response (and ids), correct   metrics.json  accuracy, losses
    checkpoints/target.safetensors
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Optional

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from ..data import SyntheticConfig, char_tokenizer, encode_prompt, encode_response, generate_splits, is_correct
from .batches import Example
from .config import TargetRecipe, TinyModelConfig, to_dict
from .distributed import Distributed, setup
from .loop import train
from .losses import CrossEntropy
from .outputs import claim, save_pretrained, write_json, write_jsonl
from .responses import RESPONSES_NAME, generate, sample_responses, write_responses

CHECKPOINT = Path("checkpoints") / "target.safetensors"
METRICS_NAME = "metrics.json"
HELDOUT_NAME = "heldout.jsonl"


def tiny_target(tokenizer, config: TinyModelConfig, seed: int) -> torch.nn.Module:
    """A randomly initialised (seeded) Llama causal LM over ``tokenizer``'s vocabulary."""
    hf = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_layers, num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_kv_heads, max_position_embeddings=config.max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(hf, dtype=torch.float32)


def problem_examples(tokenizer, problems) -> list[Example]:
    """``prompt + answer + eos`` per problem; the answer tokens (and eos) are counted."""
    out = []
    for p in problems:
        prompt = encode_prompt(tokenizer, p.question)
        out.append(Example(tuple(prompt + encode_response(tokenizer, p.answer)), len(prompt)))
    return out


def heldout_accuracy(model, tokenizer, problems, *, max_new_tokens: int) -> tuple[float, list[dict]]:
    """Greedy answers to ``problems`` graded with :func:`epikern.data.is_correct`: (accuracy, rows).

    A row (a line of ``heldout.jsonl``): ``id``, ``question``, ``reference`` (final answer),
    ``prompt_ids``, ``response_ids`` (the greedy tokens, eos included if emitted), ``response``
    (decoded) and ``correct``.
    """
    answers = generate(model, tokenizer, [p.question for p in problems], max_new_tokens=max_new_tokens,
                       do_sample=False, batch_size=100, desc="held-out answers")
    rows = []
    for p, ids in zip(problems, answers):
        text = tokenizer.decode(ids, skip_special_tokens=True)
        rows.append({"id": p.id, "question": p.question, "reference": p.final,
                     "prompt_ids": encode_prompt(tokenizer, p.question), "response_ids": ids, "response": text,
                     "correct": is_correct(text, p.final)})
    return sum(r["correct"] for r in rows) / max(len(rows), 1), rows


def read_heldout(path: Path) -> list[dict]:
    """The rows of a ``heldout.jsonl`` (see :func:`heldout_accuracy`)."""
    with open(path) as f:
        return [json.loads(line) for line in f]


def heldout_examples(rows: list[dict]) -> list[Example]:
    """The held-out prompts with the target's greedy responses as counted tokens (for diagnostics)."""
    return [Example(tuple(r["prompt_ids"] + r["response_ids"]), len(r["prompt_ids"])) for r in rows]


def train_target(recipe: TargetRecipe, out: Path, *, resume: bool = False, dist: Optional[Distributed] = None,
                 progress: bool = True) -> dict:
    """Run the whole recipe into ``out`` (see the module docstring); returns ``metrics.json``'s dict.

    Raises:
        CheckpointError: ``out`` holds another run, or ``resume`` finds no, a corrupt, or a different run.
    """
    dist = dist or setup()
    out = claim(Path(out), to_dict(recipe), resume=resume, dist=dist)
    t0 = time.perf_counter()
    tokenizer = char_tokenizer()
    train_problems, heldout = generate_splits(recipe.train_problems, recipe.heldout_problems,
                                              SyntheticConfig(**recipe.synthetic))
    model = tiny_target(tokenizer, recipe.model, recipe.train.seed)
    result = train(CrossEntropy(model), problem_examples(tokenizer, train_problems), recipe.train,
                   pad_id=tokenizer.pad_token_id, run_config=to_dict(recipe), checkpoint=out / CHECKPOINT,
                   resume=resume and (out / CHECKPOINT).is_file(), dist=dist, desc="train target",
                   progress=progress)
    train_seconds = time.perf_counter() - t0
    metrics = {}
    if dist.is_main:
        model.eval()
        save_pretrained(model, out, tokenizer)
        accuracy, rows = heldout_accuracy(model, tokenizer, heldout, max_new_tokens=recipe.max_new_tokens)
        write_jsonl(out / HELDOUT_NAME, rows)
        prompts = train_problems[:recipe.response_prompts]
        responses = sample_responses(model, tokenizer, [p.question for p in prompts], [p.final for p in prompts],
                                     responses_per_prompt=recipe.responses_per_prompt,
                                     max_new_tokens=recipe.max_new_tokens, seed=recipe.train.seed)
        write_responses(out / RESPONSES_NAME, responses)
        metrics = {
            "heldout_accuracy": accuracy, "heldout_problems": len(heldout),
            "response_accuracy": sum(r.correct for r in responses) / len(responses),
            "responses": len(responses), "responses_finished": sum(r.finished for r in responses) / len(responses),
            "final_train_loss": result.losses[-1], "train_tokens_per_second": result.tokens_per_second,
            "seconds": {"train": train_seconds, "total": time.perf_counter() - t0},
        }
        write_json(out / METRICS_NAME, metrics)
    dist.barrier()
    return metrics
