"""Answer and gold parsing exactly as the official CODI evaluation does it (codi-spec section 3, trap 5)."""
from __future__ import annotations

import math
import re
from collections.abc import Sequence

import numpy as np

NUMBER = re.compile(r"-?\d+\.?\d*")
GOLD = re.compile(r"-?(\d+\.?\d*|\.\d+)")  # the whole gold text, commas removed: 72, -4, 1000, 0.5


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
    """The gold number of a GSM8K answer: the text after '####' (or the whole text), commas removed; None when
    that text is not one number ('seventy-two', '1/2', '72 apples'): never a number picked out of it."""
    tail = answer.split("####")[-1].replace(",", "").strip()
    return float(tail) if GOLD.fullmatch(tail) else None


def is_correct(prediction: float | None, gold: float | None) -> bool:
    """Exact numeric match, as the official evaluation compares floats; no answer is never correct."""
    if prediction is None or gold is None or math.isnan(prediction) or math.isnan(gold):
        return False
    return prediction == gold


def correctness(predictions: np.ndarray, golds: Sequence[str] | None) -> np.ndarray:
    """[N] bool: each parsed prediction equals its gold answer (GSM8K answer text: the number, or '... #### N')."""
    if golds is None:
        return np.zeros(len(predictions), bool)
    if len(golds) != len(predictions):
        raise ValueError(f"{len(golds)} gold answers for {len(predictions)} problems")
    return np.array([is_correct(None if np.isnan(p) else float(p), parse_gold(g))
                     for p, g in zip(predictions, golds)], dtype=bool)
