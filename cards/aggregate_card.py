"""Cards of the aggregate and end steps: what was extracted, where the latents' attention goes."""
from __future__ import annotations

import numpy as np
from metaflow.cards import Image, Markdown, Table

MASS_LABELS = {"sink": "first token", "question": "rest of question", "bot": "BOT", "latents": "latents"}


def _figure(width: float, height: float):
    from matplotlib.figure import Figure  # object API: no pyplot state, nothing shown

    return Figure(figsize=(width, height), dpi=110, layout="constrained")


def _image(fig) -> Image:
    return Image.from_matplotlib(fig)


def mean_matrix_figure(attention_avg: np.ndarray, title: str = "thought -> thought, mean of all heads"):
    """The 6x6 thought-to-thought matrix averaged over problems, layers and heads, with values (raw
    weights: fractions of the query's whole row)."""
    fig = _figure(4.8, 4.1)
    ax = fig.add_subplot()
    m = attention_avg.mean(axis=(0, 1))
    masked = np.ma.masked_where(np.triu(np.ones_like(m, dtype=bool), 1), m)
    im = ax.imshow(masked, cmap="viridis", vmin=0)
    for i in range(6):
        for j in range(i + 1):
            ax.text(j, i, f"{m[i, j]:.3f}", ha="center", va="center", fontsize=8,
                    color="white" if m[i, j] < 0.6 * m.max() else "black")
    ax.set_xticks(range(6), [f"z{j + 1}" for j in range(6)])
    ax.set_yticks(range(6), [f"z{i + 1}" for i in range(6)])
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
    ax.set_xticks(keep, [f"z{j + 1}" for j in keep])
    ax.set_ylabel("mean weight from rows i >= j + 2")
    ax.set_title("incoming attention per thought, with lift over the baseline", fontsize=9)
    fig.legend(*ax.get_legend_handles_labels(), fontsize=8, ncol=2, loc="outside lower center")
    return fig


def mass_figure(stats: dict):
    """Where each layer's latent queries put their attention (stacked shares of the row)."""
    fig = _figure(6.4, 3.6)
    ax = fig.add_subplot()
    by_layer = np.asarray(stats["mass_by_layer"])  # [L, parts]
    bottom = np.zeros(len(by_layer))
    for k, part in enumerate(stats["mass_parts"]):
        ax.bar(np.arange(len(by_layer)), by_layer[:, k], bottom=bottom, label=MASS_LABELS.get(part, part))
        bottom += by_layer[:, k]
    ax.set_xticks(range(len(by_layer)))
    ax.set_xlabel("layer")
    ax.set_ylabel("share of the latent query's row")
    ax.set_ylim(0, 1.02)
    ax.set_title("attention mass split of latent queries, by layer", fontsize=9)
    fig.legend(*ax.get_legend_handles_labels(), fontsize=8, ncol=4, loc="outside lower center")
    return fig


def numerics(model_info: dict) -> str:
    """dtype, device, attention and linear kernels, activation: what changes the numbers (codi-spec section 3)."""
    source = model_info.get("source", {})
    activation, linear = source.get("activation"), source.get("linear")
    return (f"{model_info['dtype']} on {model_info['device']}; sdpa for the question and decoding, eager for the "
            f"six latent steps" + (f"; linear layers {linear}" if linear else "")
            + (f"; activation {activation}" if activation else ""))


def aggregate_card(model_info: dict, n_sampled: int, stats: dict, accuracy: float, attention_avg: np.ndarray,
                   failed: list[dict], artifacts: list[tuple[str, str, str]]) -> list:
    """Totals, the mass split, the mean 6x6 matrix, incoming attention and the artifact table."""
    n = stats["n_problems"]
    mass = stats["mass_mean"]
    parts = [
        Markdown(f"# Aggregate: {n} of {n_sampled} problems, model {model_info['name']}"),
        Table([
            ["problems extracted", f"{n} of {n_sampled}" + (f" ({len(failed)} failed)" if failed else "")],
            ["accuracy", f"{100 * accuracy:.1f}%" if n else "n/a"],
            ["layers x heads", f"{model_info['n_layers']} x {model_info['n_heads']}"],
            ["numerics", numerics(model_info)],
            ["share of latent queries' attention on the six latents", f"{100 * mass['latents']:.1f}%"],
            ["... on the first token / rest of question / BOT",
             f"{100 * mass['sink']:.1f}% / {100 * mass['question']:.1f}% / {100 * mass['bot']:.1f}%"],
            ["mean self-attention (diagonal)", f"{stats['self_attention']:.4f}"],
            ["incoming attention over causal-uniform (z1 / z2 / z3 / z4)",
             " / ".join(f"{x:.2f}x" for x in stats["incoming_lift"][:4])],
        ], headers=["", ""]),
        Markdown("Raw weights (fractions of each latent query's whole row), all heads together. Hubs per "
                 "head, with intervals, are on the metrics card."),
    ]
    if n:
        parts += [_image(mean_matrix_figure(attention_avg)), _image(incoming_figure(stats)),
                  _image(mass_figure(stats))]
    if failed:
        parts += [Markdown("## Failed problems"),
                  Table([[f["id"], f["error"][:300]] for f in failed], headers=["id", "error"])]
    parts += [Markdown("## Artifacts of this step"), Table([list(a) for a in artifacts],
                                                          headers=["name", "shape / type", "meaning"])]
    return parts


def end_card(run_pathspec: str, model_name: str, demo: bool, accuracy: float, n: int,
             top_heads: list[str], compared: list[str]) -> list:
    """Where to find the results: Client API snippet, card and export commands."""
    flow, run_id = run_pathspec.split("/")
    parts = [Markdown(f"# Done: {run_pathspec}")]
    if demo:
        from cards.sample_card import DEMO_BANNER

        parts.append(Markdown(f"> **{DEMO_BANNER}**"))
    parts += [
        Table([["model", model_name], ["problems", str(n)], ["accuracy", f"{100 * accuracy:.1f}%"],
               ["top heads (composite)", ", ".join(top_heads) or "n/a"],
               ["compared with", ", ".join(compared) or "no other model yet"]], headers=["", ""]),
        Markdown("## Read the results\n"
                 f"```python\nfrom metaflow import Run\nrun = Run(\"{run_pathspec}\")\n"
                 "run.data.attention_raw      # float16 [N, L, H, 6, 6]\n"
                 "run.data.ranked_heads       # DataFrame, one row per (layer, head)\n```\n"
                 f"Cards: `python flows/attention_flow.py card view {run_id}/aggregate` (any step name)\n\n"
                 f"Files: `python -m codi_attn export {run_id} out/` writes results/{model_name}/ and "
                 f"figures/{model_name}/"),
    ]
    return parts
