"""What each thought holds: the attended question tokens, probes of intermediate results, a lens per layer and
patching, with the findings in plain words (the flow's plan_thoughts -> analyse_thoughts -> join_thoughts).

The analysis is planned as data (`plan_thoughts`: a `ThoughtPlan` of `ThoughtUnit`s), run in groups of units
(codi_attn.contents_run's `analyse_group`, one flow task each, checkpointed batch by batch) and joined
(`join_thoughts`, here: numpy and pandas, no model), which draws every interval, so that any grouping gives
exactly what one group of every unit gives (`analyse_thoughts`). Units:
    record   the recording run: attended tokens, the residual stream for the probes and the lens
    mean     one mean patching (thought k, step s, same | different), measured against the group's own run of the
             baseline thoughts
    pair     one clean -> corrupted patch (thought k, layer l or z), against the group's own clean and corrupted
             runs of the pairs
Every run is deterministic, so the baselines that several groups run are the same.

Conventions: thought k (z_k, k = 1..6) is the vector fed at position Q + k; probes and lens also read BOT
(position Q, whose final hidden state gives z1); layers are the residual stream after block l (0-based); step s
(1-based) is the s-th `<<...>>` calculation of the gold solution.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from codi_attn.conventions import Head, head_label, thought_name
from codi_attn.patching import (MIN_PATCHED, MIN_SHARE, PAIR_PATCHING_COLUMNS, MeanPatch, PairBaseline, PairPatch,
                                mean_patches, mean_table, pair_patches, pair_table)
from codi_attn.probes import MIN_PROBLEMS, TOO_FEW

N_EXAMPLES = 3  # problems whose attended tokens the card shows
PARTS = ("record", "mean", "pair")


@dataclass
class ThoughtReport:
    """Everything the join_thoughts card shows; picklable (a Metaflow artifact)."""

    attended: list[np.ndarray]  # per problem [6, Q_n] float16: attention on each question token (all heads)
    attended_by_kind: pd.DataFrame  # per thought: share on number / operation / other tokens
    attended_by_step: pd.DataFrame  # per thought and step: share on the step's operands
    attended_heads_by_kind: pd.DataFrame | None  # the same over `settings['heads']` only
    examples: list[dict]  # N_EXAMPLES problems: id, tokens, kinds, operand_of, weights [6, Q]
    probes: pd.DataFrame  # codi_attn.probes.run_probes
    lens: pd.DataFrame  # codi_attn.lens.lens_table
    mean_patching: pd.DataFrame  # codi_attn.patching.mean_table
    pair_patching: pd.DataFrame  # codi_attn.patching.pair_table
    pair_facts: dict
    baseline_accuracy: float
    settings: dict
    findings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class ThoughtUnit:
    """One unit of the analysis, as data (the flow hands groups of them to its analyse_thoughts tasks): the
    recording run, a MeanPatch or a PairPatch."""

    part: str  # record | mean | pair
    patch: MeanPatch | PairPatch | None = None

    @property
    def name(self) -> str:
        p = self.patch
        if self.part == "mean":
            return f"mean {thought_name(p.thought)} step {p.step} {p.kind}"
        return f"pair {thought_name(p.thought)} {'z' if p.layer == 'z' else 'L' + p.layer}" if p else "record"


@dataclass
class ThoughtPlan:
    """The units of an analysis and what it was asked; picklable (the flow plans once, then runs `groups` as
    parallel tasks)."""

    units: list[ThoughtUnit]
    settings: dict  # n_problems, n_layers, heads, n_boot, seed, synthetic

    def groups(self, size: int) -> list[list[ThoughtUnit]]:
        """The recording alone, then the mean and the pair units `size` at a time (a group holds one part)."""
        out = []
        for part in PARTS:
            units = [u for u in self.units if u.part == part]
            step = 1 if part == "record" else size
            out += [units[i: i + step] for i in range(0, len(units), step)]
        return out


def plan_thoughts(problems: Sequence[dict], synthetic: bool, n_layers: int, heads: Sequence[Head] = (),
                  n_boot: int = 200, seed: int = 0) -> ThoughtPlan:
    """The analysis of `problems` (dicts with id, question, answer, solution): the recording, the mean patches the
    sample allows (codi_attn.patching.mean_patches) and a pair patch per thought and layer. `synthetic`: the demo
    task's records (whose chains the counterfactuals and pairs read exactly); `heads`: heads whose attended tokens
    are shown apart (e.g. the causally critical ones)."""
    units = [ThoughtUnit("record")]
    units += [ThoughtUnit("mean", p) for p in mean_patches(problems, synthetic)]
    units += [ThoughtUnit("pair", p) for p in pair_patches(n_layers)]
    return ThoughtPlan(units, {"n_problems": len(problems), "n_layers": n_layers,
                               "heads": [(int(l), int(h)) for l, h in heads], "n_boot": n_boot, "seed": seed,
                               "synthetic": synthetic})


@dataclass
class Recording:
    """What the recording run gives the report."""

    attended: list[np.ndarray]  # per problem [6, Q_n] float16
    by_kind: pd.DataFrame
    by_step: pd.DataFrame
    heads_by_kind: pd.DataFrame | None
    examples: list[dict]
    probes: pd.DataFrame
    lens: pd.DataFrame
    baseline_correct: np.ndarray  # [N] bool: the unpatched run answers the problem correctly


@dataclass
class ThoughtPart:
    """What one group gave: per unit its raw outcome (the join draws the intervals)."""

    units: list[ThoughtUnit]
    recording: Recording | None  # the record unit
    predictions: list[np.ndarray]  # per patch unit: parsed answers ([N] mean, [P] pair)
    logit_diff: list[np.ndarray | None]  # per patch unit: [P] pair, None mean
    pair_baseline: PairBaseline | None  # what the table reads of the pairs' runs (pair groups), None if no pair
    model: dict  # model facts: name, n_layers, n_heads


def join_thoughts(plan: ThoughtPlan, parts: Sequence[ThoughtPart], problems: Sequence[dict]) -> ThoughtReport:
    """The ThoughtReport of a plan from its groups' parts; ValueError where they do not make the plan exactly once
    or ran different baselines."""
    units = [u for part in parts for u in part.units]
    if sorted(u.name for u in units) != sorted(u.name for u in plan.units) or len(set(units)) != len(units):
        raise ValueError(f"the thought parts hold units {[u.name for u in units]}, the plan "
                         f"{[u.name for u in plan.units]}")
    if len({str(p.model) for p in parts}) > 1:
        raise ValueError(f"the thought parts ran different models: {[p.model for p in parts]}")
    s = plan.settings
    rec = next(p.recording for p in parts if p.recording is not None)
    patches = [(u.name, pred, ld) for part in parts if part.recording is None
               for u, pred, ld in zip(part.units, part.predictions, part.logit_diff)]
    prediction, logit_diff = {n: p for n, p, _ in patches}, {n: ld for n, _, ld in patches}
    mean = [u for u in plan.units if u.part == "mean"]
    patched = mean_table(problems, [u.patch for u in mean], [prediction[u.name] for u in mean], rec.baseline_correct,
                         s["synthetic"], s["n_boot"], s["seed"])
    notes = []
    if rec.probes.empty:
        notes.append(f"no probe: {TOO_FEW}")
    if patched.empty:
        notes.append(f"no mean patching: no step is in {100 * MIN_SHARE:.0f}% of the problems and at least "
                     f"{MIN_PATCHED} of them with the same and with another value")
    pair_parts = [p for p in parts if p.units[0].part == "pair"]
    runs = [p.pair_baseline for p in pair_parts if p.pair_baseline is not None]
    if any(not r.same(runs[0]) for r in runs[1:]):
        raise ValueError("the thought parts ran different clean/corrupted pairs (another model or other problems?)")
    if runs:
        pair = [u for u in plan.units if u.part == "pair"]
        pair_patching = pair_table([(thought_name(u.patch.thought), u.patch.layer) for u in pair],
                                   [(logit_diff[u.name], prediction[u.name]) for u in pair], runs[0], s["n_boot"],
                                   s["seed"])
        facts = runs[0].facts()
        if not facts["valid"]:
            notes.append(f"no clean/corrupted pair of the {facts['pairs']} has answer tokens in both runs that "
                         "differ: pair patching has nothing to recover")
    else:
        pair_patching, facts = pd.DataFrame(columns=list(PAIR_PATCHING_COLUMNS)), {"pairs": 0, "valid": 0}
        notes.append("no clean/corrupted pair: no question had a number that could change alone")
    m = parts[0].model
    settings = {"model": m["name"], "n_problems": s["n_problems"], "n_layers": m["n_layers"], "n_heads": m["n_heads"],
                "heads": [head_label(*h) for h in s["heads"]], "n_boot": s["n_boot"], "seed": s["seed"],
                "synthetic": s["synthetic"]}
    report = ThoughtReport(rec.attended, rec.by_kind, rec.by_step, rec.heads_by_kind, rec.examples, rec.probes,
                           rec.lens, patched, pair_patching, facts, float(rec.baseline_correct.mean()), settings,
                           notes=notes)
    report.findings = findings(report)
    return report


# ---------------------------------------------------------------- findings


def decodable(row: pd.Series) -> bool:
    """A probe cell reads the target: its accuracy interval on half B of the problems lies above the control task,
    the permuted labels and the majority class on half B."""
    return bool(row["ci_low_b"] > max(row["control_b"], row["permuted_b"], row["majority_b"]))


def best_probes(probes: pd.DataFrame) -> pd.DataFrame:
    """Per target, the cell (position, layer) with the highest selectivity on half A of the problems, judged on
    half B (codi_attn.probes: a cell chosen on the problems it is judged on leans optimistic)."""
    if probes.empty:
        return probes
    if "selectivity_a" not in probes:
        raise ValueError("these probes come from a run made before a target's best cell was chosen on half A and "
                         "judged on half B (commit ad866dc): the report's `findings` are what it found then; rerun "
                         "the thought analysis for the halves")
    best = probes.sort_values("selectivity_a", ascending=False, kind="stable").groupby("target", sort=False).head(1)
    order = {t: i for i, t in enumerate(dict.fromkeys(probes["target"]))}
    return best.assign(decodable=[decodable(r) for _, r in best.iterrows()]).sort_values(
        "target", key=lambda c: c.map(order)).reset_index(drop=True)


def findings(report: ThoughtReport) -> list[str]:
    """The report's findings in plain words, one sentence each."""
    out = []
    k = report.attended_by_kind
    if len(k):
        out.append(f"The thoughts read the question's numbers: {100 * k['share_number'].mean():.0f}% of their "
                   f"question attention goes to number tokens, {100 * k['share_operation'].mean():.0f}% to operation "
                   f"words (thoughts z1..z6 differ by at most "
                   f"{100 * (k['share_number'].max() - k['share_number'].min()):.0f} points).")
    best = best_probes(report.probes)
    cells = len(report.probes[["position", "layer"]].drop_duplicates()) if len(report.probes) else 0
    for kind, label in (("step", "intermediate results"), ("op", "operations"), ("answer", "final answer")):
        rows = best[best["target"].str.startswith(kind)] if len(best) else best
        if not len(rows):
            continue
        found = rows[rows["decodable"]]
        how = f"the best of {cells} cells each, chosen on half A of the problems, measured on half B"
        if len(found):
            parts = "; ".join(f"{r.target} at {r.position} layer {r.layer}: {100 * r.accuracy_b:.0f}% "
                              f"[{100 * r.ci_low_b:.0f}, {100 * r.ci_high_b:.0f}] vs control {100 * r.control_b:.0f}%"
                              for r in found.itertuples())
            at_bot = int((found["position"] == "BOT").sum())
            out.append(f"Linear probes read the {label} above control for {len(found)} of {len(rows)} targets "
                       f"({how}): {parts}."
                       + (f" For {at_bot} of them the best cell is BOT, before any thought: read from the question "
                          "text." if at_bot else ""))
        else:
            top = rows.sort_values("selectivity_a", ascending=False, kind="stable").iloc[0]
            out.append(f"Linear probes find the {label} nowhere above control: at best {top.target} at "
                       f"{top.position} layer {top.layer}, {100 * top.accuracy_b:.0f}% [{100 * top.ci_low_b:.0f}, "
                       f"{100 * top.ci_high_b:.0f}] vs control {100 * top.control_b:.0f}% and majority "
                       f"{100 * top.majority_b:.0f}% ({how}).")
    lens = report.lens[report.lens["n"] >= MIN_PROBLEMS] if len(report.lens) else report.lens
    if len(lens):
        top = lens.sort_values("top1", ascending=False).iloc[0]
        chance = (f", against {100 * top.permuted_top1:.0f}% there with the targets permuted across problems "
                  f"(at best {100 * lens['permuted_top1'].max():.0f}% over the {len(lens)} cells)"
                  if "permuted_top1" in lens else "")
        out.append(f"The lens per layer ranks a target value first among the number tokens at best for "
                   f"{100 * top.top1:.0f}% of the {top.n} problems it ranks ({top.target} at {top.position} layer "
                   f"{top.layer}; targets ranked on at least {MIN_PROBLEMS} problems){chance}.")
    mp = report.mean_patching
    same, diff = mp[mp["kind"] == "same"], mp[mp["kind"] == "different"]
    if len(same):
        out.append(f"Mean patching: replacing a thought by the mean thought of the problems with the same value of a "
                   f"step leaves {100 * same['accuracy'].min():.0f}-{100 * same['accuracy'].max():.0f}% accuracy, "
                   f"against {100 * same['baseline_accuracy'].min():.0f}-{100 * same['baseline_accuracy'].max():.0f}% "
                   f"unpatched on the same problems (change {100 * same['change'].min():+.0f} to "
                   f"{100 * same['change'].max():+.0f} points).")
        costly = same[same["change_high"] < 0].sort_values("change", kind="stable")
        if len(costly):
            worst = costly.iloc[0]
            out.append(f"Even the same-value mean costs accuracy in {len(costly)} of {len(same)} cells (interval "
                       f"below 0); at most {worst.thought}, step {worst.step}, "
                       f"{100 * worst.accuracy:.0f}% against {100 * worst.baseline_accuracy:.0f}% unpatched on the "
                       f"same problems ({100 * worst.change:+.0f} points [{100 * worst.change_low:+.0f}, "
                       f"{100 * worst.change_high:+.0f}]): the thoughts carry more of their problem than one step's "
                       f"value.")
    if len(diff):
        moved = diff.sort_values("counterfactual", ascending=False, kind="stable").iloc[0]
        out.append(f"Mean patching with another value of a step: at most {100 * moved.counterfactual:.0f}% "
                   f"[{100 * moved.cf_low:.0f}, {100 * moved.cf_high:.0f}] of the answers move to the counterfactual "
                   f"({moved.thought}, step {moved.step}; problems whose counterfactual equals their gold, where the "
                   f"step does not feed the answer, left out).")
    pp = report.pair_patching
    if len(pp) and pp["recovery"].notna().any():
        layers = pp[pp["layer"] != "z"].sort_values("recovery", ascending=False)
        fed = pp[pp["layer"] == "z"].sort_values("recovery", ascending=False)
        r, z = layers.iloc[0], fed.iloc[0]
        last = str(report.settings["n_layers"] - 1)
        source = " (the state the next thought is projected from)" if r.layer == last else ""
        out.append(f"Clean -> corrupted patching ({report.pair_facts['valid']} pairs differing in one question "
                   f"number): the most recovery of the answer's logit difference comes from {r.thought}'s "
                   f"residual after block {r.layer}{source}, {r.recovery:.2f} [{r.ci_low:.2f}, {r.ci_high:.2f}], "
                   f"and from a fed thought, {z.thought}: {z.recovery:.2f} [{z.ci_low:.2f}, {z.ci_high:.2f}].")
    return out
