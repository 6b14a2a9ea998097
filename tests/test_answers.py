"""Answer and gold parsing as the official evaluation does it (codi-spec trap 5)."""
from __future__ import annotations

import numpy as np
import pytest

from codi_attn.answers import correctness, is_correct, normalize_question, parse_answer, parse_gold


@pytest.mark.parametrize("text, expected", [
    ("The answer is: 1,234", 1234.0),
    ("The answer is: -3.5", -3.5),
    ("-3.5", -3.5),
    ("5 apples and 7 pears. The answer is: 12", 12.0),
    ("The answer is: 18.", 18.0),
    ("no number here", None),
    ("", None),
])
def test_parse_answer(text, expected):
    assert parse_answer(text) == expected


@pytest.mark.parametrize("answer, expected", [
    ("Natalia sold 48/2 = <<48/2=24>>24 clips.\n#### 72", 72.0),
    ("#### 1,000", 1000.0),
    ("so #### -4", -4.0),
    ("18", 18.0),
    ("#### 0.5", 0.5),
])
def test_parse_gold(answer, expected):
    assert parse_gold(answer) == expected


@pytest.mark.parametrize("answer", ["#### seventy-two", "#### 1/2", "#### 72 apples", "#### $18", "#### nan",
                                    "#### 1e3", "#### ", "so 3 + 4\n#### seven"])
def test_gold_that_is_not_one_number_is_none(answer):
    """No number is picked out of a gold that is not one: '1/2' is not 2, '72 apples' is not 72 (data.py
    refuses such records, naming file and line)."""
    assert parse_gold(answer) is None


def test_answer_and_gold_meet():
    """An over-escaped or '####'-only parser returns None for model text; this one matches."""
    assert is_correct(parse_answer("The answer is: 72"), parse_gold("...\n#### 72"))
    assert not is_correct(parse_answer("The answer is: 71"), parse_gold("#### 72"))
    assert not is_correct(None, 72.0)


def test_normalize_question():
    assert normalize_question("  Tom has  3 pens.  ") == "Tom has 3 pens."


def test_correctness_of_parsed_predictions():
    """[N] bool per problem; no prediction (nan) is wrong; no golds: all False; a count mismatch names both."""
    np.testing.assert_array_equal(correctness(np.array([5.0, np.nan, 7.0]), ["#### 5", "5", "6"]), [True, False, False])
    np.testing.assert_array_equal(correctness(np.array([1.0, 2.0]), None), [False, False])
    np.testing.assert_array_equal(correctness(np.array([1000.0, 0.5]), ["1,000", "#### .5"]), [True, True])
    with pytest.raises(ValueError, match="3 gold answers for 2 problems"):
        correctness(np.array([1.0, 2.0]), ["1", "2", "3"])
