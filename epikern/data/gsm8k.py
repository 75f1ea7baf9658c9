"""GSM8K: the :class:`Problem` record, the jsonl loader and the ``#### N`` grader.

GSM8K (Cobbe et al. 2021, https://github.com/openai/grade-school-math, MIT licence: see
``gsm8k/LICENSE`` next to this file) ships one JSON object per line::

    {"question": "Janet's ducks lay 16 eggs per day. ...",
     "answer": "Janet sells 16 - 3 - 4 = <<16-3-4=9>>9 duck eggs a day.\\n...\\n#### 18"}

The worked answer has one step per line, ``<<expr=value>>`` calculator annotations, and ends with
``#### N``, the final answer. The package carries both splits gzipped (``gsm8k/train.jsonl.gz``,
7473 problems; ``gsm8k/test.jsonl.gz``, 1319 problems), so nothing is downloaded.

Grading (:func:`extract_answer`, :func:`is_correct`): the final answer is the number right after the
LAST ``####`` of a response, normalised by :func:`normalize_number`, compared exactly (as a decimal
number) with the reference's. A response without ``####`` has no answer and is wrong, unless the
caller opts in to ``fallback_last_number=True`` (then its last number counts).
"""

from __future__ import annotations

import gzip
import json
import re
from dataclasses import dataclass
from decimal import Decimal
from importlib import resources
from os import PathLike
from pathlib import Path
from typing import Optional, Union

__all__ = [
    "GSM8K_SPLITS",
    "Problem",
    "extract_answer",
    "is_correct",
    "load_gsm8k",
    "normalize_number",
    "packaged_gsm8k",
]

GSM8K_SPLITS = ("train", "test")
ANSWER_MARK = "####"


@dataclass(frozen=True)
class Problem:
    """One GSM8K-format problem.

    Attributes:
        question: the word problem.
        answer: the worked answer, one step per line, ``<<a+b=c>>`` annotations, last line ``#### N``.
        final: the final answer ``N``, normalised by :func:`normalize_number` (e.g. ``"70000"``).
        id: a unique name, ``"gsm8k-<split>-<index>"`` or ``"synthetic-<seed>-<index>"``.
    """

    question: str
    answer: str
    final: str
    id: str


# ---------------------------------------------------------------------------------------------
# Grader

# A number at the start of a string: optional sign and `$` in either order (spaces allowed between
# them), then digits with optional thousands commas, then an optional fraction (".5" allowed).
_NUMBER = re.compile(
    r"(?P<sign>[-+\u2212]?)\s*\$?\s*(?P<sign2>[-+\u2212]?)\s*"
    r"(?P<int>\d{1,3}(?:,\d{3})+(?!\d)|\d+)?(?P<frac>\.\d+)?"
)
# What may not follow a number: more of a number we do not read ("1,2", "1.2.3", "1/2", "1e5",
# "1 000"); such an answer is ambiguous and grades as no answer.
_CONTINUES = re.compile(r"[.,]?\d|/\d|[eE][-+]?\d|[ \t]+\d")
# Any number inside free text, for the opt-in fallback of extract_answer.
# A sign counts only where it cannot be a binary minus ("7-3" holds 7 and 3, not -3).
_ANY_NUMBER = re.compile(r"(?<![\w)])[-\u2212]?\$?(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?")


def normalize_number(text: str) -> Optional[str]:
    """The number at the start of ``text`` in canonical form, or None if it does not start with one.

    Tolerated around the number: surrounding spaces, a leading ``$`` and ``+``/``-`` (either order,
    ``-$5`` or ``$-5``), thousands commas (``1,000``), trailing ``.0``/``.00``, and anything after it
    that does not continue a number (units and words: ``"18 dollars"``, ``"50%"``, ``"18."``).
    Canonical form: no commas or ``$``, integers without a decimal point, decimals without trailing
    zeros, ``-`` for negative numbers, ``0`` rather than ``-0``::

        "$1,000.00" -> "1000"    "-3.50 m" -> "-3.5"    ".5" -> "0.5"    "+7" -> "7"

    Returns None for text that starts with a word (``"about 5"``) or whose number goes on in a form
    this does not read (``"1,2"``, ``"1/2"``, ``"1.2.3"``, ``"1e5"``, ``"1 000"``).
    """
    if not isinstance(text, str):
        raise TypeError(f"normalize_number expects a str, got {type(text).__name__}")
    text = text.strip()
    match = _NUMBER.match(text)
    if match is None or (match["int"] is None and match["frac"] is None):
        return None
    if match["sign"] and match["sign2"]:
        return None
    if _CONTINUES.match(text, match.end()):
        return None
    value = Decimal((match["int"] or "0").replace(",", "") + (match["frac"] or ""))
    if (match["sign"] or match["sign2"]) in ("-", "\u2212"):
        value = -value
    return _canonical(value)


def _canonical(value: Decimal) -> str:
    if value == value.to_integral_value():
        return str(int(value))
    return format(value.normalize(), "f")


def extract_answer(text: str, *, fallback_last_number: bool = False) -> Optional[str]:
    """The final answer of a GSM8K-format response: the number after its LAST ``####``, normalised.

    ``"... so 9*2=<<9*2=18>>18\\n#### $18 dollars"`` -> ``"18"``. The number must come first after
    ``####`` (``"#### The answer is 18"`` -> None). Without ``####`` the result is None (no answer)
    unless ``fallback_last_number=True``, which takes the last number anywhere in the text instead
    (off by default: GSM8K answers and the tiny models trained on the synthetic task end with
    ``#### N``). SmolLM2-135M-Instruct, prompted with the bare question, mostly ends in prose
    ("So, the final answer is 12 bolts.") without ``####``: grade its replies with the fallback on.
    """
    if not isinstance(text, str):
        raise TypeError(f"extract_answer expects a str, got {type(text).__name__}")
    mark = text.rfind(ANSWER_MARK)
    if mark >= 0:
        return normalize_number(text[mark + len(ANSWER_MARK):])
    if not fallback_last_number:
        return None
    numbers = _ANY_NUMBER.findall(text)
    return normalize_number(numbers[-1]) if numbers else None


def is_correct(response: str, reference: str, *, fallback_last_number: bool = False) -> bool:
    """Whether ``response``'s final answer equals ``reference``'s, as numbers.

    ``reference`` is a GSM8K worked answer (ending ``#### N``) or a bare number (``"18"``,
    ``Problem.final``). Both are normalised by :func:`normalize_number`, so ``"#### 18.0"``,
    ``"#### $18"`` and ``"#### 18 dollars"`` are right for 18, and ``"#### 1,000"`` for 1000.
    A response without an answer (see :func:`extract_answer`) is wrong.

    Raises:
        ValueError: the reference has no readable number (a bad reference is the caller's bug).
    """
    if not isinstance(reference, str):
        raise TypeError(f"is_correct expects a str reference, got {type(reference).__name__}")
    expected = extract_answer(reference) if ANSWER_MARK in reference else normalize_number(reference)
    if expected is None:
        raise ValueError(f"reference {reference[-80:]!r} has no final answer to grade against")
    return extract_answer(response, fallback_last_number=fallback_last_number) == expected


# ---------------------------------------------------------------------------------------------
# Loader


def packaged_gsm8k(split: str) -> Path:
    """Path of the copy of ``split`` shipped with epikern (``epikern/data/gsm8k/<split>.jsonl.gz``)."""
    _check_split(split)
    return Path(str(resources.files("epikern.data") / "gsm8k" / f"{split}.jsonl.gz"))


def load_gsm8k(
    split: str = "test",
    path: Union[str, PathLike, None] = None,
    limit: Optional[int] = None,
) -> list[Problem]:
    """GSM8K problems of one split, in file order.

    Args:
        split: ``"test"`` (1319 problems) or ``"train"`` (7473).
        path: None for the packaged copy; a directory holding ``<split>.jsonl`` (or
            ``<split>.jsonl.gz``), e.g. ``../shared/data/gsm8k``; or a ``.jsonl``/``.jsonl.gz`` file.
        limit: read only the first ``limit`` problems (None: all).

    Returns:
        ``Problem(question, answer, final, id="gsm8k-<split>-<index>")`` per line, ``final`` being
        the normalised number after ``####``. Blank lines are skipped.

    Raises:
        FileNotFoundError: no such file (the message names the path looked for).
        ValueError: a bad ``split``/``limit``, or a malformed line: not JSON, not an object with
            string ``question`` and ``answer``, or no readable ``#### N`` (the message names the
            file and the line number).
    """
    _check_split(split)
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 0):
        raise ValueError(f"limit must be None or a non-negative int, got {limit!r}")
    file = packaged_gsm8k(split) if path is None else _resolve(Path(path), split)
    if not file.is_file():
        raise FileNotFoundError(f"GSM8K {split} split not found: {file}")
    problems: list[Problem] = []
    opener = gzip.open if file.suffix == ".gz" else open
    with opener(file, "rt", encoding="utf-8") as lines:
        for lineno, line in enumerate(lines, start=1):
            if limit is not None and len(problems) >= limit:
                break
            if not line.strip():
                continue
            question, answer, final = _parse_line(line, f"{file}:{lineno}")
            problems.append(Problem(question, answer, final, f"gsm8k-{split}-{len(problems)}"))
    return problems


def _check_split(split: str) -> None:
    if split not in GSM8K_SPLITS:
        raise ValueError(f"split must be one of {GSM8K_SPLITS}, got {split!r}")


def _resolve(path: Path, split: str) -> Path:
    if not path.is_dir():
        return path
    for name in (f"{split}.jsonl", f"{split}.jsonl.gz"):
        if (path / name).is_file():
            return path / name
    return path / f"{split}.jsonl"


def _parse_line(line: str, where: str) -> tuple[str, str, str]:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        raise ValueError(f"{where}: not valid JSON ({err.msg} at column {err.colno})") from None
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
    for key in ("question", "answer"):
        if not isinstance(record.get(key), str):
            raise ValueError(f"{where}: missing string field {key!r} (keys: {sorted(record)})")
    final = extract_answer(record["answer"])
    if final is None:
        raise ValueError(f"{where}: answer does not end with a readable '#### N': "
                         f"{record['answer'][-60:]!r}")
    return record["question"], record["answer"], final
