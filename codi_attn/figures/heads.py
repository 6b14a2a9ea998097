"""Figures of the causal head analysis (codi_attn.heads): the effect of every head as a layer x head map, the
composite score against the effect, the attribution estimate against the exact scan, and the held-out top heads
among random sets. Each returns a Figure (matplotlib's object API, Agg backend, never registered with pyplot)."""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from codi_attn.heads import CausalReport, HeldOut  # noqa: E402

DPI = 100


def _select(report: CausalReport, kind: str | None = None) -> pd.DataFrame:
    df = report.head_effects
    return df[(df["kind"] == (kind or report.settings["kind"])) & (df["positions"] == report.settings["positions"])]


def effect_maps(report: CausalReport) -> Figure:
    """One layer x head map per ablation kind: accuracy change in points when the head alone is ablated; a dot
    marks heads whose 95 % interval excludes 0, a ring the causally critical ones."""
    kinds = report.settings["kinds"]
    n_layers, n_heads = report.settings["n_layers"], report.settings["n_heads"]
    fig = Figure(figsize=(min(18, 1.5 + 4.6 * len(kinds) * max(1, n_heads / 8)), 2.2 + 0.6 * n_layers), dpi=DPI,
                 layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(kinds), squeeze=False)[0])
    limit = max(1.0, 100 * np.nanmax(np.abs(report.head_effects["delta_accuracy"].to_numpy(float))))
    image = None
    for ax, kind in zip(axes, kinds):
        df = _select(report, kind)
        grid = np.full((n_layers, n_heads), np.nan)
        grid[df["layer"], df["head"]] = 100 * df["delta_accuracy"]
        image = ax.imshow(grid, cmap="RdBu", vmin=-limit, vmax=limit, aspect="auto")
        for r in df.itertuples():
            ink = "white" if abs(100 * r.delta_accuracy) > 0.55 * limit else "black"  # legible on dark cells
            if r.delta_ci_high < 0 or r.delta_ci_low > 0:
                ax.plot(r.head, r.layer, "o", ms=3, color=ink)
            if r.critical:
                ax.plot(r.head, r.layer, "o", ms=11, mfc="none", mec=ink, mew=1.2)
            if n_heads <= 16:
                ax.text(r.head, r.layer + 0.3, f"{100 * r.delta_accuracy:+.0f}", ha="center", va="center",
                        fontsize=9 if n_heads <= 8 else 7, color=ink)
        ax.set_title(f"{kind} ablation", fontsize=10)
        ax.set_xlabel("head")
        ax.set_ylabel("layer")
        ax.set_xticks(range(n_heads) if n_heads <= 16 else range(0, n_heads, 4))
        ax.set_yticks(range(n_layers))
    fig.colorbar(image, ax=list(axes), label="accuracy change (points)", shrink=0.8)
    where = "the six thought steps" if report.settings["positions"] == "thoughts" else "every position"
    fig.suptitle(f"{report.settings['model']}: each head ablated alone at {where}, {report.settings['n_problems']} "
                 "problems (dot: 95% CI excludes 0; ring: critical)", fontsize=11)
    return fig


def composite_scatter(report: CausalReport) -> Figure:
    """The design's composite score of each head against its causal effect (accuracy drop), with the rank
    correlation and its interval."""
    df = _select(report)
    corr = report.correlations
    row = corr[(corr["metric"] == "composite") & (corr["effect"] == "accuracy drop")]
    fig = Figure(figsize=(6.4, 4.6), dpi=DPI, layout="constrained")
    ax = fig.add_subplot()
    drop = -100 * df["delta_accuracy"].to_numpy(float)
    delta = df["delta_accuracy"].to_numpy(float)
    err = 100 * np.stack([df["delta_ci_high"].to_numpy(float) - delta, delta - df["delta_ci_low"].to_numpy(float)])
    points = ax.scatter(df["composite"], drop, c=df["layer"], cmap="viridis", s=28, zorder=3)
    ax.errorbar(df["composite"], drop, yerr=err, fmt="none", ecolor="#999999", lw=0.8, zorder=2)
    for r, d in zip(df.itertuples(), drop):
        if r.critical or d >= np.sort(drop)[-min(5, len(drop))]:
            ax.annotate(r.label, (r.composite, d), xytext=(3, 3), textcoords="offset points", fontsize=7)
    ax.axhline(0, color="#cccccc", lw=0.8)
    ax.set_xlabel("composite score (attention ranking)")
    ax.set_ylabel(f"accuracy drop when ablated alone (points, {report.settings['kind']})")
    fig.colorbar(points, ax=ax, label="layer")
    title = "composite vs causal effect"
    if len(row):
        r = row.iloc[0]
        title += f": Spearman {r.spearman:+.2f} [{r.ci_low:+.2f}, {r.ci_high:+.2f}]"
    ax.set_title(title, fontsize=10)
    return fig


def attribution_scatter(report: CausalReport) -> Figure:
    """Attribution-patching estimate against the exact change of the answer's logit difference, per kind."""
    kinds = [k for k in report.settings["kinds"] if k in set(report.agreement.get("kind", []))]
    fig = Figure(figsize=(4.2 * max(1, len(kinds)), 4.0), dpi=DPI, layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, max(1, len(kinds)), squeeze=False)[0])
    for ax, kind in zip(axes, kinds):
        df = report.head_effects
        df = df[(df["kind"] == kind) & (df["positions"] == "thoughts")]
        ax.scatter(df["logit_diff_change"], df["estimate"], s=20, color="#1b6ca8")
        lo = np.nanmin([df["logit_diff_change"].min(), df["estimate"].min()])
        hi = np.nanmax([df["logit_diff_change"].max(), df["estimate"].max()])
        ax.plot([lo, hi], [lo, hi], color="#cccccc", lw=0.8)
        rho = report.agreement.set_index("kind").loc[kind, "spearman"]
        ax.set_title(f"{kind}: Spearman {rho:+.2f}", fontsize=10)
        ax.set_xlabel("exact change of logit diff")
        ax.set_ylabel("attribution estimate")
    fig.suptitle("attribution patching vs the exact single-head scan (answer token, thought positions)", fontsize=10)
    return fig


def held_out_figure(held: HeldOut) -> Figure:
    """Accuracy change on the test half: the causal and composite top-k against their random sets."""
    fig = Figure(figsize=(7.2, 3.8), dpi=DPI, layout="constrained")
    ax = fig.add_subplot()
    for x, group, color in ((0, "causal", "#d1495b"), (1, "composite", "#edae49")):
        rand = held.sets[held.sets["group"] == f"random ({group})"]["delta_accuracy"].to_numpy(float)
        jitter = np.random.default_rng(x).uniform(-0.15, 0.15, len(rand))
        ax.scatter(x + 0.25 + jitter, 100 * rand, s=10, color="#1b6ca8", alpha=0.6,
                   label="random sets" if x == 0 else None)
        top = held.sets[held.sets["group"] == group].iloc[0]
        ax.errorbar([x], [100 * top["delta_accuracy"]],
                    yerr=[[100 * (top["delta_accuracy"] - top["delta_ci_low"])],
                          [100 * (top["delta_ci_high"] - top["delta_accuracy"])]], fmt="o", color=color, capsize=4,
                    label=f"{group} top-{held.k}")
    ax.axhline(0, color="#cccccc", lw=0.8)
    ax.set_xticks([0.12, 1.12], ["selected by causal effect\n(on half A)", "selected by composite\n(on half A)"])
    ax.set_ylabel("accuracy change on half B (points)")
    ax.set_xlim(-0.5, 1.9)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1), borderaxespad=0)  # beside, never on a point
    ax.set_title(f"top-{held.k} heads ablated together ({held.kind}) on the held-out half: {len(held.problems_b)} "
                 "problems", fontsize=10)
    return fig
