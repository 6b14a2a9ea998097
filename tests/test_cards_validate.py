"""cards.validate_card on given tables: the latent swap's verdict (the card on a computed validation is checked in
tests/test_validate.py, beside the run it reads)."""
from __future__ import annotations

import pandas as pd
import pytest


@pytest.mark.parametrize("low, high, says", [(-0.30, -0.10, "carry problem-specific content"),
                                             (-0.03, 0.02, "carry little problem-specific content"),
                                             (-0.20, 0.01, "inconclusive")])
def test_swap_verdict_separates_loss_no_loss_and_too_few_problems(low, high, says):
    from cards.validate_card import swap_verdict

    row = pd.Series({"delta_accuracy": (low + high) / 2, "delta_ci_low": low, "delta_ci_high": high,
                     "answers_changed": 0.4, "kl_answer_token": 0.25, "kl_compared": 0.9})
    text = swap_verdict(row)
    assert says in text and "40% of answers changed" in text and "KL 0.25" in text
