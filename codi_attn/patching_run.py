"""Mean patching and clean -> corrupted patching (codi_attn.patching) run on the model: the patched runs, the
pairs' clean and corrupted runs, and the hooks that patch a residual or the prompt's embeddings.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from codi_attn.answers import parse_answer
from codi_attn.checkpoints import Checkpoints
from codi_attn.conventions import thought_name
from codi_attn.hooks import AnswerLogits, AnswerShift, FeedThoughts, RecordResiduals, RecordThoughts
from codi_attn.model import CODIModel
from codi_attn.patching import (MIN_SHARE, MeanPatch, Pair, PairBaseline, PairPatch, donors, mean_patches,
                                mean_table, pair_patches, pair_table, twins)
from codi_attn.runner import Hook, PaddedBatch, Point, Runner, number_tokens, tokenize_questions


# ---------------------------------------------------------------- mean patching


def mean_outcomes(model: CODIModel, problems: Sequence[dict], patches: Sequence[MeanPatch], thoughts: np.ndarray,
                  synthetic: bool, batch_size: int = 16, max_new_tokens: int = 256, stack: int = 1,
                  checkpoints: Checkpoints | None = None, progress: Callable[[int], None] | None = None
                  ) -> list[np.ndarray]:
    """The parsed answers [N] of each patch's run. thoughts: [N, 6, d], the thoughts the baseline fed
    (RecordThoughts.z); with `checkpoints`, finished batches are saved and read back; `progress(k)` after each
    batch of k problems has run through every patch."""
    plans = {(p.step, p.kind): donors(problems, p.step, p.kind, synthetic) for p in patches}
    conditions = []
    for patch in patches:
        z, k = thoughts.copy(), patch.thought
        for i, d in enumerate(plans[patch.step, patch.kind].donors):
            if d:
                z[i, k - 1] = thoughts[d, k - 1].mean(0)
        conditions.append([FeedThoughts(z, thoughts=[k])])
    generations = Runner(model, batch_size, max_new_tokens, stack=stack).run_conditions(
        [p["question"] for p in problems], conditions, progress, checkpoints, "mean")
    return [g.prediction for g in generations]


def mean_patching(model: CODIModel, problems: Sequence[dict], thoughts: np.ndarray, baseline: np.ndarray,
                  synthetic: bool, batch_size: int = 16, max_new_tokens: int = 256, n_boot: int = 200, seed: int = 0,
                  max_steps: int = 7, min_share: float = MIN_SHARE, stack: int = 1) -> pd.DataFrame:
    """`mean_patches`, `mean_outcomes` and `mean_table` in one: one row per (thought k, step s, same|different).
    thoughts: [N, 6, d], the thoughts the baseline fed (RecordThoughts.z); baseline: [N] bool, its correctness."""
    patches = mean_patches(problems, synthetic, max_steps, min_share)
    predictions = mean_outcomes(model, problems, patches, thoughts, synthetic, batch_size, max_new_tokens, stack)
    return mean_table(problems, patches, predictions, baseline, synthetic, n_boot, seed)


# ---------------------------------------------------------------- pairs


def make_pairs(model: CODIModel, problems: Sequence[dict], synthetic: bool) -> list[Pair]:
    """One corrupted twin per problem where one works: the first number of the question that can change by +1
    (else -1) with the solution recomputed, the same number of tokens and another answer."""
    pairs = []
    for i, p in enumerate(problems):
        for found in twins(p, synthetic):
            clean, corrupted = tokenize_questions(model, [p["question"], found.question])
            if len(clean) == len(corrupted) and found.answer != float(p["answer"].replace(",", "")):
                pairs.append(Pair(i, found.question, found.solution, found.answer, found.changed))
                break
    return pairs


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


@dataclass
class PairRuns:
    """The clean and the corrupted run of the pairs, which every pair patch is measured against (P pairs): the
    baseline the table reads, and what the patches and the logit-difference hook need."""

    baseline: PairBaseline
    answer_clean: np.ndarray  # [P] the clean run's answer token (0 where none)
    answer_corrupted: np.ndarray  # [P] the corrupted run's
    corrupted_logits: np.ndarray  # [P, V'] the corrupted run's logits at its answer token
    corrupted_step: np.ndarray  # [P] its answer step
    corrupted_tokens: np.ndarray  # [P, G] its generated tokens
    resid: np.ndarray  # [P, 7, L, d] the clean run's residuals (RecordResiduals)
    thoughts: np.ndarray  # [P, 6, d] the clean run's fed thoughts

    def hooks(self, patch: PairPatch) -> list[Hook]:
        """The patch's hooks on the corrupted run."""
        if patch.layer == "z":
            return [FeedThoughts(self.thoughts, thoughts=[patch.thought])]
        return [PatchResidual(self.resid, patch.thought, int(patch.layer))]

    def shift(self) -> AnswerShift:
        """A hook that records a condition's logit difference at the corrupted run's answer token."""
        return AnswerShift(self.corrupted_logits, self.corrupted_step, self.corrupted_tokens, self.answer_clean,
                           self.answer_corrupted)


def pair_runs(model: CODIModel, problems: Sequence[dict], pairs: Sequence[Pair], batch_size: int = 16,
              max_new_tokens: int = 256) -> PairRuns:
    """Run the clean questions of the pairs (recording residuals and thoughts) and their corrupted twins."""
    runner, numbers = Runner(model, batch_size, max_new_tokens), number_tokens(model)
    questions = {"clean": [problems[p.index]["question"] for p in pairs], "corrupted": [p.question for p in pairs]}
    runs = {}
    for name, qs in questions.items():
        hooks = [AnswerLogits(len(qs), numbers=numbers), RecordThoughts(len(qs))]
        if name == "clean":
            hooks.append(RecordResiduals(model, len(qs)))
        runs[name] = (runner.run(qs, hooks), *hooks)
    (gen_c, ans_c, th_c, res_c), (gen_x, ans_x, _) = runs["clean"], runs["corrupted"]
    rows = np.arange(len(pairs))
    tok_c = np.where(ans_c.step >= 0, gen_c.tokens[rows, np.maximum(ans_c.step, 0)], -1)
    tok_x = np.where(ans_x.step >= 0, gen_x.tokens[rows, np.maximum(ans_x.step, 0)], -1)
    valid = (ans_c.step >= 0) & (ans_x.step >= 0) & (tok_c != tok_x) & (tok_c >= 0) & (tok_x >= 0)
    safe_c, safe_x = np.maximum(tok_c, 0), np.maximum(tok_x, 0)
    # float64 like AnswerShift's logit_diff, so patching nothing gives exactly 0
    logits_c, logits_x = ans_c.logits.astype(np.float64), ans_x.logits.astype(np.float64)
    baseline = PairBaseline(questions["corrupted"], valid, logits_c[rows, safe_c] - logits_c[rows, safe_x],
                            logits_x[rows, safe_c] - logits_x[rows, safe_x],
                            np.array([parse_answer(t) for t in gen_c.text], dtype=float))
    return PairRuns(baseline, safe_c, safe_x, ans_x.logits, ans_x.step, gen_x.tokens, res_c.resid, th_c.z)


def pair_outcomes(model: CODIModel, runs: PairRuns, conditions: Sequence[list], batch_size: int = 16,
                  max_new_tokens: int = 256, stack: int = 1, checkpoints: Checkpoints | None = None,
                  progress: Callable[[int], None] | None = None) -> list[tuple[np.ndarray, np.ndarray]]:
    """(logit difference [P] (nan where not compared), parsed answer [P]) of each hook set of `conditions` on the
    corrupted questions, on the corrupted run's batches (patching nothing reproduces it bit for bit); nothing runs
    (nan) where no pair counts. `checkpoints` and `progress` as in `mean_outcomes`."""
    p = len(runs.baseline.valid)
    if not runs.baseline.valid.any():
        return [(np.full(p, np.nan), np.full(p, np.nan)) for _ in conditions]
    shifts = [runs.shift() for _ in conditions]
    generations = Runner(model, batch_size, max_new_tokens, stack=stack).run_conditions(
        runs.baseline.corrupted, [[*c, s] for c, s in zip(conditions, shifts)], progress, checkpoints, "pair")
    return [(s.logit_diff, g.prediction) for s, g in zip(shifts, generations)]


def pair_patching(model: CODIModel, problems: Sequence[dict], pairs: Sequence[Pair], batch_size: int = 16,
                  max_new_tokens: int = 256, n_boot: int = 200, seed: int = 0, stack: int = 1,
                  extra: Callable[[list[str]], list[tuple[str, list]]] | None = None) -> tuple[pd.DataFrame, dict]:
    """`pair_runs`, every `pair_patches` condition (`pair_outcomes`) and `pair_table` in one: recovery per
    (thought k, layer l) and for z_k (layer 'z'), and the facts (pairs, pairs that count, mean LDs).
    `extra(corrupted_questions)` may add named conditions (the tests' full and empty patches)."""
    runs = pair_runs(model, problems, pairs, batch_size, max_new_tokens)
    patches = pair_patches(model.n_layers)
    names = [(thought_name(p.thought), p.layer) for p in patches]
    conditions = [runs.hooks(p) for p in patches]
    for name, hooks in (extra(runs.baseline.corrupted) if extra else []):
        names.append((name, ""))
        conditions.append(hooks)
    outcomes = pair_outcomes(model, runs, conditions, batch_size, max_new_tokens, stack)
    return pair_table(names, outcomes, runs.baseline, n_boot, seed), runs.baseline.facts()
