"""Write an AttentionFlow run's artifacts as plain files, for people who want files:

    results/<model>/   arrays (.npy), tables (.csv), summaries (.json)
    figures/<model>/   the figures of the run's cards (.png)

    python -m codi_attn export RUN_ID OUT_DIR          # or: from codi_attn.export import export_run
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pandas as pd

FLOW_NAME = "AttentionFlow"
ARRAYS = {  # artifact -> what it holds (also written to summary.json)
    "attention_raw": "float16 [N, L, H, 6, 6]: A[n, l, h, i, j], query thought i -> key thought j, share of the whole row",
    "attention_mass": "float16 [N, L, H, 6, 4]: each thought row's share on sink, question, bot, thoughts",
    "attention_avg": "float32 [L, H, 6, 6]: mean of attention_raw over problems",
    "attention_std": "float32 [L, H, 6, 6]: std of attention_raw over problems",
}


class ExportError(ValueError):
    """A run that cannot be exported (not found, not finished)."""


def find_run(run_id: str, flow: str = FLOW_NAME):
    """The run named by an id, a pathspec 'Flow/id' or 'latest' (latest successful run), in any namespace."""
    from metaflow import Flow, Run, namespace
    from metaflow.exception import MetaflowNotFound

    namespace(None)
    try:
        if run_id == "latest":
            run = Flow(flow).latest_successful_run
            if run is None:
                raise ExportError(f"{flow} has no successful run in this datastore")
            return run
        return Run(run_id if "/" in run_id else f"{flow}/{run_id}")
    except MetaflowNotFound as e:
        raise ExportError(f"run {run_id!r} not found in this datastore ({e}); pass --datastore DIR (the "
                          f"folder that holds .metaflow) or set METAFLOW_DATASTORE_SYSROOT_LOCAL") from None


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return _jsonable(x.tolist())
    if isinstance(x, (np.integer, np.bool_)):
        return x.item()
    if isinstance(x, (float, np.floating)):
        return None if math.isnan(x) else float(x)
    return x


def _write_json(path: Path, obj) -> Path:
    path.write_text(json.dumps(_jsonable(obj), indent=2, allow_nan=False) + "\n")
    return path


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_")


def _save_figure(fig, path: Path) -> Path:
    fig.savefig(path, dpi=fig.dpi, bbox_inches="tight")
    fig.clear()
    return path


def export_run(run, out_dir: str | Path, name: str | None = None, figures: bool = True) -> list[Path]:
    """Write results/<name>/ and figures/<name>/ under out_dir from a finished run (name: the run's
    model). Returns the written paths."""
    if not run.successful:
        raise ExportError(f"run {run.pathspec} did not finish; resume it first: "
                          f"python flows/attention_flow.py resume --origin-run-id {run.id}")
    d = run.data
    name = _slug(name or d.model)
    res = Path(out_dir) / "results" / name
    res.mkdir(parents=True, exist_ok=True)
    written = []
    for key in ARRAYS:
        np.save(res / f"{key}.npy", getattr(d, key))
        written.append(res / f"{key}.npy")

    gold = {p["id"]: p["answer"] for p in d.problems}
    questions = {p["id"]: p["question"] for p in d.problems}
    problems = pd.DataFrame({"id": d.problem_ids, "gold": [gold[i] for i in d.problem_ids],
                             "prediction": d.predictions, "correct": d.correct, "text": d.texts,
                             "question": [questions[i] for i in d.problem_ids]})
    problems.to_csv(res / "problems.csv", index=False)
    d.ranked_heads.to_csv(res / "ranked_heads.csv", index=False)
    d.criteria.to_csv(res / "criteria.csv", index=False)
    written += [res / "problems.csv", res / "ranked_heads.csv", res / "criteria.csv"]
    for key, frame in d.rankings.items():
        frame.to_csv(res / f"{_slug(key)}.csv", index=False)
        written.append(res / f"{_slug(key)}.csv")
    report = getattr(d, "causal_report", None) if "causal_report" in d else None
    if report is not None:
        tables = {"head_effects": report.head_effects, "head_correlations": report.correlations,
                  "head_attribution_agreement": report.agreement}
        if report.held_out is not None:
            tables |= {"held_out_sets": report.held_out.sets, "held_out_summary": report.held_out.summary}
        for key, frame in tables.items():
            frame.to_csv(res / f"{key}.csv", index=False)
            written.append(res / f"{key}.csv")
    thoughts = getattr(d, "thought_report", None) if "thought_report" in d else None
    if thoughts is not None:
        tables = {"thought_probes": thoughts.probes, "thought_lens": thoughts.lens,
                  "thought_mean_patching": thoughts.mean_patching, "thought_pair_patching": thoughts.pair_patching,
                  "thought_attended_by_kind": thoughts.attended_by_kind,
                  "thought_attended_by_step": thoughts.attended_by_step}
        for key, frame in tables.items():
            frame.to_csv(res / f"{key}.csv", index=False)
            written.append(res / f"{key}.csv")
        written.append(_write_json(res / "thought_findings.json", {
            "findings": thoughts.findings, "notes": thoughts.notes, "pairs": thoughts.pair_facts,
            "baseline_accuracy": thoughts.baseline_accuracy, "settings": thoughts.settings}))
    comparisons = [("comparison", d.comparison), ("causal_comparison", getattr(d, "causal_comparison", {}))]
    for prefix, frames in comparisons:
        for other, frame in frames.items():
            path = res / f"{prefix}_{_slug(other.replace('/', '_'))}.csv"
            frame.to_csv(path, index=False)
            written.append(path)
    written.append(_write_json(res / "attention_stats.json", d.attention_stats))
    written.append(_write_json(res / "failed_problems.json", d.failed_problems))
    written.append(_write_json(res / "summary.json", {
        "run": run.pathspec, "model": d.model, "model_info": d.model_info, "settings": d.settings,
        "demo_model": d.demo, "dataset_fingerprint": d.dataset_fingerprint, "n_sampled": len(d.sampled_ids),
        "n_extracted": len(d.problem_ids), "n_failed": len(d.failed_problems), "accuracy": d.accuracy,
        "mass_parts": d.mass_parts, "compared_runs": d.compared_runs, "warnings": d.metric_warnings,
        "arrays": {k: {"file": f"{k}.npy", "shape": list(getattr(d, k).shape), "meaning": v}
                   for k, v in ARRAYS.items()},
        "tags": sorted(run.tags)}))
    if figures:
        written += write_figures(d, Path(out_dir) / "figures" / name)
    return written


def write_figures(d, fig_dir: Path) -> list[Path]:
    """The cards' figures as PNG files."""
    from codi_attn.figures import metrics as metric_figures
    from codi_attn.figures.extraction import incoming_figure, mass_figure, mean_matrix_figure

    fig_dir.mkdir(parents=True, exist_ok=True)
    report = d.metrics_report
    figs = {
        "mean_attention_matrix": mean_matrix_figure(d.attention_avg),
        "incoming_attention": incoming_figure(d.attention_stats),
        "mass_split_by_layer": mass_figure(d.attention_stats),
        "hub_analysis": metric_figures.hub_analysis(report),
        "top_heads_overview": metric_figures.top_heads_overview(report),
        "top_heads_heatmaps": metric_figures.top_heads_heatmaps(report),
        "layer_head_maps": metric_figures.layer_head_maps(report),
        "type_map": metric_figures.type_map(report),
    }
    causal = getattr(d, "causal_report", None) if "causal_report" in d else None
    if causal is not None:
        from codi_attn.figures import heads as head_figures

        figs |= {"head_effects": head_figures.effect_maps(causal),
                 "composite_vs_effect": head_figures.composite_scatter(causal)}
        if causal.held_out is not None:
            figs["held_out_top_heads"] = head_figures.held_out_figure(causal.held_out)
        if len(causal.agreement):
            figs["attribution_vs_exact"] = head_figures.attribution_scatter(causal)
    thoughts = getattr(d, "thought_report", None) if "thought_report" in d else None
    if thoughts is not None:
        from codi_attn.figures import thoughts as thought_figures

        figs |= {"thought_attended_tokens": thought_figures.attended_examples(thoughts),
                 "thought_attended_kinds": thought_figures.attended_kinds(thoughts),
                 "thought_probes": thought_figures.probe_maps(thoughts),
                 "thought_lens": thought_figures.lens_maps(thoughts),
                 "thought_patching": thought_figures.patching_maps(thoughts)}
    return [_save_figure(fig, fig_dir / f"{key}.png") for key, fig in figs.items()]
