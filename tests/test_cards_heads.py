"""cards.heads_card: the verdict's sentences on the attention metrics against the causal effect."""
from __future__ import annotations

import pandas as pd

from cards.heads_card import verdict
from codi_attn.heads import CausalReport


def _report(spearman: dict[str, tuple[float, float, float]], n_problems: int = 100) -> CausalReport:
    """A report with no critical head whose correlations are `spearman`: metric -> (rho, low, high)."""
    effects = pd.DataFrame([{"label": "L0H0", "layer": 0, "head": 0, "delta_accuracy": 0.0, "logit_diff_change": 0.0,
                             "critical": False, "kind": "mean", "positions": "thoughts"}])
    rows = [{"metric": m, "effect": e, "spearman": rho, "ci_low": lo, "ci_high": hi, "n_heads": 16}
            for m, (rho, lo, hi) in spearman.items() for e in ("accuracy drop", "logit-diff drop")]
    return CausalReport(effects, pd.DataFrame(), pd.DataFrame(rows), None,
                        {"kind": "mean", "positions": "thoughts", "n_layers": 4, "n_heads": 4,
                         "n_problems": n_problems})


RANKED = pd.DataFrame({"label": ["L0H0"], "composite": [0.5]})


def test_verdict_names_every_metric_whose_interval_excludes_0():
    """The demo run's case: composite's interval includes 0, thought_share's lies below 0; the verdict names
    thought_share (negative) and says it is one of six 95% intervals, not that no metric predicts."""
    lines = verdict(_report({"composite": (0.009, -0.279, 0.177), "skip": (0.103, -0.179, 0.289),
                             "thought_share": (-0.335, -0.568, -0.146), "flow": (-0.07, -0.34, 0.14)}), RANKED)
    line = next(l for l in lines if "attention metrics" in l)
    assert "thought_share -0.34 [-0.57, -0.15] (negative: heads scoring lower matter more)" in line
    assert "skip" not in line and "composite" not in line and "among 4 one may be chance" in line
    assert any("**does not predict**" in l for l in lines)
    both = next(l for l in verdict(_report({"skip": (0.5, 0.2, 0.7), "hub": (-0.4, -0.6, -0.1)}), RANKED)
                if "attention metrics" in l)
    assert "skip +0.50 [+0.20, +0.70]" in both and "hub -0.40" in both


def test_verdict_says_no_metric_predicts_only_when_every_interval_includes_0():
    lines = verdict(_report({"composite": (0.009, -0.279, 0.177), "skip": (0.103, -0.179, 0.289)}), RANKED)
    line = next(l for l in lines if "attention metrics" in l)
    assert line == ("None of the 2 attention metrics has a Spearman with the accuracy drop whose interval excludes 0 "
                    "(the highest: skip +0.10 [-0.18, +0.29]): no attention metric here predicts which heads matter.")
    assert "0 of 16 heads are causally critical" in lines[0] and "false-discovery rate" in lines[0]


def test_a_verdict_on_too_few_problems_opens_with_a_warning():
    """3 problems: the verdict says first that its intervals are too narrow (10 distinct resamples); 20 (FEW_PROBLEMS)
    carry no warning."""
    few = verdict(_report({"composite": (0.08, -0.04, 0.20)}, n_problems=3), RANKED)
    assert few[0].startswith("**Warning: only 3 problems: percentile-bootstrap 95% intervals over so few problems "
                             "are too narrow (they cover the truth less often than 95%; these have only 10 distinct "
                             "resamples)")
    assert few[1:] == verdict(_report({"composite": (0.08, -0.04, 0.20)}, n_problems=20), RANKED)
    assert not any("Warning" in line for line in few[1:])


def test_the_held_out_verdict_warns_when_half_b_is_small():
    """30 problems are enough for the scan's verdict, but the held-out test measures on half B's 15: its line is
    preceded by a warning naming half B; with 40 problems (20 on B) there is none."""
    import dataclasses

    import numpy as np

    from codi_attn.heads import HeldOut

    summary = pd.DataFrame([{"selection": "causal", "heads": "L0H0", "delta_accuracy": -0.2, "delta_ci_low": -0.3,
                             "delta_ci_high": -0.1, "random_mean": -0.05, "random_sd": 0.02, "distinct": 5,
                             "layer_matched": True, "percentile": 100.0}])
    def lines(n: int) -> list[str]:
        held = HeldOut(np.arange(n // 2), np.arange(n // 2, n), 1, "mean", "thoughts", pd.DataFrame(), summary, 5)
        report = dataclasses.replace(_report({"composite": (0.1, -0.2, 0.3)}, n_problems=n), held_out=held)
        return verdict(report, RANKED)

    few = lines(30)
    (warning,) = [line for line in few if "Warning" in line]
    assert warning.startswith("**Warning: only 15 problems in half B, the held-out test's: percentile-bootstrap")
    assert few.index(warning) == next(i for i, line in enumerate(few) if line.startswith("Selected on half A")) - 1
    assert not any("Warning" in line for line in lines(40))


def test_few_problems_note_from_none_to_one():
    from codi_attn.settings import few_problems_note

    assert few_problems_note(20) is None and few_problems_note(100) is None
    assert few_problems_note(1).startswith("only 1 problem: ") and "only 1 distinct resample)" in few_problems_note(1)
    assert "distinct" not in few_problems_note(10)  # 92,378 resamples: the coverage is the problem, not their count
    assert few_problems_note(0).startswith("only 0 problems: ")
