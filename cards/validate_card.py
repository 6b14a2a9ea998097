"""Card of the validate step: do the top-ranked heads and the thought positions matter causally?"""
from __future__ import annotations

import math

import pandas as pd
from metaflow.cards import Markdown, Table

from cards.common import few_problems_bullets, image

from codi_attn.validate import LENS_TOP_N, ValidationResult, controls_origin


def _points(x: float) -> str:
    return f"{100 * x:+.1f}"


def _kl(x: float) -> str:
    """A KL in nats, or n/a where no problem could be compared."""
    return "n/a" if math.isnan(x) else f"{x:.3g}"


def _delta(row: pd.Series) -> str:
    """'-12.0 points [-20.0, -4.0]'."""
    return f"{_points(row['delta_accuracy'])} points [{_points(row['delta_ci_low'])}, {_points(row['delta_ci_high'])}]"


def verdict(result: ValidationResult) -> list[str]:
    """Plain-words findings, one sentence per bullet."""
    s = result.settings
    base = result.group("baseline").iloc[0]
    top = result.group("top-k").iloc[0]
    rand = result.group("random control")
    singles = result.group("top-k single")
    blocks = result.group("blocking")
    k = s["k"]
    out = few_problems_bullets(s["n_problems"])
    if result.noop_identical:
        out.append("The no-op control (same code path, nothing ablated or blocked) reproduced the baseline "
                   "bit for bit.")
    else:
        out.append("**WARNING: the no-op control did NOT reproduce the baseline bit for bit**; differences below "
                   "may be numerical noise of the intervention path, not effects.")
    if base["accuracy"] < 0.05:
        out.append(f"Baseline accuracy is only {100 * base['accuracy']:.1f}%: accuracy can hardly fall, so read the "
                   "answers changed and the answer-token KL instead.")
    r_delta, r_kl = 100 * rand["delta_accuracy"], rand["kl_answer_token"]
    n_sets = rand["heads"].nunique()
    distinct = f", only {n_sets} distinct head set{'s' * (n_sets > 1)}" if n_sets < len(rand) else ""
    out.append(f"Ablating the top-{k} heads by composite score ({s['ablation']} ablation) changed accuracy by "
               f"{_delta(top)} from "
               f"{100 * base['accuracy']:.1f}%, vs {r_delta.mean():+.1f} ± {r_delta.std(ddof=0):.1f} points for "
               f"{k} random heads {controls_origin(s)}, none of them a top-{k} head"
               f" (mean ± sd over {len(rand)} draws{distinct}, range "
               f"{r_delta.min():+.1f} to {r_delta.max():+.1f}).")
    below = int((rand["delta_accuracy"] > top["delta_accuracy"]).sum())
    kl_above = int((rand["kl_answer_token"] < top["kl_answer_token"]).sum())
    significant = top["delta_ci_high"] < 0 or top["delta_ci_low"] > 0
    kl = (f"its answer-token KL ({_kl(top['kl_answer_token'])}, on {100 * top['kl_compared']:.0f}% of problems) "
          f"exceeds that of {kl_above} of {len(rand)} draws (random mean {_kl(r_kl.mean())})"
          if not math.isnan(top["kl_answer_token"]) else
          "its answer-token KL is n/a (no problem kept the baseline's tokens up to the answer's number)")
    out.append(f"The top-{k} change is {'significant' if significant else 'not significant'} (its interval "
               f"{'excludes' if significant else 'includes'} 0); it is a larger drop than in {below} of {len(rand)} "
               f"random draws, and {kl}.")
    if len(singles):
        worst = singles.sort_values(["delta_accuracy", "kl_answer_token"], ascending=[True, False]).iloc[0]
        out.append(f"Alone, {worst['condition']} matters most: {_delta(worst)}, KL {_kl(worst['kl_answer_token'])}.")
    one = blocks[blocks["blocked"].str.count("z") == 1]
    worst = one.sort_values(["delta_accuracy", "kl_answer_token"], ascending=[True, False]).iloc[0]
    every = blocks[blocks["blocked"].str.count("z") > 1]
    out.append(f"Blocking {worst['blocked']} hurts most of the single thoughts: {_delta(worst)}, "
               f"{100 * worst['answers_changed']:.0f}% of answers changed"
               + (f"; blocking all six: {_delta(every.iloc[0])}." if len(every) else "."))
    swap = result.group("latent swap")
    if len(swap):
        out.append(swap_verdict(swap.iloc[0]))
    out += [f"Note: {n}." for n in result.notes]
    return out


SWAP_TIGHT = 0.05  # a swap interval within ±5 points of zero counts as "no loss"


def swap_verdict(row: pd.Series) -> str:
    """What the latent swap says: significant loss (content matters), a tight interval around zero (little
    problem-specific content), or too few problems to tell."""
    said = (f"Feeding each problem the six thoughts of another problem changed accuracy by {_delta(row)}, "
            f"{100 * row['answers_changed']:.0f}% of answers changed, answer-token KL {_kl(row['kl_answer_token'])}: ")
    if row["delta_ci_high"] < 0:
        return said + "the thoughts carry problem-specific content."
    if row["delta_ci_low"] >= -SWAP_TIGHT and row["delta_ci_high"] <= SWAP_TIGHT:
        return said + "the thoughts carry little problem-specific content (another problem's do about as well)."
    return said + "inconclusive at this number of problems (the interval is wide)."


def _table(df: pd.DataFrame) -> Table:
    swapped = "thoughts of its swap partner"
    rows = [[r.condition, r.group, r.heads or r.blocked or (swapped if r.group == "latent swap" else ""),
             f"{100 * r.accuracy:.1f}%",
             f"[{100 * r.ci_low:.1f}, {100 * r.ci_high:.1f}]", _points(r.delta_accuracy),
             f"[{_points(r.delta_ci_low)}, {_points(r.delta_ci_high)}]", f"{100 * r.answers_changed:.0f}%",
             _kl(r.kl_answer_token), f"{100 * r.kl_compared:.0f}%"] for r in df.itertuples()]
    return Table(rows, headers=["condition", "group", "heads / blocked", "accuracy", "95% CI", "Δ points",
                                "Δ 95% CI", "answers changed", "KL answer token", "KL compared on"])


def _lens_table(lens: pd.DataFrame) -> Table:
    rows = [[r.thought, r.top_tokens, f"{100 * r.number:.0f}%", f"{100 * r.intermediate:.0f}%",
             f"{100 * r.intermediate_top_n:.0f}%", f"{100 * r.final_answer:.0f}%"] for r in lens.itertuples()]
    return Table(rows, headers=["thought", "most frequent top-1 tokens", "top-1 is a number",
                                "top-1 is an intermediate result", f"intermediate in top {LENS_TOP_N}",
                                "top-1 is the answer"])


def validate_card(result: ValidationResult) -> list:
    """Components of the validate card: verdict, bar charts, the full table and the logit-lens table."""
    from codi_attn.figures.validation import ablation_figure, blocking_figure, single_heads_figure

    s = result.settings
    where = "the six thought steps" if s["positions"] == "thoughts" else "every position"
    return [
        Markdown(f"# Validate: do the top heads and the thought positions matter?\n\n"
                 f"{s['model']} ({s['n_layers']} layers x {s['n_heads']} heads, {s['dtype']} on {s['device']}), "
                 f"{s['n_problems']} problems, each condition on the same problems as the baseline. Heads: "
                 f"{s['ablation']} ablation of the head's slice of the attention output projection's input at "
                 f"{where}; intervals: 95 % bootstrap over problems ({s['n_boot']} resamples, paired for Δ). "
                 "KL answer token: KL(baseline || condition) in nats of the next-token distribution where the "
                 "baseline's answer number starts (its first token with a digit, or a bare minus sign), averaged "
                 "over the problems whose condition run generated the same tokens up to there (KL compared on)."),
        Markdown("## Verdict\n\n" + "\n".join(f"- {line}" for line in verdict(result))),
        Markdown(f"## The composite's top-{s['k']} heads vs random controls\n\nThe heads ranked by the "
                 "attention metrics (the metrics card's composite), not the causally critical heads of the head "
                 "analysis (join_heads card), which ablating each head measures directly."),
        image(ablation_figure(result)),
        image(single_heads_figure(result)),
        Markdown("## Blocking and swapping thoughts"),
        image(blocking_figure(result)),
        Markdown("## All conditions"),
        _table(result.validation),
        Markdown("## Logit lens of the thoughts\n\nEach thought's last-layer hidden state (after the final norm) "
                 "through the LM head; shares over problems. Intermediate results are the `<<...=c>>` values of "
                 "the gold solution."),
        _lens_table(result.logit_lens),
    ]

