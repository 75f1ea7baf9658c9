"""GSM8K loader and grader on the real lines of the packaged copy, tolerant variants, error paths."""

from __future__ import annotations

import gzip
import json

import pytest

from epikern.data import Problem, extract_answer, is_correct, load_gsm8k, normalize_number, packaged_gsm8k


@pytest.fixture(scope="module")
def splits():
    return {split: load_gsm8k(split) for split in ("test", "train")}


def _raw_final(answer):
    """An independent reading of a GSM8K reference: the text after '####', commas dropped."""
    return answer.split("####")[-1].strip().replace(",", "")


def test_packaged_splits(splits):
    test, train = splits["test"], splits["train"]
    assert (len(test), len(train)) == (1319, 7473)
    assert test[0] == Problem(
        question=test[0].question, answer=test[0].answer, final="18", id="gsm8k-test-0")
    assert test[0].question.startswith("Janet\u2019s ducks lay 16 eggs per day.")
    assert test[0].answer.endswith("every day at the farmer\u2019s market.\n#### 18")
    for split, problems in splits.items():
        assert [p.id for p in problems] == [f"gsm8k-{split}-{i}" for i in range(len(problems))]
    assert packaged_gsm8k("test").parent.joinpath("LICENSE").read_text().startswith("MIT License")


def test_every_reference_grades_as_correct_against_itself(splits):
    with_commas = 0
    for problems in splits.values():
        for p in problems:
            assert p.final == _raw_final(p.answer)
            assert is_correct(p.answer, p.answer) and is_correct(p.answer, p.final)
            assert not is_correct(p.answer, str(int(p.final) + 1))
            with_commas += "," in p.answer.split("####")[-1]
    assert with_commas == 14 + 79   # references written like "#### 70,000": 14 in test, 79 in train


@pytest.mark.parametrize("index", [0, 2, 146, 611])   # 18, 70000, "2,125", "1,450,000"
def test_tolerant_variants(splits, index):
    p = splits["test"][index]
    n = p.final
    thousands = f"{int(n):,}"
    right = [f"#### {n}", f"####{n}", f"#### ${n}", f"#### {n}.0", f"#### {n}.00", f"#### {n} dollars",
             f"#### +{n}", f"#### {n}.", f"#### {thousands}", f"#### $ {thousands}.00 in total\n",
             f"Some steps\n#### 7\nOn second thought\n#### {n}", f"#### {n}\n\nQuestion: next one"]
    wrong = [f"#### {int(n) + 1}", f"#### {n}0", f"#### -{n}", f"#### {n}.5", f"#### {n[:-1] or 0}",
             f"#### {n}\n#### 7", f"The answer is {n}.", "", f"#### about {n}", f"#### {n}/2"]
    for response in right:
        assert is_correct(response, p.answer), response
        assert is_correct(response, p.final), response
    for response in wrong:
        assert not is_correct(response, p.answer), response


@pytest.mark.parametrize("text,expected", [
    ("18", "18"), (" 18 ", "18"), ("$18", "18"), ("18 dollars", "18"), ("18.0", "18"), ("18.00", "18"),
    ("+18", "18"), ("1,000", "1000"), ("1,234,567.50", "1234567.5"), ("-3", "-3"), ("-$3.50", "-3.5"),
    ("$-3.5", "-3.5"), ("\u22122", "-2"), ("- 4", "-4"), (".5", "0.5"), ("0.25 kg", "0.25"),
    ("-0", "0"), ("-0.0", "0"), ("007", "7"), ("50%", "50"), ("18.\n", "18"), ("3 apples + 4", "3"),
    ("", None), ("dollars", None), ("about 5", None), ("$", None), ("-", None), ("1,2", None),
    ("1,0000", None), ("1/2", None), ("1.2.3", None), ("1e5", None), ("1 000", None), ("+-3", None),
])
def test_normalize_number(text, expected):
    assert normalize_number(text) == expected


def test_extract_answer():
    assert extract_answer("2+3=<<2+3=5>>5\n#### 5") == "5"
    assert extract_answer("#### 4\n#### 5") == "5"
    assert extract_answer("##### 5") == "5"
    assert extract_answer("#### -12.50") == "-12.5"
    assert extract_answer("####") is None
    # no '####': no answer, unless the documented fallback is asked for
    for text, last in [("So she makes 9*2=18 dollars.", "18"), ("It is 7-3 = 4", "4"),
                       ("They owe -5 and then 1,200.", "1200"), ("the loss is -5", "-5"),
                       ("no number", None)]:
        assert extract_answer(text) is None
        assert extract_answer(text, fallback_last_number=True) == last
        assert is_correct(text, last or "1", fallback_last_number=True) is (last is not None)
        assert not is_correct(text, last or "1")


def test_grader_bad_input():
    with pytest.raises(ValueError, match="no final answer"):
        is_correct("#### 5", "no number here")
    with pytest.raises(ValueError, match="no final answer"):
        is_correct("#### 5", "steps\n#### x")
    with pytest.raises(TypeError, match="str"):
        is_correct("#### 5", 5)
    with pytest.raises(TypeError, match="str"):
        extract_answer(None)
    with pytest.raises(TypeError, match="str"):
        normalize_number(18)


def test_load_from_directory_file_and_limit(splits, tmp_path):
    with gzip.open(packaged_gsm8k("test"), "rt", encoding="utf-8") as f:
        text = f.read()
    (tmp_path / "test.jsonl").write_text(text, encoding="utf-8")
    assert load_gsm8k("test", path=tmp_path) == splits["test"]
    assert load_gsm8k("test", path=str(tmp_path / "test.jsonl")) == splits["test"]
    assert load_gsm8k("test", path=packaged_gsm8k("test")) == splits["test"]
    assert load_gsm8k("train", limit=5) == splits["train"][:5]
    assert load_gsm8k("test", limit=0) == []
    blank = tmp_path / "blank.jsonl"
    blank.write_text("\n" + text.split("\n")[0] + "\n\n", encoding="utf-8")
    assert load_gsm8k("test", path=blank) == splits["test"][:1]


def _write(tmp_path, lines):
    path = tmp_path / "test.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


GOOD = json.dumps({"question": "What is 2+3?", "answer": "2+3=<<2+3=5>>5\n#### 5"})


@pytest.mark.parametrize("bad,message", [
    ('{"question": "q", "answer": "#### 5"', "not valid JSON"),
    ('["q", "#### 5"]', "expected a JSON object"),
    ('{"question": "q"}', "missing string field 'answer'"),
    ('{"question": 3, "answer": "#### 5"}', "missing string field 'question'"),
    ('{"question": "q", "answer": "5"}', "readable '#### N'"),
    ('{"question": "q", "answer": "#### five"}', "readable '#### N'"),
])
def test_malformed_line_names_file_and_line(tmp_path, bad, message):
    path = _write(tmp_path, [GOOD, GOOD, bad, GOOD])
    with pytest.raises(ValueError, match=message) as err:
        load_gsm8k("test", path=path)
    assert f"{path}:3:" in str(err.value)


def test_missing_file_and_bad_arguments(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing.jsonl"):
        load_gsm8k("test", path=tmp_path / "nothing.jsonl")
    with pytest.raises(FileNotFoundError, match=f"{tmp_path / 'train.jsonl'}"):
        load_gsm8k("train", path=tmp_path)
    with pytest.raises(ValueError, match="split must be one of"):
        load_gsm8k("validation")
    for limit in (-1, 1.5, True):
        with pytest.raises(ValueError, match="limit"):
            load_gsm8k("test", limit=limit)
