"""Card of the metrics step: criteria as measured, hubs against the causal-uniform baseline, the
high-composite heads with intervals, per-head maps and types, and the trap-1 warning when the input shows it."""
from __future__ import annotations

import numpy as np
import pandas as pd
from metaflow.cards import Markdown

from cards.common import few_problems, image, table, warnings_md, with_ci
from codi_attn.conventions import thought_name
from codi_attn.figures import metrics as metric_figures
from codi_attn.metrics import (BASES, DIFFUSE_ENTROPY, HIGH_COMPOSITE, LIFT_THRESHOLD, MIN_HUB_ROWS,
                               MetricsReport, top_k)

BASIS_RHO_MIN = 0.5  # composite Spearman rho between the bases below which the card says the ranking depends on it


def criteria_frame(criteria: pd.DataFrame) -> pd.DataFrame:
    """The criteria table as shown: measured, threshold, causal-uniform value, pass/fail."""
    return pd.DataFrame({
        "phase": criteria["phase"], "criterion": criteria["criterion"], "measured": criteria["measured"],
        "threshold": criteria["threshold"], "causal-uniform": criteria["baseline"],
        "result": np.where(criteria["passed"], "PASS", "FAIL"),
        "uniform passes too": criteria["baseline_passes"],
    })


def _criteria_md(criteria: pd.DataFrame) -> str:
    n_pass = int(criteria["passed"].sum())
    text = f"**{n_pass} of {len(criteria)} criteria pass.** A failed criterion is a finding, not an error."
    hollow = criteria[criteria["passed"] & criteria["baseline_passes"].fillna(False).astype(bool)]
    if len(hollow):
        text += (" Causal-uniform attention would pass " + "; ".join(f"*{c}*" for c in hollow["criterion"])
                 + " as well, so passing it is no evidence of structure (codi-spec trap 7).")
    return text


def _basis_md(report: MetricsReport) -> str:
    """Whether the composite ranking survives a change of basis (raw vs renormalised rows), in words."""
    k = top_k(report.n_heads)
    row = report.basis_agreement.set_index("score").loc["composite"]
    rho, same = row["spearman"], round(row[f"top{k}_overlap"] * k)
    if np.isnan(rho):  # a constant composite on a basis: no ranking to compare
        return "The composite ranking cannot be compared across the bases: it is constant on one of them."
    if rho >= BASIS_RHO_MIN:
        return (f"The composite ranking holds across the bases (Spearman rho {rho:+.2f}, {same} of the top {k} "
                "the same).")
    other = next(b for b in BASES if b != report.basis)
    return (f"**The composite ranking depends on the basis**: its Spearman rho between the raw and the renormalised "
            f"rows is {rho:+.2f}, and {same} of its top {k} heads are the same on both. The rankings above are on "
            f"the {report.basis} basis; on the {other} basis "
            + ("other heads lead." if same < k else "the same top heads lead, the others in another order."))


def _hub_md(report: MetricsReport) -> str:
    p = report.position_lift.set_index("position")
    lifts = ", ".join(f"{thought_name(j + 1)} {with_ci(p.loc[j, 'lift'], p.loc[j, 'lift_lo'], p.loc[j, 'lift_hi'], 2)}"
                      for j in p.index[p["eligible"]])
    if report.hubs:
        claim = "Hub claimed at " + ", ".join(f"**{thought_name(j + 1)}**" for j in report.hubs)
    else:
        claim = "**No hub claimed**"
    design = int(np.argmax(p["colsum"]))
    return (f"{claim}: incoming lift over causal-uniform (95% CI) {lifts}; a hub needs the lower bound "
            f">= {LIFT_THRESHOLD:g} and at least {MIN_HUB_ROWS} later, non-adjacent thoughts attending it. "
            f"The design's raw column sums peak at {thought_name(design + 1)}, which causal-uniform attention "
            f"also does (column z1 is visible to six rows, z6 to one).")


def top_heads_frame(report: MetricsReport, k: int | None = None) -> pd.DataFrame:
    """The top-k heads as shown: scores with 95% intervals, hub position, type, band, retention."""
    top = report.ranked_heads.head(k or top_k(report.n_heads))
    retention = next(c for c in top.columns if c.endswith("_retention"))
    return pd.DataFrame({
        "head": top["label"], "band": top["band"], "type": top["type"],
        "composite": [with_ci(*r) for r in top[["composite", "composite_lo", "composite_hi"]].to_numpy()],
        "flow": [with_ci(*r) for r in top[["flow", "flow_lo", "flow_hi"]].to_numpy()],
        "hub": [with_ci(*r) for r in top[["hub", "hub_lo", "hub_hi"]].to_numpy()],
        "hub position": [thought_name(int(j) + 1) for j in top["hub_position"]],
        "skip": [with_ci(*r) for r in top[["skip", "skip_lo", "skip_hi"]].to_numpy()],
        "hub lift (at)": [f"{v:.2f} ({thought_name(int(j) + 1)})"
                          for v, j in zip(top["hub_lift"], top["hub_lift_position"])],
        retention.replace("_", " "): top[retention],
    })


def definitions_md(report: MetricsReport) -> str:
    return (
        "**Definitions** (full text: `codi_attn/metrics.py`). M = a head's 6x6 matrix averaged over problems, "
        f"on the **{report.basis}** basis (renorm: each row divided by its thought-block sum; raw: fractions "
        "of the whole row). flow = share of thought-block attention to earlier thoughts; hub = variance of "
        "the column sums (position = largest column sum); skip = mean attention z6 -> z1..z3; composite = "
        "0.4 flow + 0.4 min-max(hub) + 0.2 min-max(skip) over this model's heads. Causal-uniform: each row's "
        "thought-block mass spread evenly over the thoughts it can see. Incoming attention to j counts rows "
        f"i >= j+2; lift = observed / causal-uniform. Types: diffuse if row entropy >= {DIFFUSE_ENTROPY:g} "
        f"of its maximum, else the largest lift of sequential (i -> i-1), self, hub, skip (i - j >= 3) if it "
        f"reaches {LIFT_THRESHOLD:g}, else mixed. High-composite: composite > {HIGH_COMPOSITE:g} (the design's "
        "\"critical\"; the causally critical heads are those of the head analysis, join_heads). "
        f"Intervals: 95% percentile bootstrap over problems ({report.n_boot} resamples, seed {report.seed}).")


def metrics_card(report: MetricsReport) -> list:
    """Card components for one model's MetricsReport."""
    n, n_layers, n_heads = report.shape
    high = report.high_composite_heads
    parts = [Markdown(f"# Head metrics{': ' + report.name if report.name else ''}"),
             Markdown(f"{n} problems, {n_layers} layers x {n_heads} heads, rankings on the **{report.basis}** "
                      f"basis, {report.n_boot} bootstrap resamples.")]
    parts += warnings_md(few_problems(n) + list(report.warnings))
    parts += [Markdown("## Success criteria of the design"), Markdown(_criteria_md(report.criteria)),
              table(criteria_frame(report.criteria)),
              Markdown("## Hubs against the causal-uniform baseline"), Markdown(_hub_md(report)),
              image(metric_figures.hub_analysis(report)),
              table(report.position_lift[["thought", "rows", "observed", "baseline", "lift", "lift_lo", "lift_hi",
                                          "eligible", "is_hub", "hub_heads"]]),
              Markdown(f"## High-composite heads: {len(high)} of {report.n_heads} ({len(high) / report.n_heads:.0%}) "
                       f"with composite > {HIGH_COMPOSITE:g}"),
              image(metric_figures.top_heads_overview(report)),
              table(top_heads_frame(report)),
              image(metric_figures.top_heads_heatmaps(report)),
              Markdown("## Per head"), image(metric_figures.layer_head_maps(report)),
              image(metric_figures.type_map(report)),
              Markdown(f"## {'High-composite' if len(high) else 'Top'} heads in detail")]
    parts += [image(metric_figures.head_detail(report, label)) for label in report.detail_heads()]
    parts += [Markdown("## Baselines, stability, model-level quantities"),
              Markdown(f"Mean std across problems: **{report.mean_std:.3f}**. Every metric beside its "
                       "causal-uniform value (mean over heads):"),
              table(report.baseline),
              Markdown("Rank agreement of the two bases (Spearman rho, overlap of the top heads):"),
              table(report.basis_agreement), Markdown(_basis_md(report)),
              Markdown("Mean share of each thought query's whole row, by destination:"),
              table(report.mass_profile),
              table(report.model_stats),
              Markdown(definitions_md(report))]
    return parts
