"""The causal validation (codi_attn.validate) run on the model: the baseline and each group of conditions on one
shared prefill per batch, measured against it (accuracy, answers changed, the answer token's KL), and the logit
lens of the thoughts.
"""
from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from codi_attn.ablation import AblateHeads, HeadInputs, HeadMeans
from codi_attn.answers import correctness, parse_gold
from codi_attn.checkpoints import Checkpoints, remembered
from codi_attn.conventions import ABLATIONS, N_THOUGHTS, POSITIONS, Head, head_label, thought_name
from codi_attn.extract import CaptureAttention
from codi_attn.hooks import AnswerLogits, BlockThoughts, FeedThoughts, RecordThoughts, swap_partners
from codi_attn.model import CODIModel
from codi_attn.runner import Generation, Runner, number_tokens
from codi_attn.validate import (LENS_TOP_N, Condition, ValidationPart, ValidationResult, answers_changed,
                                bootstrap_interval, intermediate_results, join_validation, plan_validation,
                                resample_indices, token_number)


@dataclass
class Outcome:
    """What a condition's run produced for N problems (what `measure` and `identical` read)."""

    generation: Generation
    correct: np.ndarray  # [N] bool
    answer_logits: np.ndarray  # [N, V'] float32 at the answer token (nan where none)
    answer_step: np.ndarray  # [N] int, -1 where none
    attention: np.ndarray | None = None  # [N, L, H, 6, 6] (baseline and no-op only)
    mass: np.ndarray | None = None
    thoughts: np.ndarray | None = None  # [N, 6, d] fed z1..z6 (baseline and no-op only)
    hidden: np.ndarray | None = None  # [N, 6, d] final-norm hidden state at each thought

    @property
    def prediction(self) -> np.ndarray:
        return self.generation.prediction

    @property
    def tokens(self) -> np.ndarray:
        return self.generation.tokens


def condition_hooks(cond: Condition, ablate: Callable[[Sequence[Head]], object], swapped: np.ndarray | None
                    ) -> tuple:
    """A condition's hooks: `ablate(heads)` makes an ablation hook (no heads: the no-op); `swapped` [N, 6, d] are
    the thoughts each problem is fed in the latent swap."""
    if cond.group == "blocking":
        return (BlockThoughts(cond.blocked),)
    if cond.group == "latent swap":
        return (FeedThoughts(swapped),)
    return (ablate(cond.heads),)


# ---------------------------------------------------------------- measures


def token_kl(base_logits: np.ndarray, logits: np.ndarray) -> np.ndarray:
    """KL(p_base || p) per problem [N] of the softmax over logits [N, V] (-inf entries allowed; nan rows give nan)."""
    log_p = torch.log_softmax(torch.as_tensor(base_logits, dtype=torch.float64), -1)
    log_q = torch.log_softmax(torch.as_tensor(logits, dtype=torch.float64), -1)
    p = log_p.exp()
    terms = torch.where(p > 0, p * (log_p - log_q), torch.zeros_like(p))
    return terms.sum(-1).clamp(min=0.0).numpy()


def answer_token_kl(base: Outcome, ex: Outcome) -> np.ndarray:
    """KL(p_base || p) per problem [N] at the baseline's answer token (`ex` extracted with the baseline's
    answer_steps); nan where `ex` generated other tokens before it or stopped earlier (another context)."""
    kl = token_kl(base.answer_logits, ex.answer_logits)
    same = [step >= 0 and ex.answer_step[k] == step and np.array_equal(base.tokens[k, :step], ex.tokens[k, :step])
            for k, step in enumerate(base.answer_step)]
    return np.where(same, kl, np.nan)


def measure(cond: Condition, ex: Outcome, base: Outcome, idx: np.ndarray) -> dict:
    """One row of the validation table."""
    correct = ex.correct.astype(float)
    delta = correct - base.correct.astype(float)
    (lo, hi), (delta_lo, delta_hi) = bootstrap_interval(correct, idx), bootstrap_interval(delta, idx)
    kl = answer_token_kl(base, ex)
    compared = ~np.isnan(kl)
    return {
        "condition": cond.name, "group": cond.group,
        "heads": " ".join(head_label(*h) for h in cond.heads),
        "blocked": " ".join(thought_name(j) for j in cond.blocked),
        "accuracy": float(correct.mean()), "ci_low": lo, "ci_high": hi,
        "delta_accuracy": float(delta.mean()), "delta_ci_low": delta_lo, "delta_ci_high": delta_hi,
        "answers_changed": float(answers_changed(base.prediction, ex.prediction).mean()),
        "kl_answer_token": float(np.nanmean(kl)) if compared.any() else math.nan,
        "kl_compared": float(compared.mean()),
    }


def identical(a: Outcome, b: Outcome) -> bool:
    """Bit-for-bit equal attention, answer logits, thoughts, hidden states, generated tokens and texts."""
    arrays = ("attention", "mass", "answer_logits", "thoughts", "hidden", "answer_step", "tokens")
    return a.generation.text == b.generation.text and all(
        np.array_equal(getattr(a, n), getattr(b, n), equal_nan=True) for n in arrays)


# ---------------------------------------------------------------- logit lens


def _token_text(model: CODIModel, token: int) -> str:
    extra = {model.pad_id: "[PAD]", model.bot_id: "[BOT]", model.eot_id: "[EOT]"}
    return extra.get(token) or model.tokenizer.decode([token])


@torch.inference_mode()
def logit_lens(model: CODIModel, hidden: np.ndarray, solutions: Sequence[str], top_n: int = LENS_TOP_N,
               n_shown: int = 5) -> pd.DataFrame:
    """Per thought, its last-layer (final-norm) hidden state through the LM head, aggregated over problems.

    hidden: [N, 6, d] (`RecordThoughts.hidden`); solutions: N GSM8K answers.
    One row per thought: top_tokens (the n_shown most frequent top-1 tokens with their share), number
    (share of problems whose top-1 token is a number), intermediate (top-1 is one of the solution's
    <<...=c>> results), intermediate_top_n (any of the top_n is), final_answer (top-1 is the gold answer).
    """
    n = hidden.shape[0]
    if len(solutions) != n:
        raise ValueError(f"{len(solutions)} solutions for {n} problems")
    head = model.lm.get_output_embeddings()
    states = torch.as_tensor(hidden, dtype=model.dtype, device=model.device)
    top = torch.stack([head(states[:, j]).float().topk(top_n, -1).indices for j in range(N_THOUGHTS)], 1)
    top = top.cpu().numpy()  # [N, 6, top_n]
    texts = {t: _token_text(model, t) for t in np.unique(top)}
    values = {t: token_number(s) for t, s in texts.items()}
    steps = [intermediate_results(s) for s in solutions]
    finals = [parse_gold(s) for s in solutions]
    rows = []
    for j in range(N_THOUGHTS):
        first = top[:, j, 0]
        counts = Counter(texts[t] for t in first)
        rows.append({
            "thought": thought_name(j + 1),
            "top_tokens": ", ".join(f"{s!r} {c / n:.0%}" for s, c in counts.most_common(n_shown)),
            "number": float(np.mean([values[t] is not None for t in first])),
            "intermediate": float(np.mean([values[t] in steps[i] for i, t in enumerate(first)])),
            "intermediate_top_n": float(np.mean([any(values[t] in steps[i] for t in top[i, j]) for i in range(n)])),
            "final_answer": float(np.mean([values[t] is not None and values[t] == finals[i]
                                           for i, t in enumerate(first)])),
        })
    return pd.DataFrame(rows)


# ---------------------------------------------------------------- the experiment


def validate_group(model: CODIModel, questions: Sequence[str], golds: Sequence[str], solutions: Sequence[str],
                   conds: Sequence[Condition], ablation: str = "mean", positions: str = "thoughts",
                   batch_size: int = 16, max_new_tokens: int = 256, seed: int = 0, n_boot: int = 1000,
                   progress: Callable[[int], None] | None = None, stack: int = 1,
                   checkpoints: Checkpoints | None = None) -> ValidationPart:
    """The baseline run (it records the head means and answer steps the others need), then `conds` batch by batch
    on one shared prefill per batch, `stack` of them in one forward (codi_attn.runner.Runner; the no-op alone, as
    the baseline ran); each measured against the baseline. `progress(k)` after each batch of k problems has run
    through every condition; with `checkpoints`, the baseline and every finished batch are saved as they come and
    read back on a rerun."""
    if ablation not in ABLATIONS:
        raise ValueError(f"ablation must be one of {ABLATIONS}, got {ablation!r}")
    if positions not in POSITIONS:
        raise ValueError(f"positions must be one of {POSITIONS}, got {positions!r}")
    n = len(questions)
    if not questions or len(golds) != n or len(solutions) != n:
        raise ValueError(f"need at least one question and one gold answer and solution per question ({n} questions, "
                         f"{len(golds)} golds, {len(solutions)} solutions)")
    if ablation == "resample" and n < 2:
        raise ValueError("resample ablation needs two problems or more (each takes its partner's head inputs)")
    partners = swap_partners(solutions) if n >= 2 else None
    runner = Runner(model, batch_size, max_new_tokens)
    base, means, inputs = remembered(checkpoints, "baseline", lambda: _baseline(runner, questions, golds, ablation,
                                                                                 positions))

    def ablate(heads: Sequence[Head]) -> AblateHeads:
        return AblateHeads(model, heads, ablation, positions, means=means, inputs=inputs, partners=partners)

    swapped = None if partners is None else base.thoughts[partners]
    recording = [_recording(model, n, steps=base.answer_step, everything=c.group == "no-op") for c in conds]
    hooked = [[*condition_hooks(c, ablate, swapped), *r] for c, r in zip(conds, recording)]
    # the no-op alone, as the baseline ran (its bit-for-bit check must not depend on the kernels' handling of a
    # bigger batch); the others `stack` at a time
    generations: list = [None] * len(conds)
    noop_only = all(c.group == "no-op" for c in conds)
    for alone, part_runner, name in ((True, runner, "no-op-batch"),
                                     (False, Runner(model, batch_size, max_new_tokens, stack=stack), "batch")):
        picked = [i for i, c in enumerate(conds) if (c.group == "no-op") == alone]
        if picked:
            ran = part_runner.run_conditions(questions, [hooked[i] for i in picked],
                                             progress if alone == noop_only else None, checkpoints, name)
            for i, generation in zip(picked, ran):
                generations[i] = generation
    outcomes = [_outcome(g, golds, r) for g, r in zip(generations, recording)]
    idx = resample_indices(n, n_boot, seed)
    noop = [o for c, o in zip(conds, outcomes) if c.group == "no-op"]
    settings = {"ablation": ablation, "positions": positions, "n_problems": n, "seed": seed, "n_boot": n_boot,
                "max_new_tokens": max_new_tokens, "model": model.name, "n_layers": model.n_layers,
                "n_heads": model.n_heads, "dtype": str(model.dtype).replace("torch.", ""), "device": str(model.device)}
    return ValidationPart([measure(c, o, base, idx) for c, o in zip(conds, outcomes)],
                          measure(Condition("baseline", "baseline"), base, base, idx),
                          logit_lens(model, base.hidden, solutions), identical(base, noop[0]) if noop else None,
                          settings)


def run_validation(model: CODIModel, questions: Sequence[str], golds: Sequence[str], solutions: Sequence[str],
                   ranked_heads: pd.DataFrame, k: int = 10, n_random: int = 5, ablation: str = "mean",
                   positions: str = "thoughts", batch_size: int = 16, max_new_tokens: int = 256, seed: int = 0,
                   n_boot: int = 1000, progress: Callable[[int], None] | None = None, stack: int = 1
                   ) -> ValidationResult:
    """Ablate the top-k heads of `ranked_heads` (columns layer, head, composite), random sets of k other heads,
    block each thought and swap the thoughts between problems, on `questions` with gold answers `golds` and
    GSM8K solutions `solutions` (for the logit lens and the swap partners): `plan_validation`, every condition in
    one `validate_group`, `join_validation` (the flow runs groups of conditions as parallel tasks instead).

    `progress(k)` is called after each batch of k problems has run through every condition; `stack` conditions
    run together in one forward (codi_attn.runner.Runner).
    """
    plan = plan_validation(ranked_heads, model.n_layers, model.n_heads, len(questions), k, n_random, seed)
    part = validate_group(model, questions, golds, solutions, plan.conditions, ablation, positions, batch_size,
                          max_new_tokens, seed, n_boot, progress, stack)
    return join_validation(plan, [part])


def _baseline(runner: Runner, questions: Sequence[str], golds: Sequence[str], ablation: str, positions: str
              ) -> tuple[Outcome, np.ndarray | None, np.ndarray | None]:
    """The baseline Outcome, with the head means (mean ablation) or head inputs (resample) it recorded."""
    model, n = runner.model, len(questions)
    recorders = {"means": HeadMeans(model, positions)} if ablation == "mean" else {}
    if ablation == "resample":
        recorders["inputs"] = HeadInputs(model, n)
    recording = _recording(model, n, numbers=number_tokens(model))
    base = _outcome(runner.run(questions, [*recording, *recorders.values()]), golds, recording)
    return (base, recorders["means"].means if "means" in recorders else None,
            recorders["inputs"].inputs if "inputs" in recorders else None)


def _recording(model: CODIModel, n: int, numbers: torch.Tensor | None = None, steps: np.ndarray | None = None,
               everything: bool = True) -> list:
    """The hooks that record what `measure` and `identical` read: the answer-token logits (where the number
    starts, or at the baseline's steps) and, with `everything`, the attention and the thoughts."""
    hooks = [AnswerLogits(n, numbers=numbers, steps=steps)]
    if everything:
        hooks += [CaptureAttention(model, n), RecordThoughts(n)]
    return hooks


def _outcome(generation: Generation, golds: Sequence[str], recording: list) -> Outcome:
    """An Outcome from a run and its `_recording` hooks."""
    answer, *rest = recording
    capture, thoughts = rest or (None, None)
    return Outcome(generation, correctness(generation.prediction, golds), answer.logits, answer.step,
                   attention=None if capture is None else capture.attention,
                   mass=None if capture is None else capture.mass,
                   thoughts=None if thoughts is None else thoughts.z,
                   hidden=None if thoughts is None else thoughts.hidden)
