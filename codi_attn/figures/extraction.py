"""Figures of what was extracted: the mean 6x6 matrix, incoming attention against the causal-uniform baseline,
and where each layer's thought queries put their attention. Each returns a Figure (matplotlib's object API,
Agg backend, never registered with pyplot)."""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from codi_attn.conventions import N_THOUGHTS, THOUGHTS, thought_name  # noqa: E402

MASS_LABELS = {"sink": "first token", "question": "rest of question", "bot": "BOT", "thoughts": "thoughts"}


def _figure(width: float, height: float) -> Figure:
    return Figure(figsize=(width, height), dpi=110, layout="constrained")


def mean_matrix_figure(attention_avg: np.ndarray, title: str = "thought -> thought, mean of all heads"):
    """The 6x6 thought-to-thought matrix averaged over problems, layers and heads, with values (raw
    weights: fractions of the query's whole row)."""
    fig = _figure(5.6, 4.3)  # narrower, constrained layout gives up and drops the y label
    ax = fig.add_subplot()
    m = attention_avg.mean(axis=(0, 1))
    masked = np.ma.masked_where(np.triu(np.ones_like(m, dtype=bool), 1), m)
    im = ax.imshow(masked, cmap="viridis", vmin=0)
    for i in range(N_THOUGHTS):
        for j in range(i + 1):
            ax.text(j, i, f"{m[i, j]:.3f}", ha="center", va="center", fontsize=8,
                    color="white" if m[i, j] < 0.6 * m.max() else "black")
    ax.set_xticks(range(N_THOUGHTS), [thought_name(k) for k in THOUGHTS])
    ax.set_yticks(range(N_THOUGHTS), [thought_name(k) for k in THOUGHTS])
    ax.set_xlabel("key thought j")
    ax.set_ylabel("query thought i")
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.046, label="share of the whole row")
    return fig


def incoming_figure(stats: dict):
    """Mean attention each thought receives from thoughts two or more steps later, against the
    causal-uniform baseline (raw weights, all layers and heads)."""
    fig = _figure(5.4, 3.6)
    ax = fig.add_subplot()
    observed = np.asarray(stats["incoming"], float)
    keep = np.flatnonzero(~np.isnan(observed))  # z5, z6 have no such rows
    ax.bar(keep - 0.2, observed[keep], 0.4, label="measured")
    ax.bar(keep + 0.2, np.asarray(stats["incoming_baseline"], float)[keep], 0.4, label="causal-uniform baseline",
           color="lightgray")
    for j in keep:
        ax.text(j, max(observed[j], stats["incoming_baseline"][j]), f"{stats['incoming_lift'][j]:.2f}x",
                ha="center", va="bottom", fontsize=8)
    ax.set_xticks(keep, [thought_name(j + 1) for j in keep])
    ax.set_ylabel("mean weight from rows i >= j + 2")
    ax.set_title("incoming attention per thought, with lift over the baseline", fontsize=9)
    fig.legend(*ax.get_legend_handles_labels(), fontsize=8, ncol=2, loc="outside lower center")
    return fig


def mass_figure(stats: dict):
    """Where each layer's thought queries put their attention (stacked shares of the row)."""
    fig = _figure(6.4, 3.6)
    ax = fig.add_subplot()
    by_layer = np.asarray(stats["mass_by_layer"])  # [L, parts]
    bottom = np.zeros(len(by_layer))
    for k, part in enumerate(stats["mass_parts"]):
        ax.bar(np.arange(len(by_layer)), by_layer[:, k], bottom=bottom, label=MASS_LABELS.get(part, part))
        bottom += by_layer[:, k]
    ax.set_xticks(range(len(by_layer)))
    ax.set_xlabel("layer")
    ax.set_ylabel("share of the thought query's row")
    ax.set_ylim(0, 1.02)
    ax.set_title("attention mass split of thought queries, by layer", fontsize=9)
    fig.legend(*ax.get_legend_handles_labels(), fontsize=8, ncol=4, loc="outside lower center")
    return fig
