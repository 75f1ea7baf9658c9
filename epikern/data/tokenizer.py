"""A character-level tokenizer for the tiny models, built with ``tokenizers`` and wrapped as an HF
fast tokenizer, so it saves (``save_pretrained``), loads (``AutoTokenizer.from_pretrained``),
pads and decodes like any other.

Ids: ``<pad>`` 0, ``<bos>`` 1, ``<eos>`` 2, ``<unk>`` 3, then one id per character of the alphabet in
order (default: printable ASCII, space to ``~``, then newline: 100 ids). Encoding splits the text
into single characters (a ``WordLevel`` model over characters behind a pre-tokenizer that isolates
each one; characters outside the alphabet map to ``<unk>``), and prepends ``<bos>`` when
``add_special_tokens=True`` (the default), as Llama's tokenizer does. Decoding concatenates the
characters (``decoders.Fuse``, no clean-up of spaces), so
``tok.decode(tok(text).input_ids, skip_special_tokens=True) == text`` for any text in the alphabet.
``<eos>`` is never added by encoding: the caller appends it to training responses.
"""

from __future__ import annotations

from typing import Iterable, Optional

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

__all__ = ["DEFAULT_ALPHABET", "SPECIAL_TOKENS", "char_tokenizer"]

#: pad, bos, eos, unk: ids 0..3 in this order.
SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<unk>")
#: Printable ASCII (space through ``~``) and newline: everything the synthetic generator, GSM8K's
#: ASCII lines and the plain prompt format emit.
DEFAULT_ALPHABET = "".join(chr(c) for c in range(32, 127)) + "\n"


def char_tokenizer(alphabet: Optional[Iterable[str]] = None) -> PreTrainedTokenizerFast:
    """A character-level ``PreTrainedTokenizerFast`` over ``alphabet`` (default
    :data:`DEFAULT_ALPHABET`); vocabulary = the 4 special tokens + one id per character.

    Args:
        alphabet: a string or iterable of single characters; repeats are dropped (first one kept).

    Raises:
        ValueError: an element that is not exactly one character, or an empty alphabet.
    """
    chars = list(DEFAULT_ALPHABET if alphabet is None else alphabet)
    for c in chars:
        if not isinstance(c, str) or len(c) != 1:
            raise ValueError(f"alphabet entries must be single characters, got {c!r}")
    chars = list(dict.fromkeys(chars))
    if not chars:
        raise ValueError("alphabet is empty")
    pad, bos, eos, unk = SPECIAL_TOKENS
    vocab = {token: i for i, token in enumerate([*SPECIAL_TOKENS, *chars])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=unk))
    # [\s\S]: any character, newline included (Oniguruma's "." skips newlines).
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    backend.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A $B:1", special_tokens=[(bos, vocab[bos])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=pad,
        bos_token=bos,
        eos_token=eos,
        unk_token=unk,
        padding_side="right",
        clean_up_tokenization_spaces=False,
    )
