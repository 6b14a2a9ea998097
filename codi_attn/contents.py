"""What each thought holds: the attended question tokens, probes of intermediate results, a lens per layer and
patching, from one recording run, with the findings in plain words (the flow's analyse_thoughts step).

Conventions: thought k (z_k, k = 1..6) is the vector fed at position Q + k; probes and lens also read BOT
(position Q, whose final hidden state gives z1); layers are the residual stream after block l (0-based); step s
(1-based) is the s-th `<<...>>` calculation of the gold solution.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from codi_attn.attended import AttendedTokens, attended_summary, question_tokens
from codi_attn.conventions import Head, head_label
from codi_attn.extract import correctness
from codi_attn.hooks import RecordThoughts
from codi_attn.model import CODIModel
from codi_attn.patching import MIN_PATCHED, MIN_SHARE, make_pairs, mean_patching, pair_patching
from codi_attn.probes import MIN_PROBLEMS, RecordResiduals, lens_table, run_probes
from codi_attn.runner import Runner, tokenize_questions

N_EXAMPLES = 3  # problems whose attended tokens the card shows


@dataclass
class ThoughtReport:
    """Everything the analyse_thoughts card shows; picklable (a Metaflow artifact)."""

    attended: list[np.ndarray]  # per problem [6, Q_n] float16: attention on each question token (all heads)
    attended_by_kind: pd.DataFrame  # per thought: share on number / operation / other tokens
    attended_by_step: pd.DataFrame  # per thought and step: share on the step's operands
    attended_heads_by_kind: pd.DataFrame | None  # the same over `settings['heads']` only
    examples: list[dict]  # N_EXAMPLES problems: id, tokens, kinds, operand_of, weights [6, Q]
    probes: pd.DataFrame  # codi_attn.probes.run_probes
    lens: pd.DataFrame  # codi_attn.probes.lens_table
    mean_patching: pd.DataFrame  # codi_attn.patching.mean_patching
    pair_patching: pd.DataFrame  # codi_attn.patching.pair_patching
    pair_facts: dict
    baseline_accuracy: float
    settings: dict
    findings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def analyse_thoughts(model: CODIModel, problems: Sequence[dict], synthetic: bool, heads: Sequence[Head] = (),
                     batch_size: int = 16, max_new_tokens: int = 256, n_boot: int = 200, seed: int = 0,
                     stack: int = 1) -> ThoughtReport:
    """The whole analysis on `problems` (dicts with id, question, answer, solution). `synthetic`: the demo task's
    records (whose chains the pair generator reads exactly); `heads`: heads whose attended tokens are shown apart
    (e.g. the causally critical ones)."""
    questions = [p["question"] for p in problems]
    solutions = [p["solution"] for p in problems]
    n = len(problems)
    every, chosen = AttendedTokens(model, n), AttendedTokens(model, n, heads) if heads else None
    resid, thoughts = RecordResiduals(model, n), RecordThoughts(n)
    gen = Runner(model, batch_size, max_new_tokens).run(questions, [h for h in (every, chosen, resid, thoughts) if h])
    base_accuracy = float(correctness(gen.prediction, [p["answer"] for p in problems]).mean())
    ids = tokenize_questions(model, questions)
    tokens = [question_tokens(model, t[:-1], sol) for t, sol in zip(ids, solutions)]
    by_kind, by_step = attended_summary(every.weights, tokens)
    heads_by_kind = attended_summary(chosen.weights, tokens)[0] if chosen else None
    examples = [{"id": problems[i].get("id", str(i)), "tokens": tokens[i].text, "kinds": tokens[i].kind,
                 "operand_of": tokens[i].operand_of, "weights": every.weights[i]}
                for i in range(min(N_EXAMPLES, n))]
    probes = run_probes(resid.resid, solutions, questions, n_boot=n_boot, seed=seed)
    lens = lens_table(model, resid.resid, solutions)
    patched = mean_patching(model, problems, thoughts.z, synthetic, batch_size, max_new_tokens, n_boot, seed,
                            stack=stack)
    pairs = make_pairs(model, problems, synthetic)
    notes = []
    if probes.empty:
        notes.append(f"no probe: fewer than {MIN_PROBLEMS} problems have any one target with 2 or more values")
    if patched.empty:
        notes.append(f"no mean patching: no step is in {100 * MIN_SHARE:.0f}% of the problems and at least "
                     f"{MIN_PATCHED} of them with the same and with another value")
    if pairs:
        pair_table, facts = pair_patching(model, problems, pairs, batch_size, max_new_tokens, n_boot, seed, stack=stack)
        if not facts["valid"]:
            notes.append(f"no clean/corrupted pair of the {len(pairs)} has answer tokens in both runs that differ: "
                         "pair patching has nothing to recover")
    else:
        pair_table, facts = pd.DataFrame(columns=["thought", "layer", "n", "recovery", "ci_low", "ci_high",
                                                  "answers_clean"]), {"pairs": 0, "valid": 0}
        notes.append("no clean/corrupted pair: no question had a number that could change alone")
    settings = {"model": model.name, "n_problems": n, "n_layers": model.n_layers, "n_heads": model.n_heads,
                "heads": [head_label(*h) for h in heads], "n_boot": n_boot, "seed": seed, "synthetic": synthetic}
    report = ThoughtReport([w.astype(np.float16) for w in every.weights], by_kind, by_step, heads_by_kind, examples,
                           probes, lens, patched, pair_table, facts, base_accuracy, settings, notes=notes)
    report.findings = findings(report)
    return report


# ---------------------------------------------------------------- findings


def decodable(row: pd.Series) -> bool:
    """A probe cell reads the target: its accuracy interval lies above the control task, the permuted labels
    and the majority class."""
    return bool(row["ci_low"] > max(row["control"], row["permuted"], row["majority"]))


def best_probes(probes: pd.DataFrame) -> pd.DataFrame:
    """Per target, the cell (position, layer) with the highest selectivity (a maximum over cells: optimistic)."""
    if probes.empty:
        return probes
    best = probes.sort_values("selectivity", ascending=False, kind="stable").groupby("target", sort=False).head(1)
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
        if len(found):
            parts = "; ".join(f"{r.target} at {r.position} layer {r.layer}: {100 * r.accuracy:.0f}% "
                              f"[{100 * r.ci_low:.0f}, {100 * r.ci_high:.0f}] vs control {100 * r.control:.0f}%"
                              for r in found.itertuples())
            at_bot = int((found["position"] == "BOT").sum())
            out.append(f"Linear probes read the {label} above control for {len(found)} of {len(rows)} targets "
                       f"(best of {cells} cells each): {parts}."
                       + (f" For {at_bot} of them the best cell is BOT, before any thought: read from the question "
                          "text." if at_bot else ""))
        else:
            top = rows.sort_values("selectivity", ascending=False).iloc[0]
            out.append(f"Linear probes find the {label} nowhere above control: at best {top.target} at "
                       f"{top.position} layer {top.layer}, {100 * top.accuracy:.0f}% [{100 * top.ci_low:.0f}, "
                       f"{100 * top.ci_high:.0f}] vs control {100 * top.control:.0f}% and majority "
                       f"{100 * top.majority:.0f}% (best of {cells} cells).")
    lens = report.lens[report.lens["n"] >= MIN_PROBLEMS] if len(report.lens) else report.lens
    if len(lens):
        top = lens.sort_values("top1", ascending=False).iloc[0]
        out.append(f"The lens per layer ranks a target value first among the number tokens at best for "
                   f"{100 * top.top1:.0f}% of the {top.n} problems it ranks ({top.target} at {top.position} layer "
                   f"{top.layer}; targets ranked on at least {MIN_PROBLEMS} problems).")
    mp = report.mean_patching
    if len(mp):
        same, diff = mp[mp["kind"] == "same"], mp[mp["kind"] == "different"]
        moved = diff.sort_values("counterfactual", ascending=False).iloc[0]
        out.append(f"Mean patching: replacing a thought by the mean thought of problems with the same value of a "
                   f"step leaves {100 * same['accuracy'].min():.0f}-{100 * same['accuracy'].max():.0f}% accuracy "
                   f"(baseline {100 * report.baseline_accuracy:.0f}%); with another value, at most "
                   f"{100 * moved.counterfactual:.0f}% [{100 * moved.cf_low:.0f}, {100 * moved.cf_high:.0f}] of the "
                   f"answers move to the counterfactual ({moved.thought}, step {moved.step}).")
        if same["accuracy"].min() < report.baseline_accuracy - 0.1:
            worst = same.sort_values("accuracy").iloc[0]
            out.append(f"Even the same-value mean costs accuracy (down to {100 * worst.accuracy:.0f}% at "
                       f"{worst.thought}): the thoughts carry more of their problem than one step's value.")
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
