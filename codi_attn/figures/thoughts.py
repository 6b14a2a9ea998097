"""Figures of what each thought holds (codi_attn.contents): attended tokens on the question text, attention by
token kind and by step operands, probe and lens maps (position x layer per target), and the patching maps. Each
returns a Figure (matplotlib's object API, Agg backend, never registered with pyplot)."""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from codi_attn.contents import ThoughtReport, best_probes  # noqa: E402
from codi_attn.conventions import THOUGHTS, thought_name  # noqa: E402
from codi_attn.probes import POSITIONS, TOO_FEW  # noqa: E402

DPI = 100
KIND_COLORS = {"number": "#d1495b", "operation": "#edae49", "other": "#9e9e9e"}


def attended_examples(report: ThoughtReport) -> Figure:
    """Each example question, token by token (numbers red, operation words orange; a step's operands carry its
    number), with every thought's attention on each token as a heat row."""
    examples = report.examples
    fig = Figure(figsize=(15, 2.6 * max(1, len(examples))), dpi=DPI, layout="constrained")
    axes = np.atleast_1d(fig.subplots(max(1, len(examples)), 1, squeeze=False)[:, 0])
    for ax, ex in zip(axes, examples):
        w = np.asarray(ex["weights"], float)
        image = ax.imshow(w, aspect="auto", cmap="magma_r", vmin=0)
        fig.colorbar(image, ax=ax, fraction=0.02, pad=0.01, label="attention")
        labels = [t.strip() + (f"\n[{','.join(map(str, ops))}]" if ops else "")
                  for t, ops in zip(ex["tokens"], ex["operand_of"])]
        ax.set_xticks(range(len(labels)), labels, rotation=90, fontsize=8 if len(labels) <= 60 else 6)
        for tick, kind in zip(ax.get_xticklabels(), ex["kinds"]):
            tick.set_color(KIND_COLORS[kind] if kind != "other" else "#333333")
        ax.set_yticks(range(len(THOUGHTS)), [thought_name(k) for k in THOUGHTS], fontsize=8)
        ax.set_title(f"{ex['id']}: attention of each thought on the question's tokens (mean of all layers and heads; "
                     "[s]: operand of step s)", fontsize=9)
    return fig


def attended_kinds(report: ThoughtReport) -> Figure:
    """Share of each thought's question attention on numbers, operation words and other tokens; and on the
    operands of each solution step."""
    fig = Figure(figsize=(12, 3.8), dpi=DPI, layout="constrained")
    left, right = fig.subplots(1, 2, width_ratios=(1, 1.3))
    k = report.attended_by_kind
    bottom = np.zeros(len(k))
    for kind, color in KIND_COLORS.items():
        left.bar(k["thought"], 100 * k[f"share_{kind}"], bottom=bottom, color=color, label=kind)
        bottom += 100 * k[f"share_{kind}"].to_numpy()
    if report.attended_heads_by_kind is not None:
        h = report.attended_heads_by_kind
        left.plot(h["thought"], 100 * h["share_number"], "k^-", ms=5,
                  label=f"numbers, heads {' '.join(report.settings['heads'])[:40]}")
    left.set_ylabel("% of the thought's question attention")
    left.set_ylim(0, 125)  # the legend above the stacked bars (100%), never on them
    left.set_yticks(range(0, 101, 20))
    left.legend(fontsize=7, loc="upper center", ncols=4, frameon=False)
    left.set_title("by token kind (all layers and heads)", fontsize=9)
    s = report.attended_by_step.pivot(index="thought", columns="step", values="share")
    image = right.imshow(100 * s.to_numpy(), cmap="viridis", aspect="auto")
    right.set_xticks(range(s.shape[1]), [f"step {c}" for c in s.columns], fontsize=8)
    right.set_yticks(range(s.shape[0]), s.index, fontsize=8)
    for (i, j), v in np.ndenumerate(100 * s.to_numpy()):
        right.text(j, i, f"{v:.0f}", ha="center", va="center", fontsize=7, color="white")
    fig.colorbar(image, ax=right, label="% on the step's operands")
    right.set_title("on the operands of each solution step", fontsize=9)
    return fig


def _target_grid(df: pd.DataFrame, value: str, title: str, cmap: str, vmin: float, vmax: float | None,
                 annotate: str | None = None, empty: str = "", chosen: pd.DataFrame | None = None) -> Figure:
    """One position x layer panel per target; `chosen` (best_probes) boxes each target's cell chosen on half A:
    solid where half B calls it decodable, dashed where not."""
    from matplotlib.patches import Rectangle

    if not len(df):
        fig = Figure(figsize=(8, 1.2), dpi=DPI)
        ax = fig.add_subplot()
        ax.axis("off")
        ax.text(0.5, 0.5, f"{title}\n{empty}", ha="center", va="center", fontsize=10, transform=ax.transAxes)
        return fig
    targets = list(dict.fromkeys(df["target"]))
    cols = min(5, max(1, len(targets)))
    rows = -(-len(targets) // cols)
    layers = int(df["layer"].max()) + 1 if len(df) else 1
    fig = Figure(figsize=(2.9 * cols, 0.6 + 2.3 * rows), dpi=DPI, layout="constrained")
    axes = np.atleast_2d(fig.subplots(rows, cols, squeeze=False))
    image = None
    vmax = vmax if vmax is not None else max(0.2, float(df[value].max()) if len(df) else 1.0)
    for ax, target in zip(axes.ravel(), targets):
        part = df[df["target"] == target]
        grid = np.full((len(POSITIONS), layers), np.nan)
        note = np.full((len(POSITIONS), layers), np.nan)
        for r in part.itertuples():
            grid[POSITIONS.index(r.position), r.layer] = getattr(r, value)
            if annotate:
                note[POSITIONS.index(r.position), r.layer] = getattr(r, annotate)
        image = ax.imshow(grid, cmap=cmap, vmin=vmin, vmax=vmax, aspect="auto")
        if annotate and layers <= 6:
            for (i, j), v in np.ndenumerate(note):
                if not np.isnan(v):
                    ax.text(j, i, f"{100 * v:.0f}", ha="center", va="center", fontsize=6)
        verdict = ""
        if chosen is not None and target in set(chosen["target"]):
            c = chosen[chosen["target"] == target].iloc[0]
            ax.add_patch(Rectangle((c["layer"] - 0.5, POSITIONS.index(c["position"]) - 0.5), 1, 1, fill=False, lw=1.8,
                                   ls="-" if c["decodable"] else "--", ec="black"))
            verdict = ": read on B" if c["decodable"] else ": not read on B"
        ax.set_title(target + verdict, fontsize=9)
        ax.set_yticks(range(len(POSITIONS)), POSITIONS, fontsize=7)
        ax.set_xticks(range(layers), range(layers), fontsize=7)
        ax.set_xlabel("layer", fontsize=7)
    for ax in axes.ravel()[len(targets):]:
        ax.set_visible(False)
    if image is not None:
        fig.colorbar(image, ax=list(axes.ravel()), shrink=0.6)
    fig.suptitle(title, fontsize=10)
    return fig


def probe_maps(report: ThoughtReport) -> Figure:
    """Selectivity (probe accuracy - control-task accuracy) per position and layer, one panel per target; the
    numbers are the accuracies in %; each target's chosen cell boxed with its half-B verdict."""
    return _target_grid(report.probes, "selectivity", "linear probes on all problems: accuracy - control task "
                        "(colour), accuracy % (text), 5-fold cross-validated\nbox: the cell chosen on half A, solid "
                        "where half B reads the target above every control, dashed where it does not",
                        "RdBu", -0.5, 0.5, annotate="accuracy", empty=f"no target: {TOO_FEW}",
                        chosen=best_probes(report.probes) if "selectivity_a" in report.probes else None)  # old: none


def lens_maps(report: ThoughtReport) -> Figure:
    """Share of problems whose target value is the top number token of the lens, per position and layer."""
    return _target_grid(report.lens, "top1", "lens per layer: share of problems whose value ranks first among the "
                        "number tokens", "viridis", 0.0, None, annotate="top1",
                        empty="no target value is spelled by a single number token")


def patching_maps(report: ThoughtReport) -> Figure:
    """Mean patching (accuracy with the same-value mean; answers moved to the counterfactual with another value)
    and clean -> corrupted recovery per thought and layer (and the fed z)."""
    fig = Figure(figsize=(15, 3.9), dpi=DPI, layout="constrained")
    axes = fig.subplots(1, 3)
    mp = report.mean_patching
    for ax, (kind, value, title) in zip(axes[:2], (("same", "accuracy", "accuracy, same-value mean"),
                                                   ("different", "counterfactual",
                                                    "answers moved to the counterfactual"))):
        part = mp[mp["kind"] == kind].pivot(index="thought", columns="step", values=value) if len(mp) else None
        if part is None or part.empty:
            ax.set_visible(False)
            continue
        image = ax.imshow(100 * part.to_numpy(), cmap="viridis", vmin=0, vmax=100, aspect="auto")
        for (i, j), v in np.ndenumerate(100 * part.to_numpy()):
            ax.text(j, i, f"{v:.0f}", ha="center", va="center", fontsize=7, color="white")
        ax.set_xticks(range(part.shape[1]), [f"step {c}" for c in part.columns], fontsize=8)
        ax.set_yticks(range(part.shape[0]), part.index, fontsize=8)
        ax.set_title(f"mean patching: {title} (%)", fontsize=9)
        fig.colorbar(image, ax=ax, shrink=0.8)
    pp = report.pair_patching
    ax = axes[2]
    if len(pp):
        part = pp.pivot(index="thought", columns="layer", values="recovery")
        cols = [c for c in part.columns if c != "z"] + (["z"] if "z" in part.columns else [])
        part = part[cols].reindex([thought_name(k) for k in THOUGHTS])
        image = ax.imshow(part.to_numpy(float), cmap="RdBu", vmin=-1, vmax=1, aspect="auto")
        for (i, j), v in np.ndenumerate(part.to_numpy(float)):
            if not np.isnan(v):
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7)
        ax.set_xticks(range(len(cols)), [f"L{c}" if c != "z" else "z fed" for c in cols], fontsize=8)
        ax.set_yticks(range(len(THOUGHTS)), part.index, fontsize=8)
        ax.set_title(f"clean -> corrupted: recovery of the logit diff ({report.pair_facts.get('valid', 0)} pairs)",
                     fontsize=9)
        fig.colorbar(image, ax=ax, shrink=0.8)
    else:
        ax.set_visible(False)
    return fig
