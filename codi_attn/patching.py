"""Whether a thought's content is used: mean patching by intermediate value, and clean -> corrupted patching.

Mean patching (Cywinski et al.). For thought k and solution step s, each problem's thought k is replaced by the
mean thought k of the other problems whose step s has the same value (`same`: the answer should not move), or
of the problems whose step s has one other value v' (`different`: if thought k carries step s, the answer moves
to the counterfactual answer: the chain recomputed from v', the gold following the steps that have its value,
codi_attn.solutions.answer_if). `different` leaves out the problems whose counterfactual equals their gold (step s
does not feed the answer): an answer that stays correct there would read as moved; `same` leaves out the
problems whose step-s value no other problem has (no mean to take). Measured on the problems patched:
accuracy, the unpatched run's accuracy on the same problems and the change (a paired interval), and the share of
answers equal to the counterfactual.

Pairs. A clean problem and its corrupted twin with one number of the question changed (same token length; the
gold recomputed: codi_attn.solutions, or the demo task's own chain). The corrupted run is patched with the
clean run's residual stream at thought k after block l (`thought.{k}.resid.{l}`), or with the clean z_k itself;
at the corrupted run's answer token (where its number starts) LD = logit(clean answer token) - logit(corrupted
answer token), and the normalised recovery over the pairs is
    (mean LD_patched - mean LD_corrupted) / (mean LD_clean - mean LD_corrupted)
with a 95 % bootstrap interval over pairs: 0 when nothing is patched, 1 when everything is (the clean prompt's
embeddings: `prefill.embed`).

This module plans the conditions and tables their outcomes (numpy, no model); codi_attn.patching_run runs them on
the model.
"""
from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from codi_attn.answers import correctness, parse_gold
from codi_attn.conventions import THOUGHTS, thought_name
from codi_attn.solutions import answer_if, change_number, numbers_in, solution_steps
from codi_attn.validate import CI_LEVEL, drawn_interval

MIN_PATCHED = 10  # a step is mean-patched where at least this many problems have it


def counterfactual_answer(problem: dict, step: int, value: float, synthetic: bool) -> float | None:
    """The gold answer if step `step` of the problem had the result `value` (None where it cannot be told): the
    demo task's chain ends in its gold; a GSM8K gold moves only through the steps that have its value."""
    if synthetic:
        from codi_attn.demo.task import answer_if as demo_answer_if

        return float(demo_answer_if({"answer": problem["solution"]}, step, int(value)))
    return answer_if(problem["question"], problem["solution"], step, value)


# ---------------------------------------------------------------- mean patching


MIN_SHARE = 0.8  # mean patching patches a step that at least this share of the problems have
MEAN_PATCHING_COLUMNS = ("thought", "step", "kind", "n", "accuracy", "ci_low", "ci_high", "baseline_accuracy", "change",
                         "change_low", "change_high", "counterfactual", "cf_low", "cf_high")


@dataclass(frozen=True)
class MeanPatch:
    """One mean-patching condition: thought k replaced by the mean thought k of the problems whose step s has the
    same value (`same`) or the most frequent other value (`different`)."""

    thought: int
    step: int
    kind: str  # same | different


@dataclass
class Donors:
    """Whom each problem takes its mean from under one (step, kind), and what it should answer then."""

    donors: list[list[int]]  # per problem: the problems whose mean thought it is fed (empty: not patched)
    target: np.ndarray  # [N] the counterfactual answer (`different`, where it differs from the gold; nan otherwise)

    @property
    def used(self) -> np.ndarray:
        """[N] bool: the problems patched."""
        return np.array([bool(d) for d in self.donors])


def donors(problems: Sequence[dict], step: int, kind: str, synthetic: bool) -> Donors:
    """The donors of every problem for step `step` and `kind` (the same for every thought); under `different`, none
    where the counterfactual cannot be told or equals the problem's gold."""
    values = [[st.value for st in solution_steps(p["solution"])] for p in problems]
    have = [i for i, v in enumerate(values) if len(v) >= step]
    by_value: dict[float, list[int]] = {}
    for i in have:
        by_value.setdefault(values[i][step - 1], []).append(i)
    ranked = [v for v, _ in Counter({v: len(ix) for v, ix in by_value.items()}).most_common()]
    out, target = [[] for _ in problems], np.full(len(problems), np.nan)
    for i in have:
        v = values[i][step - 1]
        if kind == "same":
            out[i] = [j for j in by_value[v] if j != i]
            continue
        other = next((w for w in ranked if w != v), None)
        cf = None if other is None else counterfactual_answer(problems[i], step, other, synthetic)
        if cf is not None and cf != parse_gold(problems[i]["answer"]):
            out[i], target[i] = by_value[other], cf
    return Donors(out, target)


def mean_patches(problems: Sequence[dict], synthetic: bool, max_steps: int = 7, min_share: float = MIN_SHARE
                 ) -> list[MeanPatch]:
    """The conditions, in table order (step, thought, kind): steps that at least `min_share` of the problems (and
    MIN_PATCHED) have, where at least MIN_PATCHED problems have a mean to take."""
    counts = [len(solution_steps(p["solution"])) for p in problems]
    out = []
    for s in range(1, max_steps + 1):
        if sum(c >= s for c in counts) < max(MIN_PATCHED, min_share * len(problems)):
            continue
        enough = {kind: donors(problems, s, kind, synthetic).used.sum() >= MIN_PATCHED
                  for kind in ("same", "different")}
        out += [MeanPatch(k, s, kind) for k in THOUGHTS for kind in ("same", "different") if enough[kind]]
    return out


def mean_table(problems: Sequence[dict], patches: Sequence[MeanPatch], predictions: Sequence[np.ndarray],
               baseline: np.ndarray, synthetic: bool, n_boot: int = 200, seed: int = 0) -> pd.DataFrame:
    """One row per patch, on the problems patched: accuracy [CI], the unpatched accuracy of the same problems
    (`baseline` [N] bool: the unpatched run's correctness) and the change [paired CI], and for `different` the
    share of answers equal to the counterfactual [CI] (intervals drawn from one generator, in table order)."""
    rng = np.random.default_rng(seed)
    golds = [p["answer"] for p in problems]
    plans = {(p.step, p.kind): donors(problems, p.step, p.kind, synthetic) for p in patches}
    rows = []
    for patch, prediction in zip(patches, predictions):
        plan = plans[patch.step, patch.kind]
        used = plan.used
        ok = correctness(prediction, golds)[used].astype(float)
        base = np.asarray(baseline, dtype=float)[used]
        lo, hi = drawn_interval(ok, n_boot, rng)
        change_lo, change_hi = drawn_interval(ok - base, n_boot, rng)
        row = {"thought": thought_name(patch.thought), "step": patch.step, "kind": patch.kind, "n": int(used.sum()),
               "accuracy": float(ok.mean()), "ci_low": lo, "ci_high": hi, "baseline_accuracy": float(base.mean()),
               "change": float((ok - base).mean()), "change_low": change_lo, "change_high": change_hi,
               "counterfactual": math.nan, "cf_low": math.nan, "cf_high": math.nan}
        if patch.kind == "different":
            moved = (prediction[used] == plan.target[used]).astype(float)
            row["counterfactual"] = float(moved.mean())
            row["cf_low"], row["cf_high"] = drawn_interval(moved, n_boot, rng)
        rows.append(row)
    return pd.DataFrame(rows, columns=MEAN_PATCHING_COLUMNS)


# ---------------------------------------------------------------- pairs


@dataclass
class Pair:
    """A clean problem (index into the caller's problems) and its corrupted twin."""

    index: int
    question: str  # corrupted
    solution: str  # corrupted, recomputed
    answer: float  # corrupted gold
    changed: tuple[float, float]


def twins(problem: dict, synthetic: bool):
    """Candidate corrupted twins of a problem, in order: each number of the question (+1, then -1)."""
    if synthetic:
        from codi_attn.demo import task  # lazy: only --dataset synthetic

        record = {"question": problem["question"], "answer": problem["solution"]}
        start, ops = task.chain_of(record)
        numbers = [(0, start)] + [(j, b) for j, (op, b) in enumerate(ops, 1) if op != "*"]
        for which, old in numbers:
            for delta in (1, -1):
                rec = task.change_number(record, which, old + delta)
                if rec is not None:
                    yield Pair(-1, rec["question"], rec["answer"], float(rec["answer"].split("####")[-1]),
                               (old, old + delta))
        return
    for which, (_, _, old) in enumerate(numbers_in(problem["question"])):
        for delta in (1, -1):
            cf = change_number(problem["question"], problem["solution"], which, old + delta)
            if cf is not None:
                yield Pair(-1, cf.question, cf.solution, cf.answer, cf.changed)


@dataclass(frozen=True)
class PairPatch:
    """One pair-patching condition: the corrupted run gets the clean run's thought k residual after block `layer`
    ('0', '1', ...), or the clean z_k itself (layer 'z')."""

    thought: int
    layer: str


def pair_patches(n_layers: int) -> list[PairPatch]:
    """The conditions in table order: per thought, every layer, then z."""
    return [PairPatch(k, layer) for k in THOUGHTS for layer in (*map(str, range(n_layers)), "z")]


@dataclass
class PairBaseline:
    """What the pair table reads of the clean and the corrupted run of the pairs (P pairs)."""

    corrupted: list[str]  # [P] corrupted questions
    valid: np.ndarray  # [P] bool: both runs give an answer token, different ones
    ld_clean: np.ndarray  # [P] float64 logit difference (clean - corrupted answer token) in the clean run
    ld_corrupted: np.ndarray  # [P] the same in the corrupted run
    clean_prediction: np.ndarray  # [P] the clean run's parsed answer

    def facts(self) -> dict:
        """Pairs, pairs that count, and the mean logit differences of the two runs."""
        v = self.valid
        return {"pairs": len(v), "valid": int(v.sum()),
                "ld_clean": float(np.mean(self.ld_clean[v])) if v.any() else math.nan,
                "ld_corrupted": float(np.mean(self.ld_corrupted[v])) if v.any() else math.nan}

    def same(self, other: "PairBaseline") -> bool:
        """The same runs (corrupted questions, pairs that count, LDs, clean answers), bit for bit."""
        return self.corrupted == other.corrupted and all(
            np.array_equal(getattr(self, k), getattr(other, k), equal_nan=True)
            for k in ("valid", "ld_clean", "ld_corrupted", "clean_prediction"))


PAIR_PATCHING_COLUMNS = ("thought", "layer", "n", "recovery", "ci_low", "ci_high", "answers_clean")


def pair_table(names: Sequence[tuple[str, str]], outcomes: Sequence[tuple[np.ndarray, np.ndarray]],
               base: PairBaseline, n_boot: int = 200, seed: int = 0) -> pd.DataFrame:
    """One row per condition (names: (thought, layer)): recovery [CI] over the pairs that count and
    answers_clean, the share of corrupted answers that become the clean answer (intervals drawn from one
    generator, in table order)."""
    rng = np.random.default_rng(seed)
    rows = []
    for (thought, layer), (ld, prediction) in zip(names, outcomes):
        use = base.valid & ~np.isnan(ld)
        rows.append({"thought": thought, "layer": layer, "n": int(use.sum()),
                     **_recovery(ld[use], base.ld_clean[use], base.ld_corrupted[use], n_boot, rng),
                     "answers_clean": float((prediction[base.valid] == base.clean_prediction[base.valid]).mean())
                     if base.valid.any() else math.nan})
    return pd.DataFrame(rows, columns=PAIR_PATCHING_COLUMNS)


def _recovery(ld: np.ndarray, clean: np.ndarray, corrupt: np.ndarray, n_boot: int,
              rng: np.random.Generator) -> dict[str, float]:
    """Normalised logit-difference recovery of the means, with a bootstrap interval over pairs."""
    def recovery(idx: np.ndarray) -> float:
        span = clean[idx].mean() - corrupt[idx].mean()
        return float((ld[idx].mean() - corrupt[idx].mean()) / span) if abs(span) > 1e-12 else math.nan

    if not len(ld):
        return {"recovery": math.nan, "ci_low": math.nan, "ci_high": math.nan}
    draws = np.array([recovery(rng.integers(0, len(ld), len(ld))) for _ in range(n_boot)])
    draws = draws[~np.isnan(draws)]
    q = 100 * (1 - CI_LEVEL) / 2
    lo, hi = np.percentile(draws, [q, 100 - q]) if len(draws) else (math.nan, math.nan)
    return {"recovery": recovery(np.arange(len(ld))), "ci_low": float(lo), "ci_high": float(hi)}
