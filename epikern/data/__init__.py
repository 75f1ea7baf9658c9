"""Data for training and evaluation (design §6): GSM8K, the synthetic task, tokenisation, prompts.

    from epikern.data import load_gsm8k, generate_splits, char_tokenizer, format_prompt, is_correct

    test = load_gsm8k("test")                        # list[Problem]: question, answer, final, id
    train, heldout = generate_splits(2000, 200)      # synthetic GSM8K-format problems, disjoint
    tok = char_tokenizer()                           # HF fast tokenizer, one id per character
    prompt = format_prompt(tok, train[0].question)   # "Question: ...\\nAnswer: " (or a chat template)
    is_correct("... #### 18", test[0].final)         # grade the number after the last ####
"""

from ..extras import require

require("models", "epikern.data")  # the tokenizer is a transformers one

from .gsm8k import (GSM8K_SPLITS, Problem, extract_answer, is_correct, load_gsm8k, normalize_number,
                    packaged_gsm8k)
from .prompts import (PLAIN_PROMPT, encode_prompt, encode_prompts, encode_response, format_prompt,
                      format_response, uses_chat_template)
from .synthetic import OPERATIONS, SyntheticConfig, generate_problems, generate_splits
from .tokenizer import DEFAULT_ALPHABET, SPECIAL_TOKENS, char_tokenizer

__all__ = [
    "DEFAULT_ALPHABET",
    "GSM8K_SPLITS",
    "OPERATIONS",
    "PLAIN_PROMPT",
    "Problem",
    "SPECIAL_TOKENS",
    "SyntheticConfig",
    "char_tokenizer",
    "encode_prompt",
    "encode_prompts",
    "encode_response",
    "extract_answer",
    "format_prompt",
    "format_response",
    "generate_problems",
    "generate_splits",
    "is_correct",
    "load_gsm8k",
    "normalize_number",
    "packaged_gsm8k",
    "uses_chat_template",
]
