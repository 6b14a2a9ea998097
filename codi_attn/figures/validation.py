"""Bar charts of a causal validation (codi_attn.validate): accuracy with bootstrap intervals, answers changed and
answer-token KL for a set of conditions, the baseline drawn as a reference line. Each function returns a Figure
(matplotlib object API, Agg backend, never registered with pyplot)."""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from codi_attn.validate import ValidationResult, controls_origin  # noqa: E402

DPI = 100
GROUP_COLORS = {"baseline": "#7f7f7f", "no-op": "#bdbdbd", "top-k": "#d1495b", "top-k single": "#edae49",
                "random control": "#1b6ca8", "blocking": "#66a182", "latent swap": "#8e6bb0"}


def _describe(result: ValidationResult, heads: bool) -> str:
    s = result.settings
    where = "at the six thought steps" if s["positions"] == "thoughts" else "at every position"
    return f"{s['model']}, {s['n_problems']} problems" + (f"; {s['ablation']} ablation {where}" if heads else "")


def condition_figure(result: ValidationResult, groups: tuple[str, ...], title: str) -> Figure:
    """Three panels over the conditions of `groups` (baseline first): accuracy with its 95 % bootstrap
    interval (dashed line and band: the baseline's), share of answers changed, mean answer-token KL."""
    df = result.validation
    rows = pd.concat([df[df["group"] == "baseline"], df[df["group"].isin(groups)]])
    x = np.arange(len(rows))
    colors = [GROUP_COLORS[g] for g in rows["group"]]
    base = df[df["group"] == "baseline"].iloc[0]
    fig = Figure(figsize=(max(8.0, 2.5 + 0.55 * len(rows)), 6.6), dpi=DPI, layout="constrained")
    axes = fig.subplots(3, 1, sharex=True, height_ratios=(2.2, 1, 1))
    acc = 100 * rows["accuracy"].to_numpy()
    err = 100 * np.abs(rows[["ci_low", "ci_high"]].to_numpy().T - rows["accuracy"].to_numpy())
    axes[0].axhspan(100 * base["ci_low"], 100 * base["ci_high"], color=GROUP_COLORS["baseline"], alpha=0.12, lw=0)
    axes[0].axhline(100 * base["accuracy"], color=GROUP_COLORS["baseline"], ls="--", lw=1)
    axes[0].bar(x, acc, color=colors, yerr=err, capsize=3, ecolor="#333333")
    axes[0].set_ylabel("accuracy (%)\n95 % bootstrap CI")
    axes[0].set_ylim(0, min(112.0, max(5.0, 1.2 * float(np.max(100 * rows["ci_high"])))))
    for xi, top, a, d in zip(x, 100 * rows["ci_high"], acc, 100 * rows["delta_accuracy"]):
        label = f"{a:.0f}%" if xi == 0 else f"{a:.0f}% ({d:+.1f})"
        axes[0].annotate(label, (xi, top), xytext=(0, 2), textcoords="offset points", ha="center", va="bottom",
                         fontsize=7)
    axes[1].bar(x, 100 * rows["answers_changed"], color=colors)
    axes[1].set_ylabel("answers\nchanged (%)")
    kl = rows["kl_answer_token"].to_numpy()
    axes[2].bar(x, np.nan_to_num(kl), color=colors)
    for xi in x[np.isnan(kl)]:  # no problem kept the baseline's tokens up to the number
        axes[2].annotate("n/a", (xi, 0), xytext=(0, 2), textcoords="offset points", ha="center", va="bottom",
                         fontsize=7)
    axes[2].set_ylabel("KL answer token\n(nats, mean)")
    crowded = len(rows) > 8
    axes[2].set_xticks(x, rows["condition"], rotation=35 if crowded else 0, ha="right" if crowded else "center")
    for ax in axes:
        ax.spines[["top", "right"]].set_visible(False)
        ax.tick_params(labelsize=8)
    fig.suptitle(f"{title}\n{_describe(result, 'blocking' not in groups)}", fontsize=11)
    return fig


def ablation_figure(result: ValidationResult) -> Figure:
    """Top-k heads ablated together vs the random controls (and the no-op control)."""
    k = result.settings["k"]
    return condition_figure(result, ("no-op", "top-k", "random control"),
                            f"Ablating the composite's top-{k} heads vs {k} random other heads "
                            + controls_origin(result.settings))


def single_heads_figure(result: ValidationResult) -> Figure:
    """Each top-k head ablated alone."""
    return condition_figure(result, ("top-k single",), "Each of the composite's top heads ablated alone")


def blocking_figure(result: ValidationResult) -> Figure:
    """Each thought blocked (later queries give its key zero weight), all six, and the latent swap."""
    return condition_figure(result, ("blocking", "latent swap"),
                            "Blocking thoughts (a blocked thought's key gets zero weight from every later query)\n"
                            "and swapping them (each problem fed the six thoughts of another problem with as many "
                            "solution steps)")
