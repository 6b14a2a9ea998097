"""Answer and gold parsing exactly as the official CODI evaluation does it (codi-spec section 3, trap 5)."""
from __future__ import annotations

import math
import re

NUMBER = re.compile(r"-?\d+\.?\d*")


def normalize_question(question: str) -> str:
    """The question text the official evaluation tokenizes."""
    return question.strip().replace("  ", " ")


def parse_answer(text: str) -> float | None:
    """The last number in decoded model text (commas removed), or None when there is none.

    >>> parse_answer("The answer is: 1,234")
    1234.0
    """
    numbers = NUMBER.findall(text.replace(",", ""))
    if not numbers:
        return None
    return float(numbers[-1])


def parse_gold(answer: str) -> float | None:
    """The gold number of a GSM8K answer: the text after '####' (or the whole text), commas removed."""
    tail = answer.split("####")[-1].replace(",", "").strip()
    try:
        return float(tail)
    except ValueError:
        return parse_answer(tail)


def is_correct(prediction: float | None, gold: float | None) -> bool:
    """Exact numeric match, as the official evaluation compares floats; no answer is never correct."""
    if prediction is None or gold is None or math.isnan(prediction) or math.isnan(gold):
        return False
    return prediction == gold
