"""Card of the compare step: two models' hubs, high-composite heads, concentration, thought-block mass and
depth profiles side by side, each difference with its 95% interval and whether it is real."""
from __future__ import annotations

import shlex

import numpy as np
import pandas as pd
from metaflow.cards import Markdown

from cards.common import few_problems, image, table, warnings_md, with_ci
from cards.metrics_card import criteria_frame
from codi_attn.figures import metrics as metric_figures
from codi_attn.conventions import thought_name
from codi_attn.metrics import (HIGH_COMPOSITE, HUB_ELIGIBLE, LIFT_THRESHOLD, MetricsReport, compare_reports,
                               current_names)
from codi_attn.presets import PRESETS


def _hubs(df: pd.DataFrame, name: str) -> str:
    """Claimed hubs of one model read off the comparison's lift rows."""
    eligible = [thought_name(j + 1) for j in np.flatnonzero(HUB_ELIGIBLE)]
    rows = df[(df["quantity"] == "incoming lift") & df["group"].isin(eligible)]
    lo = rows[f"lo_{name}"].fillna(rows[f"value_{name}"])
    return ", ".join(rows.loc[lo >= LIFT_THRESHOLD, "group"]) or "none"


def differences_frame(df: pd.DataFrame) -> pd.DataFrame:
    """The comparison as shown: each model's value [95% CI], the difference [95% CI], real."""
    na, nb = df.attrs.get("names", ("a", "b"))
    return pd.DataFrame({
        "section": df["section"], "quantity": df["quantity"], "group": df["group"],
        na: [with_ci(*r) for r in df[[f"value_{na}", f"lo_{na}", f"hi_{na}"]].to_numpy(float)],
        nb: [with_ci(*r) for r in df[[f"value_{nb}", f"lo_{nb}", f"hi_{nb}"]].to_numpy(float)],
        f"{na} - {nb}": [with_ci(*r) for r in df[["diff", "diff_lo", "diff_hi"]].to_numpy(float)],
        "real": df["real"],
    })


def _resampling_md(df: pd.DataFrame) -> str:
    """How the differences' intervals were resampled (compare_reports)."""
    if df.attrs.get("paired"):
        return ("**Intervals of the differences:** paired by problem (both runs extracted the same problems of one "
                "sample, resampled alike: each draw is the difference on one resample of the problems).")
    return ("**Intervals of the differences:** each run resampled independently (the runs did not extract the same "
            "problems of one sample, in the same order, with the same --seed and --n_boot), which is wider than a "
            "paired resample would be on shared problems.")


def _summary_md(df: pd.DataFrame) -> str:
    na, nb = df.attrs.get("names", ("a", "b"))
    real = df[df["real"].fillna(False).astype(bool)]
    main = real[(real["section"] != "depth profile") & (real["quantity"] != "count")]
    lines = [f"**Hubs claimed:** {na}: {_hubs(df, na)}; {nb}: {_hubs(df, nb)} "
             f"(lower 95% bound of the incoming lift >= {LIFT_THRESHOLD:g}).",
             _resampling_md(df),
             f"**Real differences** (95% interval of {na} - {nb} excludes 0): {len(real)} of {len(df)} "
             f"quantities ({len(real) - len(main)} of them in depth profiles or head counts, which "
             "differ with the number of heads; compare fractions). Each interval is 95% on its own: runs that did "
             f"not differ at all would show about {0.05 * df['real'].notna().sum():.1f} such differences by "
             "chance."]
    lines += [f"- {r['quantity']} ({r['group']}): {with_ci(r['diff'], r['diff_lo'], r['diff_hi'])}"
              for _, r in main.iterrows()]
    if df["real"].isna().all():
        lines.append("No bootstrap draws: differences have no intervals, none is called real.")
    return "\n".join(lines)


def compare_card(data: pd.DataFrame | tuple[MetricsReport, MetricsReport],
                 names: tuple[str, str] | None = None, comparison: pd.DataFrame | None = None) -> list:
    """Card components comparing two runs, from compare_reports' DataFrame or from the two reports
    (which adds side-by-side head maps, both criteria tables and both reports' warnings; `comparison`: their
    compare_reports DataFrame when already computed)."""
    reports = None if isinstance(data, pd.DataFrame) else tuple(data)
    if reports is None:
        df = current_names(data)
        if names:
            df.attrs["names"] = tuple(names)
    else:
        names = names or tuple(r.name or k for r, k in zip(reports, ("a", "b")))
        df = compare_reports(*reports, names=names) if comparison is None else current_names(comparison)
    na, nb = df.attrs.get("names", ("a", "b"))
    parts = [Markdown(f"# Model comparison: {na} vs {nb}")]
    if reports:
        parts.append(Markdown(" | ".join(f"{n}: {r.shape[0]} problems, {r.shape[1]} x {r.shape[2]} heads"
                                         for n, r in zip((na, nb), reports)) + f" | basis: {reports[0].basis}"))
        for n, r in zip((na, nb), reports):
            parts += warnings_md(few_problems(r.shape[0]) + list(r.warnings), n)
    parts += [Markdown(_summary_md(df)),
              Markdown("## Hub positions"), image(metric_figures.compare_hubs(df)),
              Markdown(f"## High-composite heads (composite > {HIGH_COMPOSITE:g}, as fractions: the models have "
                       "different numbers of heads)"),
              image(metric_figures.compare_high_composite(df))]
    if reports:
        parts.append(image(metric_figures.compare_head_maps(*reports, names=(na, nb))))
    parts += [Markdown("## Flow and concentration along normalised depth"),
              image(metric_figures.compare_profiles(df)),
              image(metric_figures.compare_profiles(df, ("row entropy", "thought-block mass"), "concentration")),
              Markdown("## All quantities"), table(differences_frame(df))]
    if reports:
        ca, cb = (criteria_frame(r.criteria) for r in reports)  # rows in CRITERIA order
        both = pd.DataFrame({"phase": ca["phase"], "criterion": ca["criterion"],
                             f"{na} measured": ca["measured"], f"{na} result": ca["result"],
                             f"{nb} measured": cb["measured"], f"{nb} result": cb["result"]})
        parts += [Markdown("## Success criteria, both models"), table(both)]
    return parts


def no_comparison_card(model: str, dataset: str, split: str, n_problems: int, seed: int, fingerprint: str
                       ) -> list:
    """Card of a compare step that found no other model's run on this sample: for each released model but
    `model`, the command that makes one, ready to paste."""
    others = [name for name in PRESETS if name not in (model, "demo")]
    commands = "\n".join(shlex.join(["python", "flows/attention_flow.py", "run", "--model", other, "--dataset", dataset,
                                     "--split", split, "--n_problems", str(n_problems), "--seed", str(seed)])
                         for other in others)
    return [Markdown(f"# Compare: {model} with other models on this sample"),
            Markdown(f"No other model has a finished run on this sample (dataset fingerprint {fingerprint[:12]}). "
                     "Make one with (for local copies of a checkpoint add `--ckpt DIR --base DIR`):"
                     f"\n\n```\n{commands}\n```\n"
                     "Its compare step will find this run. To compare with a run of your choice instead: "
                     "`--compare_with RUN_ID`.")]


def basis_md(pathspec: str, basis: dict) -> Markdown:
    """What the comparison with the run at `pathspec` rests on (codi_attn.runs.comparison_basis), as checked."""
    (fa, fb), (sa, sb), (na, nb) = basis["fingerprints"], basis["sampled"], basis["extracted"]
    (la, ha), (lb, hb) = basis["shapes"]
    sample = (f"dataset fingerprint {fa[:12]} in both runs (dataset, split, n_problems and seed)"
              if basis["same_sample"] else f"**different samples** (dataset fingerprint {fa[:12]} here, "
                                           f"{fb[:12]} there): the differences below mix models and problems")
    lines = [f"Other run: `{pathspec}`.",
             f"- Sample: {sample}; extracted {na} of {sa} here, {nb} of {sb} there, {basis['in_both']} in both "
             f"(each run's numbers are over its own extracted problems).",
             f"- Model shape: {la} layers x {ha} heads here, {lb} x {hb} there.",
             "- Settings that differ besides the model: " + ("; ".join(basis["differences"]) or "none") + "."]
    return Markdown("\n".join(lines))


def causal_comparison_card(df: pd.DataFrame) -> list:
    """The causal critical heads of the compared models side by side (codi_attn.heads.compare_causal)."""
    shown = pd.DataFrame({
        "model": df["model"], "critical heads": [f"{c} of {h} ({100 * s:.1f}%)" for c, h, s in
                                                 zip(df["critical"], df["heads"], df["critical_share"])],
        "early / middle / late": [f"{e} / {m} / {l}" for e, m, l in
                                  zip(df["critical_early"], df["critical_middle"], df["critical_late"])],
        "which": df["critical_heads"].str.slice(0, 200),
        "composite vs effect (Spearman)": [f"{v:+.2f} {ci}" for v, ci in zip(df["composite_spearman"],
                                                                               df["composite_spearman_ci"])],
        "held-out causal top-k: Δ points (percentile)": [
            f"{100 * d:+.1f} ({p:.0f}%)" for d, p in zip(df["held_out_delta"], df["held_out_percentile"])],
    })
    return [Markdown(f"## Causal critical heads ({df['kind'].iloc[0]} ablation at the {df['positions'].iloc[0]})\n\n"
                     "Critical: ablating the head alone costs at least 5 points, and the loss survives a 5% "
                     "false-discovery rate over the model's heads (sign test, Benjamini-Hochberg); depth "
                     "in thirds of the normalised layer index, so models of different depth compare."), table(shown)]
