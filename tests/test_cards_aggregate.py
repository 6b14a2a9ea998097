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
    correlations = pd.DataFrame(columns=["metric", "effect", "spearman", "ci_low", "ci_high", "n_heads"])
    return CausalReport(pd.DataFrame(rows), pd.DataFrame(), correlations, None,
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


def test_end_card_answers_whether_the_ranking_predicts_the_heads():
    """The end card says whether the composite's Spearman with the accuracy drop excludes 0, with its interval, and
    gives the held-out top-k changes on half B beside their random sets'."""
    import numpy as np

    from codi_attn.heads import HeldOut

    args = ("AttentionFlow/12", "demo", True, 0.76, 100, ["L0H0"])
    question = "does the attention ranking predict them?"
    held_row = "held out: accuracy change on half B (points, 95% interval)"

    def with_correlation(spearman: float, low: float, high: float) -> CausalReport:
        report = _report([("L1H2", -0.2)])
        report.correlations = pd.DataFrame([
            {"metric": "composite", "effect": "accuracy drop", "spearman": spearman, "ci_low": low, "ci_high": high,
             "n_heads": 16},
            {"metric": "composite", "effect": "logit-diff drop", "spearman": 0.9, "ci_low": 0.8, "ci_high": 0.95,
             "n_heads": 16}])
        return report

    no = _table(end_card(*args, with_correlation(0.009, -0.279, 0.177), []))
    assert no[question] == "no: Spearman +0.01 [-0.28, +0.18] between composite and accuracy drop over 16 heads"
    assert no[held_row] == "not measured"
    assert _table(end_card(*args, with_correlation(0.6, 0.2, 0.8), []))[question].startswith("yes: Spearman +0.60")
    assert _table(end_card(*args, with_correlation(float("nan"), float("nan"), float("nan")), []))[question] == \
        "undefined: the composite or the accuracy drop is the same for all 16 heads"
    assert _table(end_card(*args, _report([]), []))[question] == "not measured (too few heads scanned)"
    report = with_correlation(0.009, -0.279, 0.177)
    summary = pd.DataFrame([
        {"selection": "causal", "delta_accuracy": -0.6, "delta_ci_low": -0.76, "delta_ci_high": -0.42,
         "random_mean": -0.159, "random_sd": 0.09},
        {"selection": "composite", "delta_accuracy": -0.16, "delta_ci_low": -0.26, "delta_ci_high": -0.06,
         "random_mean": -0.432, "random_sd": 0.145}])
    report.held_out = HeldOut(np.arange(50), np.arange(50, 100), 4, "mean", "thoughts", pd.DataFrame(), summary, 50)
    assert _table(end_card(*args, report, []))[held_row] == (
        "causal top-4 -60.0 [-76.0, -42.0] vs random -15.9 ± 9.0; "
        "composite top-4 -16.0 [-26.0, -6.0] vs random -43.2 ± 14.5")
    assert question not in _table(end_card(*args, None, []))
