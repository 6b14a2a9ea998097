"""What each thought holds (codi_attn.contents), run on the model: one group of units (the recording run, mean
patches or pair patches) per flow task, or the whole analysis in one process.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from codi_attn.answers import correctness
from codi_attn.attended import AttendedTokens, attended_summary, question_tokens
from codi_attn.checkpoints import Checkpoints, remembered
from codi_attn.contents import (N_EXAMPLES, PARTS, Recording, ThoughtPart, ThoughtPlan, ThoughtReport, ThoughtUnit,
                                join_thoughts, plan_thoughts)
from codi_attn.conventions import Head
from codi_attn.hooks import RecordResiduals, RecordThoughts
from codi_attn.lens import lens_table
from codi_attn.model import CODIModel
from codi_attn.patching_run import make_pairs, mean_outcomes, pair_outcomes, pair_runs
from codi_attn.probes import run_probes
from codi_attn.runner import Runner, tokenize_questions


def analyse_group(model: CODIModel, problems: Sequence[dict], plan: ThoughtPlan, units: Sequence[ThoughtUnit],
                  batch_size: int = 16, max_new_tokens: int = 256, stack: int = 1,
                  checkpoints: Checkpoints | None = None, progress: Callable[[int], None] | None = None
                  ) -> ThoughtPart:
    """Run one group of units (one part) on `problems`; with `checkpoints`, the baselines and every finished batch
    are saved as they come and read back on a rerun; `progress(k)` after each batch of k problems (pairs) has run
    through every unit of the group."""
    parts = {u.part for u in units}
    if len(parts) != 1:
        raise ValueError(f"a group holds the units of one part, got {sorted(parts)}")
    part, synthetic = parts.pop(), plan.settings["synthetic"]
    facts = {"name": model.name, "n_layers": model.n_layers, "n_heads": model.n_heads}
    out = ThoughtPart(list(units), None, [], [], None, facts)
    if part == "record":
        out.recording = _record(model, problems, plan.settings["heads"], plan.settings["n_boot"],
                                plan.settings["seed"], batch_size, max_new_tokens, checkpoints, progress)
    elif part == "mean":
        runner = Runner(model, batch_size, max_new_tokens)
        thoughts = remembered(checkpoints, "thoughts", lambda: _thoughts(runner, problems))
        out.predictions = mean_outcomes(model, problems, [u.patch for u in units], thoughts, synthetic, batch_size,
                                        max_new_tokens, stack, checkpoints, progress)
        out.logit_diff = [None] * len(units)
    else:
        pairs = make_pairs(model, problems, synthetic)
        if pairs:
            runs = remembered(checkpoints, "pairs", lambda: pair_runs(model, problems, pairs, batch_size,
                                                                      max_new_tokens))
            outcomes = pair_outcomes(model, runs, [runs.hooks(u.patch) for u in units], batch_size, max_new_tokens,
                                     stack, checkpoints, progress)
            out.pair_baseline = runs.baseline
            out.logit_diff, out.predictions = [ld for ld, _ in outcomes], [p for _, p in outcomes]
    return out


def analyse_thoughts(model: CODIModel, problems: Sequence[dict], synthetic: bool, heads: Sequence[Head] = (),
                     batch_size: int = 16, max_new_tokens: int = 256, n_boot: int = 200, seed: int = 0,
                     stack: int = 1) -> ThoughtReport:
    """The whole analysis in this process: `plan_thoughts`, every part as one group, `join_thoughts`."""
    plan = plan_thoughts(problems, synthetic, model.n_layers, heads, n_boot, seed)
    parts = [analyse_group(model, problems, plan, [u for u in plan.units if u.part == part], batch_size,
                           max_new_tokens, stack) for part in PARTS if any(u.part == part for u in plan.units)]
    return join_thoughts(plan, parts, problems)


def _record(model: CODIModel, problems: Sequence[dict], heads: Sequence[Head], n_boot: int, seed: int,
            batch_size: int, max_new_tokens: int, checkpoints: Checkpoints | None,
            progress: Callable[[int], None] | None) -> Recording:
    """The recording run (attended tokens of every head and of `heads`, the residual stream) and what is read off
    it: token kinds, probes, lens, each problem's correctness."""
    questions = [p["question"] for p in problems]
    solutions = [p["solution"] for p in problems]
    n = len(problems)
    every, chosen = AttendedTokens(model, n), AttendedTokens(model, n, heads) if heads else None
    resid = RecordResiduals(model, n)
    gen = Runner(model, batch_size, max_new_tokens).run(questions, [h for h in (every, chosen, resid) if h],
                                                        progress, checkpoints, "record")
    ids = tokenize_questions(model, questions)
    tokens = [question_tokens(model, t[:-1], sol) for t, sol in zip(ids, solutions)]
    by_kind, by_step = attended_summary(every.weights, tokens)
    examples = [{"id": problems[i].get("id", str(i)), "tokens": tokens[i].text, "kinds": tokens[i].kind,
                 "operand_of": tokens[i].operand_of, "weights": every.weights[i]} for i in range(min(N_EXAMPLES, n))]
    return Recording([w.astype(np.float16) for w in every.weights], by_kind, by_step,
                     attended_summary(chosen.weights, tokens)[0] if chosen else None, examples,
                     run_probes(resid.resid, solutions, questions, n_boot=n_boot, seed=seed),
                     lens_table(model, resid.resid, solutions, seed=seed),
                     correctness(gen.prediction, [p["answer"] for p in problems]))


def _thoughts(runner: Runner, problems: Sequence[dict]) -> np.ndarray:
    """[N, 6, d] the thoughts the plain run feeds (the mean patches' baseline)."""
    thoughts = RecordThoughts(len(problems))
    runner.run([p["question"] for p in problems], [thoughts])
    return thoughts.z
