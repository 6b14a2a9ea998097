"""Cards of the aggregate and end steps: what was extracted, where the thoughts' attention goes."""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from metaflow.cards import Markdown, Table

from cards.common import image

if TYPE_CHECKING:
    from codi_attn.heads import CausalReport


def numerics(model_info: dict) -> str:
    """dtype, device, attention and linear kernels, activation: what changes the numbers (codi-spec section 3)."""
    source = model_info.get("source", {})
    activation, linear = source.get("activation"), source.get("linear")
    return (f"{model_info['dtype']} on {model_info['device']}; sdpa for the question and decoding, eager for the "
            f"six thought steps" + (f"; linear layers {linear}" if linear else "")
            + (f"; activation {activation}" if activation else ""))


def provenance_table(provenance: dict) -> Table:
    """One row per input file read (codi_attn.provenance): role, source, where it was found, path, size, sha256."""
    from codi_attn.provenance import ROLES

    rows = []
    for role, entry in provenance.items():
        files = entry["files"] or {"": {"path": "(no file)", "size": None, "sha256": ""}}
        rows += [[ROLES[role], entry["source"], entry["where"], f["path"],
                  "" if f["size"] is None else f"{f['size']:,} bytes", f["sha256"][:16]] for f in files.values()]
    return Table(rows, headers=["input", "source", "found", "file", "size", "sha256 (first 16)"])


def aggregate_card(model_info: dict, n_sampled: int, stats: dict, accuracy: float, attention_avg: np.ndarray,
                   failed: list[dict], provenance: dict, artifacts: list[tuple[str, str, str]]) -> list:
    """Totals, the mass split, the mean 6x6 matrix, incoming attention, the input files and the artifact table."""
    from codi_attn.figures.extraction import incoming_figure, mass_figure, mean_matrix_figure

    n = stats["n_problems"]
    mass = stats["mass_mean"]
    parts = [
        Markdown(f"# Aggregate: {n} of {n_sampled} problems, model {model_info['name']}"),
        Table([
            ["problems extracted", f"{n} of {n_sampled}" + (f" ({len(failed)} failed)" if failed else "")],
            ["accuracy", f"{100 * accuracy:.1f}%" if n else "n/a"],
            ["layers x heads", f"{model_info['n_layers']} x {model_info['n_heads']}"],
            ["numerics", numerics(model_info)],
            ["share of thought queries' attention on the six thoughts", f"{100 * mass['thoughts']:.1f}%"],
            ["... on the first token / rest of question / BOT",
             f"{100 * mass['sink']:.1f}% / {100 * mass['question']:.1f}% / {100 * mass['bot']:.1f}%"],
            ["mean self-attention (diagonal)", f"{stats['self_attention']:.4f}"],
            ["incoming attention over causal-uniform, raw weights (z1 / z2 / z3 / z4)",
             " / ".join(f"{x:.2f}x" for x in stats["incoming_lift"][:4])],
        ], headers=["", ""]),
        Markdown("Raw weights (fractions of each thought query's whole row), all heads together, without "
                 "intervals. The metrics card's lifts, per head and with intervals, are on its own basis (rows "
                 "renormalised over the thoughts by default), so they differ from these."),
    ]
    if n:
        parts += [image(mean_matrix_figure(attention_avg)), image(incoming_figure(stats)),
                  image(mass_figure(stats))]
    if failed:
        parts += [Markdown("## Failed problems"),
                  Table([[f["id"], f["error"][:300]] for f in failed], headers=["id", "error"])]
    parts += [Markdown("## Input files\n\nEvery file the run read, as start fingerprinted it; each task that loads the "
                       "model checks the files it reads against these before any work."), provenance_table(provenance)]
    parts += [Markdown("## Artifacts of this step"), Table([list(a) for a in artifacts],
                                                          headers=["name", "shape / type", "meaning"])]
    return parts


def end_card(run_pathspec: str, model_name: str, demo: bool, accuracy: float, n: int,
             top_heads: list[str], causal: CausalReport | None, compared: list[str]) -> list:
    """The run in one table (the composite's top heads next to the causally critical ones of `causal`, None
    where the causal head analysis did not run) and where to find the rest: Client API snippet, card and export
    commands."""
    flow, run_id = run_pathspec.split("/")
    parts = [Markdown(f"# Done: {run_pathspec}")]
    if demo:
        from cards.sample_card import DEMO_BANNER

        parts.append(Markdown(f"> **{DEMO_BANNER}**"))
    if causal is None:
        causal_rows = [["causally critical heads", "not measured (--heads false)"]]
    else:
        from cards.heads_card import held_out_answer, ranking_answer

        critical = list(causal.critical()["label"])
        causal_rows = [[f"causally critical heads ({causal.settings['kind']} ablation)",
                        ", ".join(critical[:5]) + (f" and {len(critical) - 5} more" if len(critical) > 5 else "")
                        or "none"],
                       ["does the attention ranking predict them?", ranking_answer(causal)],
                       ["held out: accuracy change on half B (points, 95% interval)", held_out_answer(causal)]]
    parts += [
        Table([["model", model_name], ["problems", str(n)], ["accuracy", f"{100 * accuracy:.1f}%"],
               ["top heads (composite attention score)", ", ".join(top_heads) or "n/a"],
               *causal_rows,
               ["compared with", ", ".join(compared) or "no other model yet"]], headers=["", ""]),
        Markdown("## Read the results\n"
                 f"```python\nfrom metaflow import Run\nrun = Run(\"{run_pathspec}\")\n"
                 "run.data.attention_raw      # float16 [N, L, H, 6, 6]\n"
                 "run.data.ranked_heads       # DataFrame, one row per (layer, head)\n"
                 + ("run.data.head_effects       # DataFrame, each head's ablation effect with intervals\n"
                    if causal is not None else "") + "```\n"
                 f"Cards: `python flows/attention_flow.py card view {run_id}/aggregate` (any step name)\n\n"
                 f"Files: `python -m codi_attn export {run_id} out/` writes results/{model_name}/ and "
                 f"figures/{model_name}/"),
    ]
    return parts
