"""Whether a thought's content is used: mean patching by intermediate value, and clean -> corrupted patching.

Mean patching (Cywinski et al.). For thought k and solution step s, each problem's thought k is replaced by the
mean thought k of the other problems whose step s has the same value (`same`: the answer should not move), or
of the problems whose step s has one other value v' (`different`: if thought k carries step s, the answer moves
to the counterfactual answer, the chain recomputed from v'). Measured: accuracy, and the share of answers equal
to the counterfactual.

Pairs. A clean problem and its corrupted twin with one number of the question changed (same token length; the
gold recomputed: codi_attn.solutions, or the demo task's own chain). The corrupted run is patched with the
clean run's residual stream at thought k after block l (`thought.{k}.resid.{l}`), or with the clean z_k itself;
at the corrupted run's answer token (where its number starts) LD = logit(clean answer token) - logit(corrupted
answer token), and the normalised recovery over the pairs is
    (mean LD_patched - mean LD_corrupted) / (mean LD_clean - mean LD_corrupted)
with a 95 % bootstrap interval over pairs: 0 when nothing is patched, 1 when everything is (the clean prompt's
embeddings: `prefill.embed`).
"""
from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from codi_attn.answers import parse_answer
from codi_attn.conventions import N_THOUGHTS, THOUGHTS, thought_name
from codi_attn.extract import correctness
from codi_attn.hooks import AnswerLogits, AnswerShift, FeedThoughts, RecordThoughts
from codi_attn.model import CODIModel
from codi_attn.runner import Hook, PaddedBatch, Point, Runner, number_tokens, tokenize_questions
from codi_attn.solutions import answer_if, change_number, numbers_in, solution_steps
from codi_attn.validate import CI_LEVEL, drawn_interval

MIN_PATCHED = 10  # a step is mean-patched where at least this many problems have it


def counterfactual_answer(problem: dict, step: int, value: float, synthetic: bool) -> float | None:
    """The answer if step `step` of the problem had the result `value` (None where it cannot be told)."""
    if synthetic:
        from codi_attn.demo.task import answer_if as demo_answer_if

        return float(demo_answer_if({"answer": problem["solution"]}, step, int(value)))
    return answer_if(problem["question"], problem["solution"], step, value)


# ---------------------------------------------------------------- mean patching


MIN_SHARE = 0.8  # mean patching patches a step that at least this share of the problems have
MEAN_PATCHING_COLUMNS = ("thought", "step", "kind", "n", "accuracy", "ci_low", "ci_high", "counterfactual", "cf_low",
                         "cf_high")


def mean_patching(model: CODIModel, problems: Sequence[dict], thoughts: np.ndarray, synthetic: bool,
                  batch_size: int = 16, max_new_tokens: int = 256, n_boot: int = 200, seed: int = 0,
                  max_steps: int = 7, min_share: float = MIN_SHARE, stack: int = 1) -> pd.DataFrame:
    """One row per (thought k, step s, same|different): accuracy [CI] and, for `different`, the share of answers
    equal to the counterfactual [CI], on the problems that have step s and a mean to take. thoughts: [N, 6, d],
    the thoughts the baseline fed (RecordThoughts.z). Steps are patched where at least `min_share` of the problems
    (and MIN_PATCHED) have them."""
    rng = np.random.default_rng(seed)
    questions = [p["question"] for p in problems]
    golds = [p["answer"] for p in problems]
    values = [[st.value for st in solution_steps(p["solution"])] for p in problems]
    conditions, meta = [], []
    for s in range(1, max_steps + 1):
        have = [i for i, v in enumerate(values) if len(v) >= s]
        if len(have) < max(MIN_PATCHED, min_share * len(problems)):
            continue
        by_value: dict[float, list[int]] = {}
        for i in have:
            by_value.setdefault(values[i][s - 1], []).append(i)
        ranked = [v for v, _ in Counter({v: len(ix) for v, ix in by_value.items()}).most_common()]
        for k in THOUGHTS:
            for kind in ("same", "different"):
                z = thoughts.copy()
                used, target = np.zeros(len(problems), bool), np.full(len(problems), np.nan)
                for i in have:
                    v = values[i][s - 1]
                    if kind == "same":
                        donors = [j for j in by_value[v] if j != i]
                    else:
                        other = next((w for w in ranked if w != v), None)
                        donors = [] if other is None else by_value[other]
                        cf = None if other is None else counterfactual_answer(problems[i], s, other, synthetic)
                        if cf is None:
                            continue
                        target[i] = cf
                    if donors:
                        z[i, k - 1] = thoughts[donors, k - 1].mean(0)
                        used[i] = True
                if used.sum() >= MIN_PATCHED:
                    conditions.append([FeedThoughts(z, thoughts=[k])])
                    meta.append((k, s, kind, used, target))
    generations = Runner(model, batch_size, max_new_tokens, stack=stack).run_conditions(questions, conditions)
    rows = []
    for (k, s, kind, used, target), gen in zip(meta, generations):
        ok = correctness(gen.prediction, golds)[used].astype(float)
        lo, hi = drawn_interval(ok, n_boot, rng)
        row = {"thought": thought_name(k), "step": s, "kind": kind, "n": int(used.sum()),
               "accuracy": float(ok.mean()), "ci_low": lo, "ci_high": hi,
               "counterfactual": math.nan, "cf_low": math.nan, "cf_high": math.nan}
        if kind == "different":
            moved = (gen.prediction[used] == target[used]).astype(float)
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


def make_pairs(model: CODIModel, problems: Sequence[dict], synthetic: bool) -> list[Pair]:
    """One corrupted twin per problem where one works: the first number of the question that can change by +1
    (else -1) with the solution recomputed, the same number of tokens and another answer."""
    pairs = []
    for i, p in enumerate(problems):
        for found in _twins(p, synthetic):
            clean, corrupted = tokenize_questions(model, [p["question"], found.question])
            if len(clean) == len(corrupted) and found.answer != float(p["answer"].replace(",", "")):
                pairs.append(Pair(i, found.question, found.solution, found.answer, found.changed))
                break
    return pairs


def _twins(problem: dict, synthetic: bool):
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


class PatchResidual(Hook):
    """Replace thought k's residual after block `layer` by `source` [N, 7, L, d] (RecordResiduals of the clean
    run; rows: the caller's problems)."""

    def __init__(self, source: np.ndarray, k: int, layer: int):
        self.source, self.points = source, (f"thought.{k}.resid.{layer}",)
        self.k, self.layer = k, layer

    def __call__(self, value: torch.Tensor, point: Point, batch: PaddedBatch) -> torch.Tensor:
        return torch.as_tensor(self.source[batch.rows, self.k, self.layer], dtype=value.dtype, device=value.device)


class PatchEmbeddings(Hook):
    """Replace the prompt's token embeddings by those of `questions` (token for token; same lengths): the whole
    clean prompt, i.e. everything patched."""

    points = ("prefill.embed",)

    def __init__(self, model: CODIModel, questions: Sequence[str]):
        self.model, self.ids = model, tokenize_questions(model, questions)

    def __call__(self, value: torch.Tensor, point: Point, batch) -> torch.Tensor:
        out = value.clone()
        embed = self.model.lm.get_input_embeddings()
        width = value.shape[1]
        for b, n in enumerate(batch.rows):
            ids = torch.as_tensor(self.ids[n], device=value.device)
            out[b, width - len(ids):] = embed(ids)
        return out


def pair_patching(model: CODIModel, problems: Sequence[dict], pairs: Sequence[Pair], batch_size: int = 16,
                  max_new_tokens: int = 256, n_boot: int = 200, seed: int = 0, stack: int = 1,
                  extra: Callable[[list[str]], list[tuple[str, list]]] | None = None) -> tuple[pd.DataFrame, dict]:
    """Recovery per (thought k, layer l) and for z_k (layer 'z'), over the pairs whose clean and corrupted runs both
    give an answer token, different ones. Returns (table: thought, layer, recovery, ci_low, ci_high,
    answers_clean: share of corrupted answers that become the clean answer, n) and facts (pairs used, LDs).
    `extra(corrupted_questions)` may add named conditions (the tests' full and empty patches)."""
    from codi_attn.probes import RecordResiduals

    rng = np.random.default_rng(seed)
    clean_q = [problems[p.index]["question"] for p in pairs]
    corrupt_q = [p.question for p in pairs]
    runner = Runner(model, batch_size, max_new_tokens, stack=stack)
    numbers = number_tokens(model)
    runs = {}
    for name, qs in (("clean", clean_q), ("corrupted", corrupt_q)):
        answer, thoughts, resid = AnswerLogits(len(qs), numbers=numbers), RecordThoughts(len(qs)), None
        hooks = [answer, thoughts]
        if name == "clean":
            resid = RecordResiduals(model, len(qs))
            hooks.append(resid)
        gen = runner.run(qs, hooks)
        runs[name] = (gen, answer, thoughts, resid)
    (gen_c, ans_c, th_c, res_c), (gen_x, ans_x, _, _) = runs["clean"], runs["corrupted"]
    rows_c = np.arange(len(pairs))
    tok_c = np.where(ans_c.step >= 0, gen_c.tokens[rows_c, np.maximum(ans_c.step, 0)], -1)
    tok_x = np.where(ans_x.step >= 0, gen_x.tokens[rows_c, np.maximum(ans_x.step, 0)], -1)
    valid = (ans_c.step >= 0) & (ans_x.step >= 0) & (tok_c != tok_x) & (tok_c >= 0) & (tok_x >= 0)
    safe_c, safe_x = np.maximum(tok_c, 0), np.maximum(tok_x, 0)
    # float64 like AnswerShift's logit_diff, so patching nothing gives exactly 0
    logits_c, logits_x = ans_c.logits.astype(np.float64), ans_x.logits.astype(np.float64)
    ld_clean = logits_c[rows_c, safe_c] - logits_c[rows_c, safe_x]
    ld_corrupt = logits_x[rows_c, safe_c] - logits_x[rows_c, safe_x]
    conditions, names = [], []
    for k in THOUGHTS:
        for layer in range(model.n_layers):
            conditions.append([PatchResidual(res_c.resid, k, layer)])
            names.append((thought_name(k), str(layer)))
        conditions.append([FeedThoughts(th_c.z, thoughts=[k])])
        names.append((thought_name(k), "z"))
    for name, hooks in (extra(corrupt_q) if extra else []):
        conditions.append(hooks)
        names.append((name, ""))
    shifts = [AnswerShift(ans_x.logits, ans_x.step, gen_x.tokens, safe_c, safe_x) for _ in conditions]
    # all pairs run (the same batches as the corrupted run: patching nothing reproduces it bit for bit), but
    # only where some pair counts
    generations = runner.run_conditions(corrupt_q, [[*c, s] for c, s in zip(conditions, shifts)]) if valid.any() \
        else [None] * len(conditions)
    clean_answer = np.array([parse_answer(t) for t in gen_c.text], dtype=float)
    rows = []
    for (thought, layer), shift, gen in zip(names, shifts, generations):
        ld = shift.logit_diff
        use = valid & ~np.isnan(ld)
        rows.append({"thought": thought, "layer": layer, "n": int(use.sum()),
                     **_recovery(ld[use], ld_clean[use], ld_corrupt[use], n_boot, rng),
                     "answers_clean": float((gen.prediction[valid] == clean_answer[valid]).mean())
                     if valid.any() else math.nan})
    facts = {"pairs": len(pairs), "valid": int(valid.sum()), "ld_clean": float(np.mean(ld_clean[valid]))
             if valid.any() else math.nan, "ld_corrupted": float(np.mean(ld_corrupt[valid])) if valid.any()
             else math.nan}
    return pd.DataFrame(rows), facts


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
