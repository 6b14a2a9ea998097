"""cards.aggregate_card: the end card puts the causal result next to the attention ranking."""
from __future__ import annotations

import pandas as pd

from cards.aggregate_card import end_card
from codi_attn.heads import CausalReport


def _table(parts) -> dict[str, str]:
    rows = next(p.render() for p in parts if p.render()["type"] == "table")["data"]
    return {label: value for label, value in rows}


def _report(critical: list[tuple[str, float]]) -> CausalReport:
    """A report whose head_effects hold `critical` (label, accuracy change) plus one head that is not critical."""
    rows = [{"label": label, "delta_accuracy": delta, "logit_diff_change": 0.0, "critical": True,
             "kind": "zero", "positions": "thoughts"} for label, delta in critical]
    rows.append({"label": "L0H0", "delta_accuracy": -0.5, "logit_diff_change": 0.0, "critical": False,
                 "kind": "zero", "positions": "thoughts"})
    return CausalReport(pd.DataFrame(rows), pd.DataFrame(), pd.DataFrame(), None,
                        {"kind": "zero", "positions": "thoughts"})


def test_end_card_names_the_composite_and_the_causal_heads():
    args = ("AttentionFlow/12", "demo", True, 0.76, 100, ["L0H0", "L1H1"])
    table = _table(end_card(*args, _report([("L1H2", -0.2), ("L0H3", -0.4)]), []))
    assert table["top heads (composite attention score)"] == "L0H0, L1H1"
    assert table["causally critical heads (zero ablation)"] == "L0H3, L1H2"  # most harmful first, L0H0 not critical
    many = _report([(f"L1H{h}", -0.1 - h / 100) for h in range(7)])
    assert _table(end_card(*args, many, []))["causally critical heads (zero ablation)"] == \
        "L1H6, L1H5, L1H4, L1H3, L1H2 and 2 more"
    assert _table(end_card(*args, _report([]), []))["causally critical heads (zero ablation)"] == "none"
    assert _table(end_card(*args, None, ["AttentionFlow/3"]))["causally critical heads"] == \
        "not measured (--heads false)"


def test_end_card_points_at_head_effects_only_where_measured():
    """The Client API snippet names run.data.head_effects where the causal head analysis ran (it is None where
    --heads false skipped it)."""
    args = ("AttentionFlow/12", "demo", True, 0.76, 100, ["L0H0"])

    def snippet(causal) -> str:
        return next(p.render()["source"] for p in end_card(*args, causal, []) if "Read the results" in
                    str(p.render()))

    assert "run.data.head_effects" in snippet(_report([("L1H2", -0.2)]))
    assert "run.data.head_effects" not in snippet(None) and "run.data.ranked_heads" in snippet(None)
