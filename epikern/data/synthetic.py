"""Seeded GSM8K-format multi-step arithmetic word problems, for the tiny character-level models.

One problem is a running count changed by a few operations::

    question: "Mia has 37 coins. She finds 8 more. Then she has 3 times as many.
               How many coins does Mia have now?"
    answer:   "37+8=<<37+8=45>>45\\n45*3=<<45*3=135>>135\\n#### 135"

The answer is in GSM8K's format (one step per line, ``<<a op b=c>>`` calculator annotations, last
line ``#### N``) and grades with :func:`epikern.data.is_correct`. Difficulty follows
:class:`SyntheticConfig`: more steps, more operand digits and ``*``/``/`` make a tiny model wrong
more often; the default (1-3 steps, 1-2 digit operands, + - *) gives questions plus answers of
about 80-200 characters.

Generation uses only ``random.Random(seed)`` (no global state, no ``hash()``), so a seed gives the
same problems in every process and on every platform.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Iterable, Optional, Sequence

from .gsm8k import Problem

__all__ = ["OPERATIONS", "SyntheticConfig", "generate_problems", "generate_splits"]

#: The operations a problem may use; "/" is exact integer division (the divisor divides the count).
OPERATIONS = ("+", "-", "*", "/")

# (name, pronoun); the pronoun starts the first step sentence and follows "Then" in later ones.
_PEOPLE = (
    ("Tom", "He"), ("Mia", "She"), ("Sam", "He"), ("Ana", "She"), ("Ben", "He"), ("Lily", "She"),
    ("Max", "He"), ("Zoe", "She"), ("Leo", "He"), ("Ada", "She"), ("Omar", "He"), ("Ivy", "She"),
)
_OBJECTS = ("apples", "pens", "cards", "coins", "books", "eggs", "stamps", "marbles", "shells",
            "stickers", "cookies", "balls")
_PHRASES = {
    "+": ("buys {k} more", "finds {k} more", "gets {k} more", "wins {k} more"),
    "-": ("gives away {k}", "loses {k}", "sells {k}", "gives {k} to a friend"),
    "*": ("has {k} times as many", "ends up with {k} times as many"),
    "/": ("keeps 1/{k} of them", "splits them into {k} equal piles and keeps one"),
}
# Seed offset of the held-out set in generate_splits (any fixed number far from small seeds).
_HELDOUT_SEED_OFFSET = 1_000_003


@dataclass(frozen=True)
class SyntheticConfig:
    """Knobs of the synthetic task.

    Attributes:
        steps: (min, max) operations per problem, inclusive, min >= 1.
        digits: (min, max) digits of the starting count and of ``+``/``-`` operands, inclusive,
            min >= 1 (1 digit: 1-9, 2 digits: 10-99, ...).
        ops: the operations to draw from, a non-empty subset of ``"+" "-" "*" "/"``.
        factor_max: multipliers and divisors are drawn from 2..factor_max (>= 2).
        nonnegative: keep every intermediate count >= 0 (``-`` never takes more than there is).
        seed: the default seed of :func:`generate_problems` and :func:`generate_splits`.
    """

    steps: tuple[int, int] = (1, 3)
    digits: tuple[int, int] = (1, 2)
    ops: tuple[str, ...] = ("+", "-", "*")
    factor_max: int = 9
    nonnegative: bool = True
    seed: int = 0

    def __post_init__(self):
        object.__setattr__(self, "steps", _int_range("steps", self.steps))
        object.__setattr__(self, "digits", _int_range("digits", self.digits))
        ops = tuple(self.ops) if not isinstance(self.ops, str) else (self.ops,)
        if not ops or any(op not in OPERATIONS for op in ops) or len(set(ops)) != len(ops):
            raise ValueError(f"ops must be distinct operations among {OPERATIONS}, got {self.ops!r}")
        object.__setattr__(self, "ops", ops)
        if isinstance(self.factor_max, bool) or not isinstance(self.factor_max, int) or self.factor_max < 2:
            raise ValueError(f"factor_max must be an int >= 2, got {self.factor_max!r}")
        if not isinstance(self.nonnegative, bool):
            raise ValueError(f"nonnegative must be a bool, got {self.nonnegative!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"seed must be an int, got {self.seed!r}")


def _int_range(field: str, value) -> tuple[int, int]:
    try:
        low, high = value
    except (TypeError, ValueError):
        raise ValueError(f"{field} must be a (min, max) pair of ints, got {value!r}") from None
    if any(isinstance(v, bool) or not isinstance(v, int) for v in (low, high)):
        raise ValueError(f"{field} must be a (min, max) pair of ints, got {value!r}")
    if not 1 <= low <= high:
        raise ValueError(f"{field} must satisfy 1 <= min <= max, got {value!r}")
    return low, high


def generate_problems(
    n: int,
    config: Optional[SyntheticConfig] = None,
    seed: Optional[int] = None,
    *,
    exclude: Iterable[Problem] = (),
) -> list[Problem]:
    """``n`` distinct synthetic problems, the same for the same ``(config, seed)`` everywhere.

    Args:
        n: how many problems (>= 0).
        config: the knobs (default :class:`SyntheticConfig()`).
        seed: overrides ``config.seed``.
        exclude: problems to avoid: a generated problem whose question or worked answer equals one
            of theirs is skipped (so a held-out set shares no computation with a training set).

    Returns:
        ``Problem(question, answer, final, id="synthetic-<seed>-<index>")``; questions are distinct.

    Raises:
        ValueError: ``n`` < 0, or the config cannot yield ``n`` distinct problems (too few
            combinations of steps, digits and operations).
    """
    config = SyntheticConfig() if config is None else config
    if not isinstance(config, SyntheticConfig):
        raise TypeError(f"config must be a SyntheticConfig, got {type(config).__name__}")
    seed = config.seed if seed is None else seed
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an int, got {seed!r}")
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be a non-negative int, got {n!r}")
    excluded = set()
    for problem in exclude:
        excluded.update((problem.question, problem.answer))
    rng = random.Random(seed)
    problems: list[Problem] = []
    seen: set[str] = set()
    attempts = 0
    max_attempts = 50 * n + 1000
    while len(problems) < n:
        attempts += 1
        if attempts > max_attempts:
            raise ValueError(f"found only {len(problems)} of {n} distinct problems in {max_attempts} "
                             f"draws; widen the config ({config})")
        drawn = _draw(rng, config)
        if drawn is None:
            continue
        question, answer, final = drawn
        if question in seen or question in excluded or answer in excluded:
            continue
        seen.add(question)
        problems.append(Problem(question, answer, final, f"synthetic-{seed}-{len(problems)}"))
    return problems


def generate_splits(
    n_train: int, n_heldout: int, config: Optional[SyntheticConfig] = None
) -> tuple[list[Problem], list[Problem]]:
    """Disjoint ``(train, heldout)`` sets: train from ``config.seed``, held-out from another seed,
    without any question or worked answer of the training set."""
    config = SyntheticConfig() if config is None else config
    train = generate_problems(n_train, config)
    heldout = generate_problems(n_heldout, config, config.seed + _HELDOUT_SEED_OFFSET, exclude=train)
    return train, heldout


def _operand(rng: random.Random, digits: tuple[int, int]) -> int:
    d = rng.randint(*digits)
    return rng.randint(10 ** (d - 1), 10**d - 1)


def _feasible(op: str, count: int, config: SyntheticConfig) -> Sequence[int]:
    """The operands ``op`` may take at ``count`` (empty: not applicable); ``+``/``-`` use digits."""
    if op == "-" and config.nonnegative and count < 1:
        return ()
    if op == "/":
        return [k for k in range(2, config.factor_max + 1) if count > 0 and count % k == 0]
    if op == "*":
        return range(2, config.factor_max + 1)
    return (None,)  # +/-: drawn from the digit range


def _draw(rng: random.Random, config: SyntheticConfig) -> Optional[tuple[str, str, str]]:
    """One problem as (question, answer, final), or None where no operation applies mid-way."""
    name, pronoun = rng.choice(_PEOPLE)
    thing = rng.choice(_OBJECTS)
    count = _operand(rng, config.digits)
    sentences = [f"{name} has {count} {thing}."]
    lines = []
    for step in range(rng.randint(*config.steps)):
        options = {op: _feasible(op, count, config) for op in config.ops}
        options = {op: ks for op, ks in options.items() if ks}
        if not options:
            return None
        op = rng.choice(sorted(options))
        k = rng.choice(options[op])
        if k is None:
            k = _operand(rng, config.digits)
            if op == "-" and config.nonnegative and k > count:
                k = rng.randint(1, count)
        result = {"+": count + k, "-": count - k, "*": count * k, "/": count // k}[op]
        phrase = rng.choice(_PHRASES[op]).format(k=k)
        sentences.append(f"{pronoun} {phrase}." if step == 0 else f"Then {pronoun.lower()} {phrase}.")
        expr = f"{count}{op}{k}"
        lines.append(f"{expr}=<<{expr}={result}>>{result}")
        count = result
    sentences.append(f"How many {thing} does {name} have now?")
    lines.append(f"#### {count}")
    return " ".join(sentences), "\n".join(lines), str(count)
