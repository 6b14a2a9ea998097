"""Card of the join_thoughts step: what each thought holds."""
from __future__ import annotations

import pandas as pd
from metaflow.cards import Markdown

from cards.common import few_problems_bullets, image, table
from codi_attn.contents import ThoughtReport, best_probes


def _pct(v: float) -> str:
    return "n/a" if pd.isna(v) else f"{100 * v:.0f}%"


def _points(v: float) -> str:
    return "n/a" if pd.isna(v) else f"{100 * v:+.0f}"


def thoughts_card(report: ThoughtReport) -> list:
    """Components of the card: conventions, findings, attended tokens, probes, lens, patching (and its mean patching
    table)."""
    from codi_attn.figures.thoughts import attended_examples, attended_kinds, lens_maps, patching_maps, probe_maps

    s = report.settings
    best = best_probes(report.probes)
    parts = [
        Markdown(f"# What each thought holds\n\n{s['model']}, {s['n_problems']} problems (baseline accuracy "
                 f"{100 * report.baseline_accuracy:.1f}%). Thought k (z1..z6) is the vector fed at position Q+k; "
                 "BOT is position Q, whose final hidden state gives z1; layer l is the residual stream after block "
                 "l; step s is the s-th `<<...>>` calculation of the gold solution."),
        Markdown("## Findings\n\n" + "\n".join(f"- {line}" for line in [
            *few_problems_bullets(s["n_problems"]), *report.findings])
                 + "".join(f"\n- Note: {n}." for n in report.notes)),
        Markdown("## Attended tokens\n\nEach thought's attention on each question token, averaged over every layer "
                 "and head (the CODI paper's figure)."),
        image(attended_kinds(report)),
        image(attended_examples(report)),
        Markdown("## Linear probes\n\nStandardised ridge classifiers (scikit-learn), 5-fold cross-validated over "
                 "problems; 95 % bootstrap intervals. Controls on the same inputs and folds: labels permuted across "
                 "problems (chance), and Hewitt and Liang's control task, a random label fixed per value of the "
                 "question's first number. Selectivity = accuracy - control (the map: on all problems). A target's "
                 "best cell is chosen by its selectivity on half A of the problems and judged on half B (a cell "
                 "chosen among all of them on the problems it is judged on leans optimistic: on noise its interval "
                 "cleared every control for 1 target in 8): the target counts as decodable where the cell's "
                 "interval on B lies above the control, the permuted labels and the majority class on B (on noise: "
                 "about 1 target in 40). Each half is cross-validated on its own."),
        image(probe_maps(report)),
    ]
    if len(best):
        shown = pd.DataFrame({
            "target": best["target"], "best cell": [f"{p} layer {l}" for p, l in zip(best["position"], best["layer"])],
            "selectivity on A": [_points(v) for v in best["selectivity_a"]],
            "accuracy on B": [f"{_pct(a)} [{_pct(lo)}, {_pct(hi)}]" for a, lo, hi in
                              zip(best["accuracy_b"], best["ci_low_b"], best["ci_high_b"])],
            "control on B": [_pct(v) for v in best["control_b"]],
            "permuted on B": [_pct(v) for v in best["permuted_b"]],
            "majority on B": [_pct(v) for v in best["majority_b"]], "classes": best["classes"],
            "n (B)": [f"{n} ({b})" for n, b in zip(best["n"], best["n_b"])], "decodable": best["decodable"]})
        parts.append(table(shown))
    parts += [Markdown("## Lens per layer\n\nThe residual after each block through the final norm and the LM head, "
                       "ranked among the values the number tokens spell (a value scores the highest logit of its "
                       "tokens). Matching rule: a token spells value v when its decoded text without spaces and "
                       "commas is v written out; a value no single token spells is not ranked."),
              image(lens_maps(report)),
              Markdown("## Patching\n\nMean patching: thought k replaced by the mean thought k of the problems whose "
                       "step s has the same value (the answer should stay) or one other value (if thought k holds "
                       "step s, the answer moves to the counterfactual: the chain recomputed from that value, the "
                       "gold answer following the steps that have its value). The other-value rows leave out the "
                       "problems whose counterfactual equals their gold (step s does not feed the answer), where an "
                       "answer that stays correct would read as moved. A problem is patched only where it has a "
                       "mean to take: the same-value rows leave out the problems whose step-s value no other "
                       "problem shares, so each row's n counts its own problems. Each row's accuracy is set against "
                       "the unpatched accuracy of the same problems, the change with a paired bootstrap interval. "
                       "Clean -> corrupted: pairs whose questions differ in one number (same length, gold "
                       "recomputed); the corrupted run patched with the clean run's residual at thought k after "
                       "block l, or with the clean z_k; recovery = (LD_patched - LD_corrupted) / (LD_clean - "
                       "LD_corrupted) of the mean logit difference between the clean and the corrupted answer "
                       "token: 0 = nothing recovered, 1 = the clean run."),
              image(patching_maps(report))]
    mp = report.mean_patching
    if len(mp) and "baseline_accuracy" in mp:  # runs before the same-problem baseline have no such columns
        parts.append(table(pd.DataFrame({
            "thought": mp["thought"], "step": mp["step"], "kind": mp["kind"], "n": mp["n"],
            "accuracy": [f"{_pct(a)} [{_pct(lo)}, {_pct(hi)}]" for a, lo, hi in
                         zip(mp["accuracy"], mp["ci_low"], mp["ci_high"])],
            "unpatched (same problems)": [_pct(v) for v in mp["baseline_accuracy"]],
            "change": [f"{_points(c)} [{_points(lo)}, {_points(hi)}]" for c, lo, hi in
                       zip(mp["change"], mp["change_low"], mp["change_high"])],
            "to the counterfactual": [f"{_pct(c)} [{_pct(lo)}, {_pct(hi)}]" if pd.notna(c) else "" for c, lo, hi in
                                      zip(mp["counterfactual"], mp["cf_low"], mp["cf_high"])]})))
    return parts
