"""The synthetic generator: determinism, disjoint splits, correct arithmetic, the knobs, bad configs."""

from __future__ import annotations

import operator
import re
import statistics

import pytest

from epikern.data import SyntheticConfig, generate_problems, generate_splits, is_correct

# "a op b=<<a op b=c>>c", the operator between two integers (a may be negative when allowed).
_LINE = re.compile(r"(?P<a>-?\d+)(?P<op>[-+*/])(?P<b>\d+)=<<(?P=a)(?P=op)(?P=b)=(?P<c>-?\d+)>>(?P=c)")
_APPLY = {"+": operator.add, "-": operator.sub, "*": operator.mul}


def _steps(problem):
    """[(a, op, b, c)] of a worked answer, checking its layout: step lines, then '#### c_last'."""
    *lines, last = problem.answer.split("\n")
    steps = []
    for line in lines:
        m = _LINE.fullmatch(line)
        assert m, f"not a calculator line: {line!r} in {problem.answer!r}"
        steps.append((int(m["a"]), m["op"], int(m["b"]), int(m["c"])))
    assert last == f"#### {steps[-1][3]}" == f"#### {problem.final}"
    return steps


def _check_arithmetic(problem):
    steps = _steps(problem)
    start = int(re.search(r" has (\d+) ", problem.question).group(1))
    assert steps[0][0] == start
    for (a, op, b, c), following in zip(steps, steps[1:] + [None]):
        if op == "/":
            assert a % b == 0 and a // b == c, problem.answer
        else:
            assert _APPLY[op](a, b) == c, problem.answer
        assert following is None or following[0] == c, "each step starts from the previous result"
        assert str(b) in problem.question
    return steps


def test_deterministic_and_pinned():
    config = SyntheticConfig()
    first = generate_problems(50, config)
    assert first == generate_problems(50, config, seed=0) == generate_problems(50, SyntheticConfig())
    assert generate_problems(50, config, seed=1) != first
    assert generate_problems(20, config) == first[:20]
    # random.Random(int) is the same on every platform and Python version: pin the first problem
    # so that a change in the generator (which would change every stored dataset) is noticed.
    assert first[0].question == ("Max has 5 stamps. He gets 71 more. Then he loses 5. "
                                 "Then he has 6 times as many. How many stamps does Max have now?")
    assert first[0].answer == "5+71=<<5+71=76>>76\n76-5=<<76-5=71>>71\n71*6=<<71*6=426>>426\n#### 426"
    assert first[0].final == "426" and first[0].id == "synthetic-0-0"


@pytest.mark.parametrize("config", [
    SyntheticConfig(),
    SyntheticConfig(steps=(2, 4), digits=(1, 3), ops=("+", "-", "*", "/"), factor_max=5, seed=3),
    SyntheticConfig(steps=(1, 1), digits=(2, 2), ops=("/",), seed=4),
])
def test_answers_grade_and_arithmetic_is_right(config):
    problems = generate_problems(300, config)
    assert len({p.question for p in problems}) == 300
    assert len({p.id for p in problems}) == 300
    for p in problems:
        steps = _check_arithmetic(p)
        assert config.steps[0] <= len(steps) <= config.steps[1]
        assert is_correct(p.answer, p.final) and is_correct(p.answer, p.answer)
        assert not is_correct(p.answer, str(int(p.final) + 1))
        for a, op, b, c in steps:
            assert op in config.ops
            assert c >= 0
            if op in "+-":
                assert config.digits[0] <= len(str(b)) <= config.digits[1]
            else:
                assert 2 <= b <= config.factor_max
        assert config.digits[0] <= len(str(steps[0][0])) <= config.digits[1]


def test_default_length_suits_a_character_model():
    lengths = [len(p.question) + len(p.answer) for p in generate_problems(500)]
    print(f"question+answer characters: min {min(lengths)}, mean {statistics.mean(lengths):.0f}, "
          f"max {max(lengths)}")
    assert 80 <= statistics.mean(lengths) <= 200
    assert max(lengths) < 300


def test_every_operation_and_step_count_occurs():
    config = SyntheticConfig(steps=(1, 3), ops=("+", "-", "*", "/"))
    steps = [_steps(p) for p in generate_problems(400, config)]
    assert {len(s) for s in steps} == {1, 2, 3}
    assert {op for s in steps for _, op, _, _ in s} == {"+", "-", "*", "/"}


def test_negative_results_only_when_allowed():
    config = SyntheticConfig(steps=(3, 3), digits=(1, 1), ops=("-",), nonnegative=False)
    problems = generate_problems(100, config)
    for p in problems:
        _check_arithmetic(p)
        assert is_correct(p.answer, p.final)
    assert any(int(p.final) < 0 for p in problems)
    kept = generate_problems(100, SyntheticConfig(steps=(3, 3), digits=(1, 1), ops=("-",)))
    assert all(c >= 0 for p in kept for *_, c in _steps(p))


def test_splits_are_disjoint_and_deterministic():
    config = SyntheticConfig(seed=7)
    train, heldout = generate_splits(1000, 200, config)
    assert (train, heldout) == generate_splits(1000, 200, config)
    assert len(train) == 1000 and len(heldout) == 200
    assert not {p.question for p in train} & {p.question for p in heldout}
    assert not {p.answer for p in train} & {p.answer for p in heldout}
    assert not {p.id for p in train} & {p.id for p in heldout}


def test_exclude_and_exhaustion():
    # 1 step of "* 2" on a 1-digit count: only 9 distinct worked answers exist.
    config = SyntheticConfig(steps=(1, 1), digits=(1, 1), ops=("*",), factor_max=2)
    pool = generate_problems(300, config)
    assert len({p.answer for p in pool}) == 9
    with pytest.raises(ValueError, match="found only 0 of 1 distinct problems"):
        generate_problems(1, config, seed=1, exclude=pool)
    assert generate_problems(0, config) == []


@pytest.mark.parametrize("kwargs,field", [
    ({"steps": (0, 2)}, "steps"),
    ({"steps": (3, 1)}, "steps"),
    ({"steps": 3}, "steps"),
    ({"steps": (1.0, 2)}, "steps"),
    ({"digits": (0, 1)}, "digits"),
    ({"digits": (2,)}, "digits"),
    ({"ops": ()}, "ops"),
    ({"ops": ("+", "^")}, "ops"),
    ({"ops": ("+", "+")}, "ops"),
    ({"factor_max": 1}, "factor_max"),
    ({"nonnegative": 1}, "nonnegative"),
    ({"seed": "0"}, "seed"),
])
def test_bad_config(kwargs, field):
    with pytest.raises(ValueError, match=f"^{field} "):
        SyntheticConfig(**kwargs)


def test_bad_arguments():
    with pytest.raises(ValueError, match="^n "):
        generate_problems(-1)
    with pytest.raises(ValueError, match="^seed "):
        generate_problems(1, seed=1.5)
    with pytest.raises(TypeError, match="SyntheticConfig"):
        generate_problems(1, {"steps": (1, 2)})
    assert SyntheticConfig(steps=[1, 2], ops=["+"]).steps == (1, 2)   # lists from JSON/CLI
