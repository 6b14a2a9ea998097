"""Write an AttentionFlow run's artifacts as plain files, for people who want files:

    results/<model>/   arrays (.npy), tables (.csv), summaries (.json)
    figures/<model>/   the figures of the run's cards (.png)

    python -m codi_attn export RUN_ID OUT_DIR          # or: from codi_attn.export import export_run
"""
from __future__ import annotations

import errno
import json
import math
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

FLOW_NAME = "AttentionFlow"
ARRAYS = {  # artifact -> what it holds (also written to summary.json)
    "attention_raw": "float16 [N, L, H, 6, 6]: A[n, l, h, i, j], query thought i + 1 -> key thought j + 1 (axes "
                     "from 0), share of the whole row",
    "attention_mass": "float16 [N, L, H, 6, 4]: each thought row's share on sink, question, bot, thoughts",
    "attention_avg": "float32 [L, H, 6, 6]: mean of attention_raw over problems",
    "attention_std": "float32 [L, H, 6, 6]: std of attention_raw over problems",
}


class ExportError(ValueError):
    """A run that cannot be exported (not found, not finished)."""


def find_run(run_id: str, flow: str = FLOW_NAME):
    """The run named by an id, a pathspec 'Flow/id' or 'latest' (latest successful run), in any namespace."""
    from metaflow import Flow, Run, namespace
    from metaflow.exception import MetaflowInvalidPathspec, MetaflowNotFound

    namespace(None)
    try:
        if run_id == "latest":
            run = Flow(flow).latest_successful_run
            if run is None:
                raise ExportError(f"{flow} has no successful run in this datastore")
            return run
        return Run(run_id if "/" in run_id else f"{flow}/{run_id}")
    except MetaflowInvalidPathspec:
        raise ExportError(f"{run_id!r} names no run: pass a run id, {flow}/RUN_ID or latest") from None
    except MetaflowNotFound as e:
        raise ExportError(f"run {run_id!r} not found in this datastore ({e}); pass --datastore DIR (the "
                          f"folder that holds .metaflow) or set METAFLOW_DATASTORE_SYSROOT_LOCAL") from None


def _jsonable(x):
    """x with numpy values as Python ones and nan or +-inf as null (JSON has neither)."""
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return _jsonable(x.tolist())
    if isinstance(x, (np.integer, np.bool_)):
        return x.item()
    if isinstance(x, (float, np.floating)):
        return float(x) if math.isfinite(x) else None
    return x


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(_jsonable(obj), indent=2, allow_nan=False) + "\n")


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_")


def folder_name(name: str | None, model: str) -> str:
    """The folder under results/ and figures/: --name (default: the model) made safe; ExportError naming --name
    where nothing of it is left, or only '.' or '..' (results/ itself or the folder above)."""
    slug = _slug(name or model)
    if slug in ("", ".", ".."):
        what = f"--name {name!r}" if name else f"the run's model name {model!r}, the default of --name,"
        raise ExportError(f"{what} leaves no folder name under results/ and figures/ (got {slug!r}): pass "
                          "--name with a letter or digit in it")
    return slug


def _save_figure(fig, path: Path) -> None:
    fig.savefig(path, dpi=fig.dpi, bbox_inches="tight")
    fig.clear()


def export_run(run, out_dir: str | Path, name: str | None = None, figures: bool = True,
               overwrite: bool = False) -> list[Path]:
    """Write results/<name>/ and figures/<name>/ under out_dir from a finished run (name: the run's model);
    returns the written paths. Every file is written into a hidden folder in out_dir first and the folders are
    renamed into place once all are complete: a failed export (full disk, read-only folder) leaves nothing
    behind, and an earlier export of that name is replaced only with overwrite=True, after the new one is whole
    (its figures too where this export writes none: no figures of another run stay beside the new results).
    ExportError names the file or folder and what to do."""
    if not run.successful:
        raise ExportError(f"run {run.pathspec} did not finish; resume it first: "
                          f"python flows/attention_flow.py resume --origin-run-id {run.id}")
    d, name, out = run.data, folder_name(name, run.data.model), Path(out_dir)
    folders = [Path("results") / name] + ([Path("figures") / name] if figures else [])
    if out.exists() and not out.is_dir():
        raise ExportError(f"{out} is a file, not a folder: pass a folder as OUT_DIR")
    taken = [out / f for f in (Path("results") / name, Path("figures") / name) if (out / f).exists()]
    if taken and not overwrite:
        raise ExportError(f"{taken[0]} already exists: pass --overwrite to replace it (overwrite=True), or "
                          f"--name NAME to export beside it")
    writers = _result_writers(run, folders[0])
    if figures:
        writers |= figure_writers(d, folders[1])
    staging = None
    try:
        out.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".export-{name}-", dir=out))
        for rel, write in writers.items():
            (staging / rel).parent.mkdir(parents=True, exist_ok=True)
            try:
                write(staging / rel)
            except OSError as e:
                raise _write_failure(e, out / rel, out) from None
        _swap_in(staging, out, folders, [] if figures else [Path("figures") / name])
    except OSError as e:  # making out_dir or the hidden folder, renaming into place
        raise _write_failure(e, out, out) from None
    finally:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
    return [out / rel for rel in writers]


def _write_failure(e: OSError, path: Path, out: Path) -> ExportError:
    """One line for a write that failed: the final path, the system's reason, what to do; nothing was left."""
    todo = {errno.ENOSPC: "free space on that disk or export to another OUT_DIR",
            errno.EDQUOT: "free space in your quota or export to another OUT_DIR",
            errno.EACCES: "export to a folder you can write",
            errno.EPERM: "export to a folder you can write",
            errno.EROFS: "export to a folder on a writable disk"}.get(e.errno, "fix that and export again")
    return ExportError(f"cannot write {path}: {e.strerror or e}; {todo} (nothing was written to {out}, and no file "
                       f"there was changed)")


def _swap_in(staging: Path, out: Path, folders: list[Path], stale: list[Path]) -> None:
    """Rename each complete folder from staging to out, an earlier one of that name into staging (removed with it),
    and the `stale` folders of an earlier export into staging too; if a rename fails, the folders already moved are
    put back."""
    moved = []
    try:
        for i, rel in enumerate(stale):
            if (out / rel).exists():
                os.rename(out / rel, staging / f"stale-{i}")
                moved.append((out / rel, staging / f"stale-{i}"))
        for i, rel in enumerate(folders):
            (out / rel).parent.mkdir(exist_ok=True)
            if (out / rel).exists():
                os.rename(out / rel, staging / f"old-{i}")
                moved.append((out / rel, staging / f"old-{i}"))
            os.rename(staging / rel, out / rel)
            moved.append((staging / rel, out / rel))
    except OSError:
        for src, dst in reversed(moved):
            os.rename(dst, src)
        raise


def _result_writers(run, res: Path) -> dict[Path, Callable[[Path], None]]:
    """results/<name>/: relative path -> the function that writes it."""
    d = run.data
    writers = {res / f"{key}.npy": (lambda p, a=getattr(d, key): np.save(p, a)) for key in ARRAYS}

    def csv(frame: pd.DataFrame) -> Callable[[Path], None]:
        return lambda p: frame.to_csv(p, index=False)

    def js(obj) -> Callable[[Path], None]:
        return lambda p: _write_json(p, obj)

    gold = {p["id"]: p["answer"] for p in d.problems}
    questions = {p["id"]: p["question"] for p in d.problems}
    problems = pd.DataFrame({"id": d.problem_ids, "gold": [gold[i] for i in d.problem_ids],
                             "prediction": d.predictions, "correct": d.correct, "text": d.texts,
                             "question": [questions[i] for i in d.problem_ids]})
    tables = {"problems": problems, "ranked_heads": d.ranked_heads, "criteria": d.criteria}
    tables |= {_slug(key): frame for key, frame in d.rankings.items()}
    report = getattr(d, "causal_report", None) if "causal_report" in d else None
    if report is not None:
        tables |= {"head_effects": report.head_effects, "head_correlations": report.correlations,
                   "head_attribution_agreement": report.agreement}
        if report.held_out is not None:
            tables |= {"held_out_sets": report.held_out.sets, "held_out_summary": report.held_out.summary}
    validation = getattr(d, "validation", None) if "validation" in d else None
    if validation is not None:
        tables["validation"] = validation
    thoughts = getattr(d, "thought_report", None) if "thought_report" in d else None
    if thoughts is not None:
        tables |= {"thought_probes": thoughts.probes, "thought_lens": thoughts.lens,
                   "thought_mean_patching": thoughts.mean_patching, "thought_pair_patching": thoughts.pair_patching,
                   "thought_attended_by_kind": thoughts.attended_by_kind,
                   "thought_attended_by_step": thoughts.attended_by_step}
    comparisons = [("comparison", d.comparison), ("causal_comparison", getattr(d, "causal_comparison", {}))]
    tables |= {f"{prefix}_{_slug(other.replace('/', '_'))}": frame
               for prefix, frames in comparisons for other, frame in frames.items()}
    writers |= {res / f"{key}.csv": csv(frame) for key, frame in tables.items()}
    writers |= {res / "attention_stats.json": js(d.attention_stats),
                res / "failed_problems.json": js(d.failed_problems),
                res / "summary.json": js({
        "run": run.pathspec, "model": d.model, "model_info": d.model_info, "settings": d.settings,
        "demo_model": d.demo, "dataset_fingerprint": d.dataset_fingerprint, "n_sampled": len(d.sampled_ids),
        "n_extracted": len(d.problem_ids), "n_failed": len(d.failed_problems), "accuracy": d.accuracy,
        "mass_parts": d.mass_parts, "compared_runs": d.compared_runs, "warnings": d.metric_warnings,
        "arrays": {k: {"file": f"{k}.npy", "shape": list(getattr(d, k).shape), "meaning": v}
                   for k, v in ARRAYS.items()},
        "tags": sorted(run.tags)})}
    if thoughts is not None:
        writers[res / "thought_findings.json"] = js({
            "findings": thoughts.findings, "notes": thoughts.notes, "pairs": thoughts.pair_facts,
            "baseline_accuracy": thoughts.baseline_accuracy, "settings": thoughts.settings})
    return writers


def figure_writers(d, fig_dir: Path) -> dict[Path, Callable[[Path], None]]:
    """The cards' figures as PNG files: path under fig_dir -> the function that writes it."""
    from codi_attn.figures import metrics as metric_figures
    from codi_attn.figures.extraction import incoming_figure, mass_figure, mean_matrix_figure

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
        **{f"head_detail_{label}": metric_figures.head_detail(report, label) for label in report.detail_heads()},
    }
    validation = getattr(d, "validation_result", None) if "validation_result" in d else None
    if validation is not None:
        from codi_attn.figures import validation as validation_figures

        figs |= {"validation_top_heads": validation_figures.ablation_figure(validation),
                 "validation_single_heads": validation_figures.single_heads_figure(validation),
                 "validation_blocking": validation_figures.blocking_figure(validation)}
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
    return {fig_dir / f"{key}.png": (lambda p, f=fig: _save_figure(f, p)) for key, fig in figs.items()}
