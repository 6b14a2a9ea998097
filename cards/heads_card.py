"""Card of the causal head analysis: which heads carry the thoughts, and how far the attention metrics predict it."""
from __future__ import annotations

import math

import pandas as pd
from metaflow.cards import Markdown

from cards.common import cell, few_problems_bullets, image, table
from codi_attn.heads import CRITICAL_DROP, FDR, CausalReport
from codi_attn.metrics import HIGH_COMPOSITE, high_composite
from codi_attn.settings import FEW_PROBLEMS


def _points(x: float) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:+.1f}"


def _interval(lo: float, hi: float) -> str:
    return f"[{_points(lo)}, {_points(hi)}]"


def composite_correlation(report: CausalReport) -> pd.Series | None:
    """The composite score's Spearman with the accuracy drop across heads (spearman, ci_low, ci_high, n_heads), or
    None where too few heads were scanned; it predicts the effect where the interval's low end is above 0."""
    corr = report.correlations
    row = corr[(corr["metric"] == "composite") & (corr["effect"] == "accuracy drop")]
    return row.iloc[0] if len(row) else None


def ranking_answer(report: CausalReport) -> str:
    """Does the attention ranking predict which heads matter, in one line (the end card)."""
    r = composite_correlation(report)
    if r is None:
        return "not measured (too few heads scanned)"
    if math.isnan(r.spearman):
        return f"undefined: the composite or the accuracy drop is the same for all {r.n_heads} heads"
    return (f"{'yes' if r.ci_low > 0 else 'no'}: Spearman {r.spearman:+.2f} [{r.ci_low:+.2f}, {r.ci_high:+.2f}] "
            f"between composite and accuracy drop over {r.n_heads} heads")


def held_out_answer(report: CausalReport) -> str:
    """The held-out top-k sets' accuracy change on half B next to their random sets', in one line (the end card)."""
    held = report.held_out
    if held is None:
        return "not measured"
    return "; ".join(f"{r.selection} top-{held.k} {_points(r.delta_accuracy)} "
                     f"{_interval(r.delta_ci_low, r.delta_ci_high)} vs random {100 * r.random_mean:+.1f} ± "
                     f"{100 * r.random_sd:.1f}" for r in held.summary.itertuples())


def verdict(report: CausalReport, ranked_heads: pd.DataFrame) -> list[str]:
    """The findings in plain words, one sentence per bullet."""
    s = report.settings
    out = few_problems_bullets(s["n_problems"])
    critical = report.critical()
    effects = report.head_effects
    n_scanned = int(((effects["kind"] == s["kind"]) & (effects["positions"] == s["positions"])).sum())
    composite = high_composite(ranked_heads)["label"].tolist()
    names = ", ".join(critical["label"]) or "none"
    n_model = s["n_layers"] * s["n_heads"]
    unscanned = (f", {n_model - n_scanned} of them not scanned and counted with p = 1" if n_scanned < n_model else "")
    out.append(f"{len(critical)} of {n_model} heads are causally critical ({s['kind']} ablation "
               f"alone costs at least {100 * CRITICAL_DROP:.0f} points, and the loss survives a "
               f"{100 * FDR:.0f}% false-discovery rate over the model's {n_model} heads{unscanned}: "
               f"exact sign test on the answers it flips, Benjamini-Hochberg): {names}. "
               f"High-composite (above {HIGH_COMPOSITE}): {', '.join(composite) or 'none'}; in both: "
               f"{', '.join(sorted(set(critical['label']) & set(composite))) or 'none'}.")
    corr = report.correlations
    r = composite_correlation(report)
    if r is not None:
        out.append(f"Across heads the composite score and the accuracy drop have Spearman {r.spearman:+.2f} "
                   f"[{r.ci_low:+.2f}, {r.ci_high:+.2f}]: the attention ranking "
                   + ("predicts the causal effect." if r.ci_low > 0 else "**does not predict** the causal effect."))
    drop = corr[corr["effect"] == "accuracy drop"]
    if len(drop):
        real = drop[(drop["ci_low"] > 0) | (drop["ci_high"] < 0)]
        if len(real):
            names = ", ".join(f"{r.metric} {r.spearman:+.2f} [{r.ci_low:+.2f}, {r.ci_high:+.2f}]"
                              + (" (negative: heads scoring lower matter more)" if r.spearman < 0 else "")
                              for r in real.itertuples())
            out.append(f"Of the {len(drop)} attention metrics, the Spearman with the accuracy drop has an interval "
                       f"excluding 0 for {names}; each interval is at 95%, so among {len(drop)} one may be "
                       "chance.")
        else:
            b = drop.sort_values("spearman", ascending=False).iloc[0]
            out.append(f"None of the {len(drop)} attention metrics has a Spearman with the accuracy drop whose "
                       f"interval excludes 0 (the highest: {b.metric} {b.spearman:+.2f} [{b.ci_low:+.2f}, "
                       f"{b.ci_high:+.2f}]): no attention metric here predicts which heads matter.")
    held = report.held_out
    if held is not None:
        if s["n_problems"] >= FEW_PROBLEMS:  # the whole sample is enough, its half B may not be
            out += few_problems_bullets(len(held.problems_b), "half B, the held-out test's")
        for r in held.summary.itertuples():
            out.append(f"Selected on half A by {r.selection} ({r.heads}), the top-{held.k} ablated together on half B "
                       f"({len(held.problems_b)} problems) change accuracy by {_points(r.delta_accuracy)} points "
                       f"{_interval(r.delta_ci_low, r.delta_ci_high)}, vs {100 * r.random_mean:+.1f} ± "
                       f"{100 * r.random_sd:.1f} for {r.distinct} random sets of the heads outside it"
                       f"{' in the same layers' if r.layer_matched else ' (from all layers)'}: a larger drop than "
                       f"{r.percentile:.0f}% of them.")
    for r in report.agreement.itertuples():
        out.append(f"Attribution patching ({r.kind}) ranks the heads' logit-difference effects with Spearman "
                   f"{r.spearman:+.2f} against the exact scan ({r.n_heads} heads).")
    out += [f"Note: {n}." for n in report.notes]
    return out


def _effects_table(report: CausalReport, kind: str, n: int = 30) -> list:
    from codi_attn.heads import causal_order

    df = report.head_effects
    df = causal_order(df[(df["kind"] == kind) & (df["positions"] == report.settings["positions"])]).head(n)
    shown = pd.DataFrame({  # the verdict's columns first: a wide table is cut at the right
        "head": df["label"], "critical": df["critical"], "Δ points": [_points(v) for v in df["delta_accuracy"]],
        "Δ 95% CI": [_interval(lo, hi) for lo, hi in zip(df["delta_ci_low"], df["delta_ci_high"])],
        "q (FDR)": [cell(v) for v in df.get("q_value", pd.Series(float("nan"), index=df.index))],
        "accuracy": [f"{100 * v:.1f}%" for v in df["accuracy"]],
        "answers changed": [f"{100 * v:.0f}%" for v in df["answers_changed"]],
        "KL": [cell(v) for v in df["kl_answer_token"]], "Δ logit diff": [cell(v) for v in df["logit_diff_change"]],
        "attribution": [cell(v) for v in df["estimate"]], "composite": [cell(v) for v in df["composite"]]})
    return [table(shown)]


def heads_card(report: CausalReport, ranked_heads: pd.DataFrame) -> list:
    """Components of the causal-heads card."""
    from codi_attn.figures.heads import attribution_scatter, composite_scatter, effect_maps, held_out_figure

    s = report.settings
    where = "the six thought steps" if s["positions"] == "thoughts" else "every position"
    parts = [
        Markdown(f"# Which heads carry the thoughts?\n\n{s['model']} ({s['n_layers']} layers x {s['n_heads']} "
                 f"heads), {s['n_problems']} problems. Each head is ablated alone ({', '.join(s['kinds'])}: its slice "
                 "of the attention output projection's input replaced by its mean over the problems, by 0, or by "
                 f"its input on another problem with as many solution steps) at {where}, against one baseline run "
                 "of the same problems. Δ: accuracy change in points with a 95 % paired bootstrap interval; KL and "
                 "Δ logit diff (the baseline's answer token minus its runner-up) at the token where the baseline's "
                 "answer number starts."),
        Markdown("## Verdict\n\n" + "\n".join(f"- {line}" for line in verdict(report, ranked_heads))),
        Markdown("## Every head"),
        image(effect_maps(report)),
        Markdown("## Does the attention ranking find them?"),
        image(composite_scatter(report)),
        table(report.correlations.assign(spearman=report.correlations["spearman"].round(3),
                                          ci_low=report.correlations["ci_low"].round(3),
                                          ci_high=report.correlations["ci_high"].round(3))),
    ]
    if report.held_out is not None:
        held = report.held_out
        parts += [Markdown(f"## Held out: selected on half A ({len(held.problems_a)} problems), measured on half B "
                           f"({len(held.problems_b)})\n\n" + _held_out_selection(report) + " " + RANDOM_SETS),
                  image(held_out_figure(held)),
                  table(_held_out_table(held))]
    if len(report.agreement):
        parts += [Markdown("## Attribution patching against the exact scan"), image(attribution_scatter(report))]
    parts += [Markdown("## Causally critical and high-composite heads side by side\n\n"
                       f"Causal: Δ ≤ -{100 * CRITICAL_DROP:.0f} points and "
                       f"q < {FDR} ({s['kind']} ablation; q: the sign test's p-value adjusted over the heads, "
                       f"Benjamini-Hochberg). Composite: the design's score above "
                       f"{HIGH_COMPOSITE}."),
              table(_side_by_side(report, ranked_heads))]
    for kind in s["kinds"]:
        parts += [Markdown(f"## Heads by effect: {kind} ablation (most harmful first)"), *_effects_table(report, kind)]
    return parts


def _held_out_selection(report: CausalReport) -> str:
    """How half B can enter the selection on half A, for the ablation kind the held-out test used."""
    s = report.settings
    through = {"mean": "the scan's mean ablation used means over all the problems (B's included)",
               "resample": "the scan's resample ablation took its inputs from swap partners among all the problems",
               "zero": ""}[s["kind"]]
    partial = len(report.head_effects[["layer", "head"]].drop_duplicates()) < s["n_layers"] * s["n_heads"]
    chosen = "attribution patching on all the problems chose the heads scanned" if partial else ""
    ways = " and ".join(w for w in (through, chosen) if w)
    return ("The sets are ablated on B against B's own baseline (and B's own means or inputs). The selection reads "
            "the exact scan's effects on A; " + (f"{ways}: that is how B enters it." if ways else
                                                 "B does not enter it."))


RANDOM_SETS = ("Each selection's random sets are k heads drawn from the heads outside it, so the two selections "
               "have different baselines: the causal top-k's random sets cannot contain the k heads the scan found "
               "most harmful on A, the composite top-k's can. A selection's percentile is the share of its random "
               "sets whose drop on B it exceeds.")


def _held_out_table(held) -> pd.DataFrame:
    return pd.DataFrame({
        "selected by": held.summary["selection"], "heads": held.summary["heads"],
        "Δ points on half B": [_points(v) for v in held.summary["delta_accuracy"]],
        "95% CI": [_interval(lo, hi) for lo, hi in zip(held.summary["delta_ci_low"], held.summary["delta_ci_high"])],
        "random sets: mean ± sd": [f"{100 * m:+.1f} ± {100 * sd:.1f}" for m, sd in
                                   zip(held.summary["random_mean"], held.summary["random_sd"])],
        "drop larger than": [f"{p:.0f}% of them" for p in held.summary["percentile"]],
        "distinct sets": held.summary["distinct"],
        "random sets from": ["the same layers" if m else "all layers" for m in held.summary["layer_matched"]],
    })


def _side_by_side(report: CausalReport, ranked_heads: pd.DataFrame) -> pd.DataFrame:
    causal = report.critical()
    composite = high_composite(ranked_heads)
    n = max(len(causal), len(composite), 1)
    def pad(values) -> list:
        values = list(values)
        return values + [""] * (n - len(values))

    return pd.DataFrame({
        "causal critical": pad(causal["label"]),
        "Δ points": pad(_points(v) for v in causal["delta_accuracy"]),
        f"composite > {HIGH_COMPOSITE:g}": pad(composite["label"]),
        "composite": pad(f"{v:.3f}" for v in composite["composite"]),
    })
