"""Figures of the head metrics (one model) and of a two-model comparison; each returns a Figure.

Figures are built with matplotlib's object API (Agg backend, never registered with pyplot, never
shown), about 1000 px wide. Thoughts are named z1..z6; 6x6 panels put the query thought i on rows and
the key thought j on columns, the invisible upper triangle left blank.
"""
from __future__ import annotations

import math

import matplotlib

matplotlib.use("Agg")
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402

from codi_attn.metrics import (BANDS, HIGH_COMPOSITE, LIFT_THRESHOLD, N_THOUGHTS,  # noqa: E402
                               WEIGHTS, MetricsReport, baseline_of, top_k)
from codi_attn.conventions import thought_name  # noqa: E402

DPI = 100
THOUGHTS = [thought_name(j + 1) for j in range(N_THOUGHTS)]
TYPE_COLORS = {"sequential": "#1f77b4", "self": "#9467bd", "hub": "#d62728", "long-range": "#ff7f0e",
               "mixed": "#7f7f7f", "diffuse": "#efe3bd"}
MODEL_COLORS = ("#1b6ca8", "#d1495b")
UPPER = np.triu(np.ones((N_THOUGHTS, N_THOUGHTS), bool), 1)


def _figure(width: float, height: float) -> Figure:
    return Figure(figsize=(width, height), dpi=DPI, layout="constrained")


def _title(report: MetricsReport, what: str) -> str:
    n, n_layers, n_heads = report.shape
    name = f"{report.name}: " if report.name else ""
    return f"{name}{what}\n{report.basis} basis, {n} problems, {n_layers} layers x {n_heads} heads"


def _attention_label(basis: str) -> str:
    return "attention (share within z1..z6)" if basis == "renorm" else "attention (share of the whole row)"


def _matrix(ax, m: np.ndarray, title: str, vmin: float, vmax: float, cmap: str = "rocket_r",
            fmt: str = ".2f", center: float | None = None, labels: tuple[bool, bool] = (True, True)) -> None:
    """One annotated 6x6 panel (lower triangle only)."""
    sns.heatmap(np.where(UPPER, np.nan, m), mask=UPPER, ax=ax, vmin=vmin, vmax=vmax, center=center,
                cmap=cmap, annot=True, fmt=fmt, annot_kws={"fontsize": 8}, cbar=False, square=True,
                linewidths=0.5, linecolor="white", xticklabels=THOUGHTS, yticklabels=THOUGHTS)
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("key thought j" if labels[0] else "")
    ax.set_ylabel("query thought i" if labels[1] else "")
    ax.tick_params(labelsize=8, length=0)
    ax.set_yticklabels(THOUGHTS, rotation=0)


def _scale_max(report: MetricsReport, ms: list[np.ndarray]) -> float:
    return 1.0 if report.basis == "renorm" else float(max(m.max() for m in ms)) or 1.0


def top_heads_heatmaps(report: MetricsReport, k: int = 6) -> Figure:
    """Problem-mean 6x6 matrices of the top-k heads by composite, values printed."""
    top = report.ranked_heads.head(k)
    ms = [report.matrix(lab) for lab in top["label"]]
    cols = min(3, len(top))
    rows = math.ceil(len(top) / cols)
    fig = _figure(10, 3.3 * rows + 0.8)
    axes = np.atleast_1d(fig.subplots(rows, cols)).ravel()
    vmax = _scale_max(report, ms)
    for n, (ax, (_, h), m) in enumerate(zip(axes, top.iterrows(), ms)):
        title = (f"#{n + 1} {h['label']} ({h['type']})\ncomposite {h['composite']:.2f}"
                 f" [{h['composite_lo']:.2f}, {h['composite_hi']:.2f}]")
        _matrix(ax, m, title, 0, vmax, labels=(n // cols == rows - 1, n % cols == 0))
    for ax in axes[len(top):]:
        ax.set_visible(False)
    fig.colorbar(axes[0].collections[0], ax=list(axes[:len(top)]), shrink=0.6,
                 label=_attention_label(report.basis))
    fig.suptitle(_title(report, f"top {len(top)} heads by composite"), fontsize=12)
    return fig


def _layer_head_axis(ax, n_layers: int, n_heads: int) -> None:
    step = max(1, n_heads // 8)
    ax.set_xticks(range(0, n_heads, step))
    ax.set_yticks(range(0, n_layers, max(1, n_layers // 8)))
    ax.set_xlabel("head")
    ax.set_ylabel("layer")


def _grid(df: pd.DataFrame, column: str, n_layers: int, n_heads: int) -> np.ndarray:
    g = np.full((n_layers, n_heads), np.nan)
    g[df["layer"].to_numpy(), df["head"].to_numpy()] = df[column].to_numpy(dtype=float)
    return g


def layer_head_maps(report: MetricsReport, metrics: tuple[str, ...] = ("composite", "flow", "hub", "skip")
                    ) -> Figure:
    """Layer x head map of each metric (a ranked_heads column); top-k heads by composite ringed."""
    _, n_layers, n_heads = report.shape
    df = report.ranked_heads
    top = df.head(top_k(len(df)))
    base = report.baseline.set_index("metric")["baseline"]
    cols = 2 if len(metrics) > 1 else 1
    rows = math.ceil(len(metrics) / cols)
    fig = _figure(10, rows * (1.2 + 3.4 * min(1.0, 1.4 * n_layers / n_heads)) + 0.6)
    axes = np.atleast_1d(fig.subplots(rows, cols)).ravel()
    for ax, metric in zip(axes, metrics):
        im = ax.imshow(_grid(df, metric, n_layers, n_heads), cmap="viridis", aspect="auto",
                       interpolation="nearest")
        ax.scatter(top["head"], top["layer"], s=60, facecolors="none", edgecolors="white", linewidths=1.5)
        note = f" (causal-uniform: {base[metric]:.2f})" if metric in base.index else ""
        ax.set_title(metric + note, fontsize=10)
        _layer_head_axis(ax, n_layers, n_heads)
        fig.colorbar(im, ax=ax, shrink=0.9)
    for ax in axes[len(metrics):]:
        ax.set_visible(False)
    fig.suptitle(_title(report, f"scores per head (white rings: top {len(top)} by composite)"), fontsize=12)
    return fig


def type_map(report: MetricsReport) -> Figure:
    """Functional type of every head (layer x head) and the type mix per layer band."""
    _, n_layers, n_heads = report.shape
    types = list(TYPE_COLORS)
    df = report.types.assign(code=report.types["type"].map(types.index))
    fig = _figure(10, 1.4 + 3.2 * min(1.0, 1.4 * n_layers / n_heads))
    ax, bx = fig.subplots(1, 2, width_ratios=[1.6, 1])
    cmap = matplotlib.colors.ListedColormap(list(TYPE_COLORS.values()))
    ax.imshow(_grid(df, "code", n_layers, n_heads), cmap=cmap, vmin=-0.5, vmax=len(types) - 0.5,
              aspect="auto", interpolation="nearest")
    _layer_head_axis(ax, n_layers, n_heads)
    ax.set_title("type per head", fontsize=10)
    shares = pd.crosstab(df["band"], df["type"], normalize="index").reindex(index=list(BANDS),
                                                                            columns=types, fill_value=0)
    left = np.zeros(len(shares))
    for t in types:
        bx.barh(shares.index, shares[t], left=left, color=TYPE_COLORS[t], edgecolor="white")
        left += shares[t].to_numpy()
    bx.invert_yaxis()
    bx.set_xlim(0, 1)
    bx.set_xlabel("share of heads in the band")
    bx.set_title("types per layer band (thirds of depth)", fontsize=10)
    fig.legend(handles=[Patch(color=c, label=t) for t, c in TYPE_COLORS.items()], loc="outside lower center",
               ncol=len(types), fontsize=9, frameon=False)
    fig.suptitle(_title(report, f"functional types (lift over causal-uniform >= {LIFT_THRESHOLD:g})"),
                 fontsize=12)
    return fig


def hub_analysis(report: MetricsReport) -> Figure:
    """Hubs against the causal-uniform baseline: the design's column sums, incoming attention from
    later thoughts (i >= j + 2) with intervals, and its lift with the claim threshold."""
    p = report.position_lift
    fig = _figure(12, 4.2)
    ax, bx, cx = fig.subplots(1, 3)
    x = np.arange(N_THOUGHTS)
    ax.bar(x - 0.2, p["colsum"], 0.4, color=MODEL_COLORS[0], label="observed")
    ax.bar(x + 0.2, p["colsum_baseline"], 0.4, color="#9e9e9e", label="causal-uniform")
    ax.set_xticks(x, THOUGHTS)
    ax.set_title("column sums (the design's hub input):\nbiased to z1 by causality alone", fontsize=10)
    ax.set_xlabel("key thought j")
    ax.set_ylabel("sum over query rows, mean over heads")
    ax.legend(fontsize=8, loc="best")
    q = p[p["rows"] > 0]
    err = np.abs(np.vstack([q["observed"] - q["observed_lo"], q["observed_hi"] - q["observed"]]))
    bx.bar(q["position"], q["observed"], 0.6, color=MODEL_COLORS[0], yerr=np.nan_to_num(err), capsize=3,
           label="observed (95% CI)")
    bx.scatter(q["position"], q["baseline"], marker="_", s=600, color="black", linewidths=2,
               label="causal-uniform", zorder=3)
    bx.set_xticks(q["position"], [f"{t}\n({r} row{'s' * (r != 1)})" for t, r in zip(q["thought"], q["rows"])])
    bx.set_title("incoming attention from thoughts i >= j+2", fontsize=10)
    bx.set_xlabel("key thought j")
    bx.set_ylabel("mean attention")
    bx.set_ylim(0, np.nanmax(q[["observed", "observed_hi", "baseline"]].to_numpy(float), initial=0) * 1.3)  # legend
    bx.legend(fontsize=8, loc="upper right")
    colors = ["#d62728" if h else (MODEL_COLORS[0] if e else "#c7c7c7") for h, e in zip(q["is_hub"], q["eligible"])]
    err = np.abs(np.vstack([q["lift"] - q["lift_lo"], q["lift_hi"] - q["lift"]]))
    cx.bar(q["position"], q["lift"], 0.6, color=colors, yerr=np.nan_to_num(err), capsize=3)
    cx.axhline(1, color="black", lw=1)
    cx.axhline(LIFT_THRESHOLD, color="#d62728", ls="--", lw=1, label=f"hub threshold {LIFT_THRESHOLD:g}x")
    cx.set_ylim(0, max(LIFT_THRESHOLD, np.nanmax(q["lift_hi"].to_numpy(float), initial=0)) * 1.25)
    cx.set_xticks(q["position"], [f"{t}\n{share:.0%} of\nheads hub" for t, share in zip(q["thought"], q["hub_heads"])],
                  fontsize=8)
    hubs = ", ".join(thought_name(h + 1) for h in report.hubs) or "none"
    cx.set_title(f"lift = observed / causal-uniform\nhub claimed: {hubs}", fontsize=10)
    cx.set_xlabel("key thought j (grey: too few rows to claim a hub)")
    cx.set_ylabel("lift")
    cx.legend(fontsize=8)
    fig.suptitle(_title(report, "hub analysis"), fontsize=12)
    return fig


def top_heads_overview(report: MetricsReport, k: int = 10) -> Figure:
    """Top-k heads: composite split into its weighted parts, 95% interval, top-k retention, type."""
    df = report.ranked_heads
    span = {s: (df[s].max() - df[s].min()) or 1.0 for s in ("hub", "skip")}
    top = df.head(k).iloc[::-1]
    parts = {"flow": WEIGHTS["flow"] * top["flow"],
             "hub": WEIGHTS["hub"] * (top["hub"] - df["hub"].min()) / span["hub"],
             "skip": WEIGHTS["skip"] * (top["skip"] - df["skip"].min()) / span["skip"]}
    fig = _figure(10, 1.4 + 0.42 * len(top))
    ax = fig.subplots()
    y = np.arange(len(top))
    left = np.zeros(len(top))
    for (name, v), c in zip(parts.items(), ("#4c72b0", "#c44e52", "#dd8452")):
        ax.barh(y, v, left=left, color=c, height=0.65, label=f"{WEIGHTS[name]:g} x {name}"
                + ("" if name == "flow" else " (min-max)"))
        left += v.to_numpy()
    ax.errorbar(top["composite"], y, xerr=np.abs(np.vstack([top["composite"] - top["composite_lo"],
                                                             top["composite_hi"] - top["composite"]])),
                fmt="none", ecolor="black", capsize=3, label="95% CI")
    ax.axvline(HIGH_COMPOSITE, color="black", ls=":", lw=1, label=f"high-composite > {HIGH_COMPOSITE:g}")
    u = report.baseline.set_index("metric").loc["composite", "baseline"]
    ax.axvline(u, color="#7f7f7f", ls="--", lw=1, label=f"causal-uniform head {u:.2f}")
    retention = [c for c in df.columns if c.endswith("_retention")][0]
    ax.set_yticks(y, [f"{lab}  ({t})" for lab, t in zip(top["label"], top["type"])])
    for yi, (hi, r) in enumerate(zip(top["composite_hi"], top[retention])):
        ax.text(np.nanmax([hi, 0]) + 0.01, yi, f"{retention[:-10]}: {r:.0%}" if np.isfinite(r) else "",
                va="center", fontsize=8)
    ax.set_xlim(0, 1.15)
    ax.set_xlabel("composite score")
    fig.legend(loc="outside right upper", fontsize=8)
    fig.suptitle(_title(report, f"top {len(top)} heads: composite parts and stability"), fontsize=12)
    return fig


def head_detail(report: MetricsReport, label: str) -> Figure:
    """One head: mean matrix, std across problems, log2 lift over causal-uniform, thought-block mass."""
    h = report.ranked_heads.set_index("label").loc[label]
    layer, head = int(h["layer"]), int(h["head"])
    m = report.means[report.basis][layer, head]
    u = baseline_of(m, report.basis)
    with np.errstate(divide="ignore", invalid="ignore"):
        lift = np.where(u > 0, np.log2(np.maximum(m, 1e-6) / u), np.nan)
    fig = _figure(10, 8.4)
    (ax, bx), (cx, dx) = fig.subplots(2, 2)
    _matrix(ax, m, "mean over problems", 0, _scale_max(report, [m]))
    _matrix(bx, report.std[layer, head], "std across problems", 0, None, cmap="Greys", labels=(True, False))
    _matrix(cx, np.clip(lift, -4, 4), "log2(observed / causal-uniform)", -3, 3, cmap="vlag", center=0)
    for panel, what in ((ax, _attention_label(report.basis)), (bx, "std"), (cx, "log2 lift")):
        fig.colorbar(panel.collections[0], ax=panel, shrink=0.8, label=what)
    rows = report.means["raw"][layer, head].sum(-1)
    dx.bar(THOUGHTS, rows, color=MODEL_COLORS[0], label="this head")
    dx.plot(THOUGHTS, report.means["raw"].sum(-1).mean((0, 1)), "k_", ms=30, mew=2, label="mean over heads")
    dx.set_ylim(0, max(1e-3, rows.max(), report.means["raw"].sum(-1).mean((0, 1)).max()) * 1.2)
    dx.set_xlabel("query thought i")
    dx.set_ylabel("share of the whole row on z1..z6")
    dx.set_title("thought-block mass of each query row", fontsize=10)
    dx.legend(fontsize=8)
    def ci(s: str) -> str:
        return f"{s} {h[s]:.2f} [{h[s + '_lo']:.2f}, {h[s + '_hi']:.2f}]"
    fig.suptitle(f"{report.name + ': ' if report.name else ''}{label} ({h['band']} layer, type {h['type']}, "
                 f"{report.basis} basis)\n{ci('composite')}, {ci('flow')}, {ci('hub')}, {ci('skip')}",
                 fontsize=11)
    return fig


# ---------------------------------------------------------------- comparison (from compare_reports)


def _real(flag) -> bool:
    """A compare_reports 'real' cell (True, False or NA) as a plain bool."""
    return bool(flag) if pd.notna(flag) else False


def _names(df: pd.DataFrame) -> tuple[str, str]:
    return df.attrs.get("names", ("a", "b"))


def _series(df: pd.DataFrame, quantity: str, section: str | None = None) -> pd.DataFrame:
    rows = df[df["quantity"] == quantity]
    return rows[rows["section"] == section] if section else rows


def _paired_bars(ax, rows: pd.DataFrame, names: tuple[str, str], groups: list[str]) -> None:
    """Grouped bars of both models with 95% intervals; '*' over groups whose difference is real."""
    x = np.arange(len(groups))
    rows = rows.set_index("group").reindex(groups)
    for k, (name, c) in enumerate(zip(names, MODEL_COLORS)):
        v = rows[f"value_{name}"].to_numpy(float)
        err = np.abs(np.vstack([v - rows[f"lo_{name}"], rows[f"hi_{name}"] - v]))
        ax.bar(x + (k - 0.5) * 0.38, v, 0.38, color=c, yerr=np.nan_to_num(err), capsize=3, label=name)
    top = np.nanmax(rows[[f"hi_{n}" for n in names] + [f"value_{n}" for n in names]].to_numpy(float), axis=1)
    for xi, (real, t) in enumerate(zip(rows["real"], top)):
        if _real(real):
            ax.text(xi, t * 1.04, "*", ha="center", fontsize=14)
    ax.set_xticks(x, groups)


def compare_hubs(df: pd.DataFrame) -> Figure:
    """Incoming-attention lift per key position of both models, with the hub threshold."""
    names = _names(df)
    rows = _series(df, "incoming lift", "hubs")
    fig = _figure(10, 4.2)
    ax = fig.subplots()
    _paired_bars(ax, rows, names, list(rows["group"]))
    ax.axhline(1, color="black", lw=1)
    ax.axhline(LIFT_THRESHOLD, color="#d62728", ls="--", lw=1, label=f"hub threshold {LIFT_THRESHOLD:g}x")
    ax.set_xlabel("key thought j (hubs claimable at z1, z2 only)")
    ax.set_ylabel("incoming lift over causal-uniform")
    ax.legend(fontsize=9)
    fig.suptitle(f"hub positions: {names[0]} vs {names[1]} (95% CI; * difference excludes 0)", fontsize=12)
    return fig


def compare_profiles(df: pd.DataFrame, quantities: tuple[str, ...] = ("flow", "seq", "skip"),
                     title: str = "flow along normalised depth") -> Figure:
    """Depth profiles (normalised layer depth) of the given quantities for both models."""
    names = _names(df)
    fig = _figure(10, 3.8)
    axes = np.atleast_1d(fig.subplots(1, len(quantities)))
    for ax, q in zip(axes, quantities):
        rows = _series(df, q, "depth profile")
        groups = list(rows["group"])
        x = np.arange(len(groups))
        for name, c in zip(names, MODEL_COLORS):
            ax.plot(x, rows[f"value_{name}"], "o-", color=c, label=name)
            ax.fill_between(x, rows[f"lo_{name}"].astype(float), rows[f"hi_{name}"].astype(float),
                            color=c, alpha=0.2)
        for xi, (real, v) in enumerate(zip(rows["real"], rows[[f"value_{n}" for n in names]].max(axis=1))):
            if _real(real):
                ax.annotate("*", (xi, v), textcoords="offset points", xytext=(0, 6), ha="center", fontsize=13)
        ax.set_xticks(x, groups)
        ax.set_xlabel("normalised layer depth")
        ax.set_title(q, fontsize=10)
        ax.margins(y=0.2)
    axes[0].legend(fontsize=9)
    fig.suptitle(f"{title}: {names[0]} vs {names[1]} (95% bands; * difference excludes 0)", fontsize=12)
    return fig


def compare_high_composite(df: pd.DataFrame) -> Figure:
    """High-composite heads (composite > HIGH_COMPOSITE) per normalised-depth bin and overall, as fractions."""
    names = _names(df)
    fig = _figure(10, 4.0)
    ax, bx = fig.subplots(1, 2, width_ratios=[2.2, 1])
    rows = _series(df, "high-composite fraction", "depth profile")
    _paired_bars(ax, rows, names, list(rows["group"]))
    ax.set_xlabel("normalised layer depth")
    ax.set_ylabel("fraction of heads")
    ax.set_title("per depth bin", fontsize=10)
    ax.legend(fontsize=9)
    overall = _series(df, "fraction", "high-composite heads").assign(group="all heads")
    _paired_bars(bx, overall, names, ["all heads"])
    counts = _series(df, "count", "high-composite heads")
    bx.set_title("overall: " + ", ".join(f"{n} {int(counts[f'value_{n}'].iloc[0])}" for n in names)
                 + " heads", fontsize=10)
    fig.suptitle(f"high-composite heads (composite > {HIGH_COMPOSITE:g}): {names[0]} vs {names[1]}"
                 " (95% CI; * difference excludes 0)", fontsize=12)
    return fig


def compare_head_maps(a: MetricsReport, b: MetricsReport, names: tuple[str, str] = ("a", "b"),
                      metric: str = "composite") -> Figure:
    """A metric over layer x head for both models side by side, layers on normalised depth."""
    fig = _figure(12, 4.8)
    axes = fig.subplots(1, 2)
    vmax = max(r.ranked_heads[metric].max() for r in (a, b))
    vmin = min(r.ranked_heads[metric].min() for r in (a, b))
    for ax, r, name in zip(axes, (a, b), names):
        _, n_layers, n_heads = r.shape
        im = ax.imshow(_grid(r.ranked_heads, metric, n_layers, n_heads), cmap="viridis", vmin=vmin, vmax=vmax,
                       aspect="auto", interpolation="nearest", extent=(-0.5, n_heads - 0.5, 1, 0))
        high = r.high_composite_heads
        ax.scatter(high["head"], high["depth"], s=40, facecolors="none", edgecolors="white", linewidths=1.3)
        ax.set_xlabel("head")
        ax.set_ylabel("normalised layer depth")
        ax.set_title(f"{name}: {n_layers} layers x {n_heads} heads, {len(high)} high-composite "
                     f"({len(high) / r.n_heads:.0%})", fontsize=10)
    fig.colorbar(im, ax=list(axes), shrink=0.9, label=metric)
    fig.suptitle(f"{metric} per head (white rings: high-composite, > {HIGH_COMPOSITE:g})", fontsize=12)
    return fig
