"""Which heads carry the thoughts: the causal effect of every query head, an attribution estimate for all of them
at once, and how far each attention metric predicts the effect.

Scan (exact). Every head (layer, head) is ablated alone, once per kind (`mean`, `zero`, `resample`, as
codi_attn.ablation defines them), at the six thought steps (positions "thoughts") or everywhere ("all"), on the
same problems as one baseline run; all conditions of a batch share its prefill. Per head and kind: accuracy and
its change with a paired bootstrap interval, the share of answers changed, and at the baseline's answer token
(where its number starts; codi_attn.hooks.AnswerShift) the KL from the baseline and the change of the logit
difference between the baseline's answer token and its runner-up. A `HeadScan` keeps the per-problem outcomes,
so effects on any subset of the problems come without running anything again; scans of head groups (shards)
merge into the scan of all heads.

Attribution patching (estimate). One forward with gradients and one backward per batch (codi_attn.runner's
`gradients=True`) give d(logit difference)/d(head input) at every thought and layer; the estimated effect of
replacing the input a of a head by a' (its mean, 0 or the partner's input) is sum over the thoughts of
(a' - a) . gradient (Nand 2023; Syed, Rager and Conmy 2023). It ranks hundreds of heads for the price of one
run; it is checked against the exact scan (Spearman) where both ran.

Held out. The problems are split in two halves (seeded); heads are selected on half A (the k most harmful by
the scan's effect on A, and the k best by the composite computed on A's attention) and measured on half B, ablated
together, against at least 50 random sets of k heads drawn on B (layer-matched where the model has enough other
heads in those layers, otherwise from all layers), so selection and test never share a problem.

Critical heads (causally): the accuracy drop is at least CRITICAL_DROP and its loss is significant over all the
model's heads: an exact one-sided sign test (McNemar's) on the problems the ablation flips (right to wrong against
wrong to right), with the Benjamini-Hochberg false-discovery rate FDR over the heads of one kind and positions, a
head that --head_scan top:M left out counting with p = 1 (fdr_over). A per-head interval alone called 3 of 300
heads with no effect critical in the test's simulation: about one of GPT-2's 144 heads per kind, five of LLaMA's
512. BH over the M heads an attribution estimate on the same problems chose, instead of over all heads, called 13%
of simulated null scans' top-20 of 144 heads critical at least once (2.5% over all 144).

This module holds the outcomes, plans, joins and the report (numpy and pandas, no model: the flow's model-free
steps and a notebook reading the artifacts need no PyTorch); codi_attn.heads_run runs the scan, the attribution
and the held-out sets on the model.
"""
from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from scipy.stats import binomtest, false_discovery_control

from codi_attn.answers import correctness
from codi_attn.conventions import MASS_PARTS, Head, head_label
from codi_attn.validate import (CI_LEVEL, K_SHARE, answers_changed, bootstrap_interval, random_head_sets,
                               resample_indices)

CRITICAL_DROP = 0.05  # a causally critical head costs at least 5 points of accuracy ...
FDR = 0.05  # ... and its loss survives a 5% false-discovery rate over the heads of the model (fdr_over)
N_RANDOM_SETS = 50
MAX_K = 10
METRICS = ("flow", "hub", "skip", "composite", "incoming", "thought_share")  # attention metrics held against effects
EFFECT_COLUMNS = ("layer", "head", "label", "kind", "positions", "n_problems", "accuracy", "delta_accuracy",
                  "delta_ci_low", "delta_ci_high", "answers_changed", "kl_answer_token", "logit_diff_change",
                  "logit_diff_ci_low", "logit_diff_ci_high", "compared", "p_value", "q_value", "critical")


# ---------------------------------------------------------------- the exact scan's outcomes


@dataclass
class HeadScan:
    """Per-problem outcomes of every single-head ablation of a scan: row c of each array is condition c."""

    heads: list[Head]  # [C] the ablated head of each condition
    kinds: list[str]  # [C]
    positions: list[str]  # [C]
    base_correct: np.ndarray  # [N] bool
    base_prediction: np.ndarray  # [N]
    base_logit_diff: np.ndarray  # [N]
    correct: np.ndarray  # [C, N] bool
    prediction: np.ndarray  # [C, N] float64
    kl: np.ndarray  # [C, N] float32, nan: not compared (another context, or no answer step)
    logit_diff: np.ndarray  # [C, N] float32
    settings: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.heads)

    def effects(self, problems: np.ndarray | None = None, n_boot: int = 1000, seed: int = 0) -> pd.DataFrame:
        """One row per condition (EFFECT_COLUMNS) on `problems` (indices; default all), bootstrap intervals paired
        over the problems (the same resamples for every condition); `p_value` the exact one-sided sign test of the
        loss on the problems flipped, `q_value` its Benjamini-Hochberg adjustment over the conditions of the same
        kind and positions, `critical` as the module docstring says."""
        idx = np.arange(len(self.base_correct)) if problems is None else np.asarray(problems)
        boot = resample_indices(len(idx), n_boot, seed)
        base = self.base_correct[idx].astype(float)
        rows = []
        for c, (layer, head) in enumerate(self.heads):
            correct = self.correct[c, idx].astype(float)
            delta = correct - base
            lo, hi = bootstrap_interval(delta, boot)
            lost, gained = int((delta < 0).sum()), int((delta > 0).sum())
            ld = self.logit_diff[c, idx] - self.base_logit_diff[idx]
            seen = ~np.isnan(ld)
            ld_lo, ld_hi = bootstrap_interval(np.nan_to_num(ld), boot) if seen.all() else _nan_interval(ld, boot)
            kl = self.kl[c, idx]
            rows.append({
                "layer": layer, "head": head, "label": head_label(layer, head), "kind": self.kinds[c],
                "positions": self.positions[c], "n_problems": len(idx), "accuracy": float(correct.mean()),
                "delta_accuracy": float(delta.mean()), "delta_ci_low": lo, "delta_ci_high": hi,
                "answers_changed": float(answers_changed(self.base_prediction[idx], self.prediction[c, idx]).mean()),
                "kl_answer_token": float(np.nanmean(kl)) if (~np.isnan(kl)).any() else math.nan,
                "logit_diff_change": float(np.nanmean(ld)) if seen.any() else math.nan,
                "logit_diff_ci_low": ld_lo, "logit_diff_ci_high": ld_hi, "compared": float(seen.mean()),
                "p_value": binomtest(lost, lost + gained, alternative="greater").pvalue if lost + gained else 1.0,
            })
        df = pd.DataFrame(rows, columns=list(EFFECT_COLUMNS))
        n_model = self.settings.get("n_layers", 0) * self.settings.get("n_heads", 0)
        df["q_value"] = df.groupby(["kind", "positions"])["p_value"].transform(
            lambda p: fdr_over(p.to_numpy(), n_model))
        df["critical"] = (df["q_value"] < FDR) & (df["delta_accuracy"] <= -CRITICAL_DROP)
        return df


def fdr_over(p_values: np.ndarray, n_hypotheses: int) -> np.ndarray:
    """Benjamini-Hochberg q-values [len(p_values)] in a family of max(n_hypotheses, len(p_values)) heads: a head left
    out of the scan (--head_scan top:M, chosen by an estimate on the same problems) counts with p = 1, so that
    choosing the M most promising heads first does not shrink the family the false-discovery rate is over."""
    if not len(p_values):
        return p_values
    padded = np.concatenate([p_values, np.ones(max(n_hypotheses - len(p_values), 0))])
    return false_discovery_control(padded, method="bh")[: len(p_values)]


def _nan_interval(values: np.ndarray, boot: np.ndarray) -> tuple[float, float]:
    """Bootstrap interval of the nan-mean (resamples with no value left give nan and are dropped; nan with fewer
    than 2 values)."""
    if (~np.isnan(values)).sum() < 2:
        return math.nan, math.nan
    with np.errstate(invalid="ignore"):
        means = np.array([np.nanmean(values[b]) if (~np.isnan(values[b])).any() else np.nan for b in boot])
    means = means[~np.isnan(means)]
    if not len(means):
        return math.nan, math.nan
    q = 100 * (1 - CI_LEVEL) / 2
    lo, hi = np.percentile(means, [q, 100 - q])
    return float(lo), float(hi)


def merge_scans(scans: Sequence[HeadScan]) -> HeadScan:
    """The scans of head groups (shards on the same problems) as one scan; their baselines must agree exactly."""
    first = scans[0]
    for other in scans[1:]:
        if not (np.array_equal(other.base_correct, first.base_correct)
                and np.array_equal(other.base_prediction, first.base_prediction, equal_nan=True)):
            raise ValueError("head-scan shards ran different baselines (another model or other problems?)")
    seen = Counter((h, k, p) for s in scans for h, k, p in zip(s.heads, s.kinds, s.positions))
    twice = [c for c, n in seen.items() if n > 1]
    if twice:
        raise ValueError(f"head-scan shards overlap: {head_label(*twice[0][0])} {twice[0][1]} ran twice")
    cat = (lambda name: np.concatenate([getattr(s, name) for s in scans]))
    return HeadScan(sum((s.heads for s in scans), []), sum((s.kinds for s in scans), []),
                    sum((s.positions for s in scans), []), first.base_correct, first.base_prediction,
                    first.base_logit_diff, cat("correct"), cat("prediction"), cat("kl"), cat("logit_diff"),
                    dict(first.settings))


# ---------------------------------------------------------------- held-out selection and controls


def split_halves(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Problem indices in two disjoint halves (A: selection, B: test), each sorted; A gets the smaller half."""
    if n < 2:
        raise ValueError("a held-out test needs two problems or more")
    order = np.random.default_rng(seed).permutation(n)
    return np.sort(order[: n // 2]), np.sort(order[n // 2:])


def causal_order(effects: pd.DataFrame) -> pd.DataFrame:
    """Heads from the most harmful to ablate to the least: accuracy change, then logit-difference change, then
    label (stable)."""
    return effects.sort_values(["delta_accuracy", "logit_diff_change", "label"], na_position="last", kind="stable")


@dataclass
class HeldOut:
    """Top heads selected on half A of the problems, ablated together on half B, against random sets on B."""

    problems_a: np.ndarray  # indices of the selection half
    problems_b: np.ndarray  # indices of the test half
    k: int
    kind: str
    positions: str
    sets: pd.DataFrame  # one row per set: name, group, heads, layer_matched, accuracy on B, delta, CI, ...
    summary: pd.DataFrame  # per selection ('causal', 'composite'): delta on B, random mean, percentile, n distinct
    n_random: int  # random sets asked for per selection


@dataclass
class HeldOutPlan:
    """The held-out test's head sets, chosen on half A: the causal and the composite top-k, then n_random random
    sets per selection (see `random_head_sets`); each set is ablated on half B (`held_out_part`)."""

    problems_a: np.ndarray
    problems_b: np.ndarray
    k: int
    kind: str
    positions: str
    n_random: int
    sets: list[tuple[str, str, tuple[Head, ...], bool]]  # (name, group, heads, layer-matched)
    distinct: dict[str, tuple[int, bool]]  # selection -> (distinct random sets, layer-matched)

    def groups(self, size: int) -> list[list[int]]:
        """The sets' indices in groups of `size`, one held-out task each."""
        return [list(range(i, min(i + size, len(self.sets)))) for i in range(0, len(self.sets), size)]


def plan_held_out(scan: HeadScan, attention: np.ndarray, kind: str = "mean", positions: str = "thoughts",
                  k: int | None = None, n_random: int = N_RANDOM_SETS, seed: int = 0) -> HeldOutPlan:
    """Select the k heads most harmful to ablate (scan effects on half A) and the k best by composite (on A's
    attention [N, L, H, 6, 6]), and draw the random sets they are compared with (no model needed)."""
    from codi_attn.metrics import head_scores

    a, b = split_halves(len(scan.base_correct), seed)
    n_layers, n_heads = attention.shape[1:3]
    k = k or default_k(n_layers, n_heads)
    sel = scan.effects(a, n_boot=0)
    sel = sel[(sel["kind"] == kind) & (sel["positions"] == positions)]
    if len(sel) < k:
        raise ValueError(f"the held-out selection needs at least k = {k} heads scanned with {kind} ablation at "
                         f"{positions}, the scan has {len(sel)}")
    causal = [(int(r.layer), int(r.head)) for r in causal_order(sel).head(k).itertuples()]
    scores = head_scores(attention[a]).sort_values("composite", ascending=False, kind="stable")
    composite = [(int(r.layer), int(r.head)) for r in scores.head(k).itertuples()]
    rng = np.random.default_rng(seed)
    named: list[tuple[str, str, tuple[Head, ...], bool]] = [("causal top-k", "causal", tuple(causal), True),
                                                           ("composite top-k", "composite", tuple(composite), True)]
    distinct = {}
    for group, top in (("causal", causal), ("composite", composite)):
        sets, matched = random_head_sets(top, n_layers, n_heads, n_random, rng)
        distinct[group] = (len(sets), matched)
        named += [(f"random {i + 1} ({group})", f"random ({group})", s, matched) for i, s in enumerate(sets)]
    return HeldOutPlan(a, b, k, kind, positions, n_random, named, distinct)


@dataclass
class HeldOutPart:
    """One group of held-out sets ablated on half B, with the half-B baseline it ran against."""

    indices: list[int]  # the sets' indices in the plan
    heads: list[tuple[Head, ...]]  # the heads each of those sets ablated
    base_correct: np.ndarray  # [|B|] bool
    base_prediction: np.ndarray  # [|B|]
    base_logit_diff: np.ndarray  # [|B|]
    prediction: np.ndarray  # [sets, |B|]
    logit_diff: np.ndarray  # [sets, |B|] logit(answer) - logit(runner-up) under the ablation


def join_held_out(plan: HeldOutPlan, parts: Sequence[HeldOutPart], golds: Sequence[str], n_boot: int = 1000,
                  seed: int = 0) -> HeldOut:
    """The held-out test from its parts, in any order (equal to one process bit for bit where each group's size
    is a multiple of the conditions stacked per forward): every set's change on B with its interval, and per
    selection its percentile among the random sets. Refuses parts that miss or repeat a set, ablated other heads
    than the plan's, or ran against different baselines."""
    got = sorted(i for part in parts for i in part.indices)
    if got != list(range(len(plan.sets))):
        missing = sorted(set(range(len(plan.sets))) - set(got))
        raise ValueError(f"the held-out parts do not cover the plan's {len(plan.sets)} sets once each "
                         f"(missing {missing[:5]}, {len(got) - len(set(got))} repeated)")
    for part in parts:
        if part.heads != [plan.sets[i][2] for i in part.indices]:
            raise ValueError(f"a held-out part ablated other heads than the plan's sets {part.indices[:3]}...: it "
                             "comes from another plan (another scan or seed)")
    first = parts[0]
    for part in parts[1:]:
        if not (np.array_equal(part.base_correct, first.base_correct)
                and np.array_equal(part.base_prediction, first.base_prediction, equal_nan=True)
                and np.array_equal(part.base_logit_diff, first.base_logit_diff, equal_nan=True)):
            raise ValueError("the held-out parts ran against different baselines on half B (a different model, "
                             "sample or settings): rerun them together")
    gs = [golds[i] for i in plan.problems_b]
    outcome = {i: (part.prediction[j], part.logit_diff[j]) for part in parts for j, i in enumerate(part.indices)}
    boot = resample_indices(len(plan.problems_b), n_boot, seed)
    base_correct = first.base_correct.astype(float)
    rows = []
    for i, (name, group, heads, matched) in enumerate(plan.sets):
        prediction, logit_diff = outcome[i]
        correct = correctness(prediction, gs)
        delta = correct.astype(float) - base_correct
        lo, hi = bootstrap_interval(delta, boot)
        ld = logit_diff - first.base_logit_diff
        rows.append({"name": name, "group": group, "heads": " ".join(head_label(*h) for h in heads),
                     "layer_matched": matched, "accuracy": float(correct.mean()),
                     "delta_accuracy": float(delta.mean()), "delta_ci_low": lo, "delta_ci_high": hi,
                     "answers_changed": float(answers_changed(first.base_prediction, prediction).mean()),
                     "logit_diff_change": float(np.nanmean(ld)) if (~np.isnan(ld)).any() else math.nan})
    sets = pd.DataFrame(rows)
    summary = []
    for group in ("causal", "composite"):
        top = sets[sets["group"] == group].iloc[0]
        rand = sets[sets["group"] == f"random ({group})"]["delta_accuracy"].to_numpy()
        more_harmful = float((rand > top["delta_accuracy"]).mean() + 0.5 * (rand == top["delta_accuracy"]).mean()) \
            if len(rand) else math.nan
        summary.append({"selection": group, "heads": top["heads"], "delta_accuracy": top["delta_accuracy"],
                        "delta_ci_low": top["delta_ci_low"], "delta_ci_high": top["delta_ci_high"],
                        "random_mean": float(rand.mean()) if len(rand) else math.nan,
                        "random_sd": float(rand.std(ddof=0)) if len(rand) else math.nan,
                        "percentile": 100 * more_harmful, "n_random": len(rand),
                        "distinct": plan.distinct[group][0], "layer_matched": plan.distinct[group][1]})
    return HeldOut(plan.problems_a, plan.problems_b, plan.k, plan.kind, plan.positions, sets, pd.DataFrame(summary),
                   plan.n_random)


def default_k(n_layers: int, n_heads: int) -> int:
    """Top heads compared: a quarter of the heads, at most MAX_K (as the validation)."""
    return max(1, min(MAX_K, n_layers * n_heads // K_SHARE))


# ---------------------------------------------------------------- attention metrics against the causal effect


def head_metrics(attention: np.ndarray, mass: np.ndarray | None) -> pd.DataFrame:
    """Per head (layer, head order): the attention metrics of METRICS on these problems."""
    from codi_attn.metrics import head_scores, incoming, renormalise

    scores = head_scores(attention).sort_values(["layer", "head"]).reset_index(drop=True)
    m = renormalise(attention.astype(np.float64)).mean(0)  # [L, H, 6, 6]
    scores["incoming"] = np.nanmean(incoming(m), axis=-1).ravel()
    share = attention.sum(-1) if mass is None else mass[..., MASS_PARTS.index("thoughts")]
    scores["thought_share"] = share.astype(np.float64).mean((0, 3)).ravel()
    return scores


def _spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman's rho over the pairs where both are known (nan with fewer than 3, or a constant side)."""
    known = ~(np.isnan(x) | np.isnan(y))
    if known.sum() < 3:
        return math.nan
    rx, ry = pd.Series(x[known]).rank().to_numpy(), pd.Series(y[known]).rank().to_numpy()
    if np.std(rx) == 0 or np.std(ry) == 0:
        return math.nan
    return float(np.corrcoef(rx, ry)[0, 1])


def metric_correlations(scan: HeadScan, attention: np.ndarray, mass: np.ndarray | None, kind: str = "mean",
                        positions: str = "thoughts", n_boot: int = 200, seed: int = 0) -> pd.DataFrame:
    """Spearman correlation over heads of each attention metric with the causal effect (the accuracy drop and the
    logit-difference drop when the head is ablated), with a 95 % interval from resampling the problems (effects
    and metrics recomputed on each resample). A head none of whose problems was compared at the answer step has no
    logit-difference drop: that correlation is over the other heads (n_heads says how many)."""
    sel = [c for c in range(len(scan)) if scan.kinds[c] == kind and scan.positions[c] == positions]
    order = np.lexsort(([scan.heads[c][1] for c in sel], [scan.heads[c][0] for c in sel]))
    sel = [sel[i] for i in order]  # layer, head order, as head_metrics
    n, n_heads = attention.shape[0], attention.shape[2]
    rows = [scan.heads[c][0] * n_heads + scan.heads[c][1] for c in sel]  # the scanned heads' rows of head_metrics

    def effects(idx: np.ndarray) -> dict[str, np.ndarray]:
        base = scan.base_correct[idx].astype(float).mean()
        ld = scan.logit_diff[sel][:, idx] - scan.base_logit_diff[idx]
        seen = ~np.isnan(ld)
        with np.errstate(invalid="ignore", divide="ignore"):  # a head with no compared problem: nan
            ld_mean = np.where(seen, ld, 0.0).sum(1) / seen.sum(1)
        return {"accuracy drop": base - scan.correct[sel][:, idx].mean(1), "logit-diff drop": -ld_mean}

    point = head_metrics(attention, mass)
    full = effects(np.arange(n))
    draws = {(m, e): [] for m in METRICS for e in full}
    rng = np.random.default_rng(seed)
    for _ in range(n_boot):
        idx = rng.integers(0, n, n)
        metrics, eff = head_metrics(attention[idx], None if mass is None else mass[idx]), effects(idx)
        for (m, e), values in draws.items():
            values.append(_spearman(metrics[m].to_numpy()[rows], eff[e]))
    out = []
    q = 100 * (1 - CI_LEVEL) / 2
    for (m, e), values in draws.items():
        values = np.array(values, float)
        values = values[~np.isnan(values)]
        lo, hi = (np.percentile(values, [q, 100 - q]) if len(values) else (math.nan, math.nan))
        x = point[m].to_numpy()[rows]
        out.append({"metric": m, "effect": e, "spearman": _spearman(x, full[e]), "ci_low": float(lo),
                    "ci_high": float(hi), "n_heads": int((~(np.isnan(x) | np.isnan(full[e]))).sum())})
    return pd.DataFrame(out)


# ---------------------------------------------------------------- the report


@dataclass
class CausalReport:
    """Everything the causal-heads card shows; picklable (a Metaflow artifact)."""

    head_effects: pd.DataFrame  # one row per head, kind and positions: EFFECT_COLUMNS, estimate, METRICS
    agreement: pd.DataFrame  # per kind: Spearman of the attribution estimate with the exact logit-diff change
    correlations: pd.DataFrame  # metric_correlations
    held_out: HeldOut | None
    settings: dict
    notes: list[str] = field(default_factory=list)

    def critical(self, kind: str | None = None, positions: str | None = None) -> pd.DataFrame:
        """The causally critical heads (drop >= CRITICAL_DROP, q_value < FDR: module docstring), most harmful
        first."""
        df = self.head_effects
        kind, positions = kind or self.settings["kind"], positions or self.settings["positions"]
        df = df[(df["kind"] == kind) & (df["positions"] == positions)]
        return causal_order(df[df["critical"]])


def causal_report(scan: HeadScan, attention: np.ndarray, mass: np.ndarray | None, estimates: pd.DataFrame | None,
                  held: HeldOut | None, kind: str = "mean", positions: str = "thoughts", n_boot: int = 1000,
                  seed: int = 0) -> CausalReport:
    """Assemble the report: effects of every scanned condition with the attention metrics and the attribution
    estimate beside them, the estimate's agreement with the exact scan, and the metric correlations (every
    interval over n_boot resamples)."""
    effects = scan.effects(n_boot=n_boot, seed=seed)
    metrics = head_metrics(attention, mass)[["layer", "head", *METRICS]]
    effects = effects.merge(metrics, on=["layer", "head"], how="left")
    agreement = []
    if estimates is not None:
        at_thoughts = estimates[["layer", "head", "kind", "estimate"]].assign(positions="thoughts")  # where made
        effects = effects.merge(at_thoughts, on=["layer", "head", "kind", "positions"], how="left")
        for k in sorted(set(estimates["kind"])):
            both = effects[(effects["kind"] == k) & (effects["positions"] == "thoughts")].dropna(
                subset=["estimate", "logit_diff_change"])
            agreement.append({"kind": k, "n_heads": len(both),
                              "spearman": _spearman(both["estimate"].to_numpy(), both["logit_diff_change"].to_numpy())})
    else:
        effects["estimate"] = math.nan
    notes = []
    sel = effects[(effects["kind"] == kind) & (effects["positions"] == positions)]
    if len(sel) < 3:
        correlations = pd.DataFrame(columns=["metric", "effect", "spearman", "ci_low", "ci_high", "n_heads"])
        notes.append(f"too few heads scanned with {kind} ablation at {positions} for rank correlations")
    else:
        correlations = metric_correlations(scan, attention, mass, kind, positions, n_boot, seed)
    if held is not None:
        for row in held.summary.itertuples():
            if not row.layer_matched:
                notes.append(f"the random sets for the {row.selection} top-{held.k} come from all layers: its "
                             f"layers have too few other heads for {held.n_random} distinct layer-matched sets")
            if row.distinct < held.n_random:
                notes.append(f"only {row.distinct} distinct random sets exist for the {row.selection} top-{held.k}")
    settings = {**scan.settings, "kind": kind, "positions": positions, "kinds": list(dict.fromkeys(scan.kinds)),
                "all_positions": list(dict.fromkeys(scan.positions)), "n_boot": n_boot, "critical_drop": CRITICAL_DROP,
                "seed": seed}
    return CausalReport(effects, pd.DataFrame(agreement), correlations, held, settings, notes)


# ---------------------------------------------------------------- the flow's steps


def problem_texts(problems: Sequence[dict]) -> tuple[list[str], list[str], list[str]]:
    """(questions, gold answers, solutions) of the flow's problem records."""
    return [p["question"] for p in problems], [p["answer"] for p in problems], [p["solution"] for p in problems]


def causal_analysis(scan: HeadScan, plan: HeldOutPlan | None, parts: Sequence[HeldOutPart],
                    problems: Sequence[dict], attention: np.ndarray, mass: np.ndarray | None,
                    estimates: pd.DataFrame | None, kind: str, positions: str, n_boot: int = 1000, seed: int = 0
                    ) -> CausalReport:
    """The join_heads step: the held-out test joined from its parts, and the causal report."""
    attention = np.asarray(attention, np.float32)
    mass = None if mass is None else np.asarray(mass, np.float32)
    _, golds, _ = problem_texts(problems)
    held = None if plan is None else join_held_out(plan, parts, golds, max(n_boot, 1), seed)
    report = causal_report(scan, attention, mass, estimates, held, kind, positions, max(n_boot, 1), seed=seed)
    if held is None:
        report.notes.append("no held-out test: it needs four problems or more (two per half)")
    return report


def compare_causal(reports: Sequence[CausalReport], names: Sequence[str]) -> pd.DataFrame:
    """Causal critical heads of several models side by side: one row per model (count and share of critical heads,
    their labels, the share in each third of the depth, the composite-vs-effect Spearman, the held-out causal
    top-k's change and its percentile among the random sets)."""
    from codi_attn.metrics import layer_band

    rows = []
    for report, name in zip(reports, names):
        s = report.settings
        critical = report.critical()
        bands = Counter(layer_band(int(layer), s["n_layers"]) for layer in critical["layer"])
        corr = report.correlations
        comp = corr[(corr["metric"] == "composite") & (corr["effect"] == "accuracy drop")]
        held = None if report.held_out is None else report.held_out.summary.set_index("selection").loc["causal"]
        rows.append({
            "model": name, "heads": s["n_layers"] * s["n_heads"], "critical": len(critical),
            "critical_share": len(critical) / (s["n_layers"] * s["n_heads"]),
            "critical_heads": " ".join(critical["label"]),
            **{f"critical_{band}": bands.get(band, 0) for band in ("early", "middle", "late")},
            "composite_spearman": float(comp["spearman"].iloc[0]) if len(comp) else math.nan,
            "composite_spearman_ci": (f"[{comp['ci_low'].iloc[0]:+.2f}, {comp['ci_high'].iloc[0]:+.2f}]"
                                      if len(comp) else ""),
            "held_out_delta": math.nan if held is None else float(held["delta_accuracy"]),
            "held_out_percentile": math.nan if held is None else float(held["percentile"]),
            "kind": s["kind"], "positions": s["positions"],
        })
    return pd.DataFrame(rows)
