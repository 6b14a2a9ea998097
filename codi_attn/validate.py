"""Causal validation of a head ranking: ablate heads and block thoughts during CODI inference, against controls.

Every condition runs on the same problems as a baseline run of those problems (codi-spec trap 6):
    baseline          plain inference (with the attention capture and the thoughts recorded)
    no-op             the intervention code path with nothing ablated (`AblateHeads` with no heads) and the same
                      recording; must equal the baseline bit for bit (`ValidationResult.noop_identical`)
    top-k             the k best heads by composite, ablated together
    top-k single      each of them alone
    random control    n_random draws of k heads from the same layers as the top-k (same layer multiset), none
                      of them a top-k head; a layer without enough other heads lends from its nearest layers
    blocking          each thought z1..z6 blocked (later queries give its key exactly zero weight), and all six
    latent swap       each problem fed the six thoughts of its swap partner (codi_attn.hooks.swap_partners: another
                      problem with the same number of solution steps): do the thoughts carry problem-specific
                      content, or does any thought-shaped input do? (needs two problems or more)
Each condition (a `Condition`: data, planned once by `plan_validation`) makes its hooks on the runner
(codi_attn.runner); `validate_group` runs the baseline first (it records the head means and the answer steps the
others need), then a group of conditions batch by batch on one shared prefill per batch (`stack` conditions in one
forward, the no-op alone). The baseline is deterministic, so groups run as separate tasks (the flow's
validate_conditions) and `join_validation` puts them together into exactly what one run of every condition gives
(`run_validation`). Ablation (`ablation="mean"`, the default, "zero" or "resample") replaces each head's slice of
the output-projection input (codi_attn.ablation) at the six thought steps (`positions="thoughts"`, default) or at
every position ("all"). Mean ablation uses the head's mean input over the same problems, per thought on
"thoughts"; resample ablation uses the head's input on the problem's swap partner.

Measures per condition: accuracy with a 95 % percentile bootstrap interval over problems; accuracy change
vs baseline with a paired bootstrap interval (the same resamples for every condition); the fraction of
problems whose parsed answer changed; the mean KL(baseline || condition) of the answer token's distribution:
the softmax over the logits (EOT excluded, as in decoding) at the step where the baseline generated the
first token of its answer's number (its first token with a digit, or a bare minus sign; not compared where
it generated none), over the problems whose condition run generated the same tokens up to there
(`kl_compared`, the share of problems compared): the same context, so the KL measures the intervention
alone. CODI answers start with a fixed "The answer is:", whose first token no intervention moves; the number
token is where they differ.

Logit lens: each thought's final-norm last-layer hidden state (`thought.{k}.hidden`) through the LM head; per
thought, how often its top token is a number, an intermediate result of the gold solution (`<<a*b=c>>` values c)
or the final answer.
"""
from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch

from codi_attn.ablation import AblateHeads, HeadInputs, HeadMeans
from codi_attn.answers import parse_gold
from codi_attn.checkpoints import Checkpoints, remembered
from codi_attn.conventions import ABLATIONS, N_THOUGHTS, POSITIONS, THOUGHTS, Head, head_label, thought_name
from codi_attn.extract import CaptureAttention, correctness
from codi_attn.hooks import AnswerLogits, BlockThoughts, FeedThoughts, RecordThoughts, swap_partners
from codi_attn.model import CODIModel
from codi_attn.runner import Generation, Runner, number_tokens

GROUPS = ("baseline", "no-op", "top-k", "top-k single", "random control", "blocking", "latent swap")
CI_LEVEL = 0.95
K_SHARE = 4  # k is capped at a quarter of the heads: with half, the only control is the other half
LENS_TOP_N = 5  # tokens per thought checked for intermediate results
COLUMNS = ("condition", "group", "heads", "blocked", "accuracy", "ci_low", "ci_high", "delta_accuracy",
           "delta_ci_low", "delta_ci_high", "answers_changed", "kl_answer_token", "kl_compared")
INTERMEDIATE = re.compile(r"<<[^<>]*=([^<>=]+)>>")
NUMBER_TOKEN = re.compile(r"-?\d+(\.\d+)?")


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


@dataclass
class ValidationResult:
    """Outcome of `run_validation`; picklable (a Metaflow artifact)."""

    validation: pd.DataFrame  # one row per condition, COLUMNS
    logit_lens: pd.DataFrame  # one row per thought, see `logit_lens`
    noop_identical: bool  # the no-op control reproduced the baseline bit for bit
    settings: dict  # k, n_random, ablation, positions, n_problems, seed, n_boot, model facts
    notes: list[str] = field(default_factory=list)  # deviations from the design (k capped, layers borrowed)

    def group(self, name: str) -> pd.DataFrame:
        """Rows of one group, e.g. result.group('random control')."""
        return self.validation[self.validation["group"] == name]


# ---------------------------------------------------------------- conditions


def top_heads(ranked_heads: pd.DataFrame, k: int) -> list[Head]:
    """The k best (layer, head) by composite (stable for ties)."""
    missing = {"layer", "head", "composite"} - set(ranked_heads.columns)
    if missing:
        raise ValueError(f"ranked_heads lacks columns {sorted(missing)}")
    best = ranked_heads.sort_values("composite", ascending=False, kind="stable").head(k)
    return [(int(r.layer), int(r.head)) for r in best.itertuples()]


def random_controls(top: list[Head], n_layers: int, n_heads: int, n_draws: int,
                    rng: np.random.Generator) -> tuple[list[list[Head]], bool]:
    """n_draws sets of len(top) heads, none in `top`, with the layer multiset of `top`.

    A layer with too few other heads takes the shortfall from its nearest layers (lower first on ties);
    the flag says whether every draw matched the layers exactly.
    """
    excluded = set(top)
    need = Counter(layer for layer, _ in top)
    draws, matched = [], True
    for _ in range(n_draws):
        chosen: list[Head] = []
        for layer, count in sorted(need.items()):
            for source in sorted(range(n_layers), key=lambda other: (abs(other - layer), other)):
                pool = [(source, h) for h in range(n_heads) if (source, h) not in excluded | set(chosen)]
                take = rng.choice(len(pool), size=min(count, len(pool)), replace=False)
                chosen += [pool[i] for i in take]
                count -= len(take)
                if not count:
                    break
                matched = False  # the rest comes from another layer
        draws.append(sorted(chosen))
    return draws, matched


@dataclass(frozen=True)
class Condition:
    """One experiment, as data (picklable: the flow hands groups of them to its validation tasks): heads ablated
    (the ablation groups), blocked thoughts (blocking) or the swap (latent swap); `hooks` makes its runner hooks."""

    name: str
    group: str
    heads: tuple[Head, ...] = ()
    blocked: tuple[int, ...] = ()

    def hooks(self, ablate: Callable[[Sequence[Head]], object], swapped: np.ndarray | None) -> tuple:
        """Its hooks: `ablate(heads)` makes an ablation hook (no heads: the no-op); `swapped` [N, 6, d] are the
        thoughts each problem is fed in the latent swap."""
        if self.group == "blocking":
            return (BlockThoughts(self.blocked),)
        if self.group == "latent swap":
            return (FeedThoughts(swapped),)
        return (ablate(self.heads),)


def conditions(top: list[Head], controls: list[list[Head]], swap: bool) -> list[Condition]:
    """The interventions in table order, no-op first; the latent swap last where `swap`."""
    k = len(top)
    out = [Condition("no-op", "no-op"), Condition(f"top-{k}", "top-k", tuple(top))]
    out += [Condition(head_label(*h), "top-k single", (h,)) for h in top]
    out += [Condition(f"random {d + 1}", "random control", tuple(c)) for d, c in enumerate(controls)]
    out += [Condition(f"block {thought_name(j)}", "blocking", blocked=(j,)) for j in THOUGHTS]
    out.append(Condition("block all", "blocking", blocked=THOUGHTS))
    if swap:
        out.append(Condition("swap thoughts", "latent swap"))
    return out


# ---------------------------------------------------------------- measures


def resample_indices(n: int, n_boot: int, seed: int) -> np.ndarray:
    """[n_boot, n] bootstrap indices of problems (shared by every condition: paired differences)."""
    return np.random.default_rng(seed).integers(0, n, size=(n_boot, n))


def bootstrap_interval(values: np.ndarray, idx: np.ndarray) -> tuple[float, float]:
    """95 % percentile interval of the mean of per-problem `values` [N] over resamples idx [n_boot, N]."""
    if not len(idx):
        return math.nan, math.nan
    q = 100 * (1 - CI_LEVEL) / 2
    lo, hi = np.percentile(values[idx].mean(1), [q, 100 - q])
    return float(lo), float(hi)


def drawn_interval(values: np.ndarray, n_boot: int, rng: np.random.Generator) -> tuple[float, float]:
    """bootstrap_interval of the mean of `values` [N] over n_boot resamples drawn from `rng` (nan, nan for N = 0)."""
    if not len(values):
        return math.nan, math.nan
    return bootstrap_interval(values, rng.integers(0, len(values), (n_boot, len(values))))


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


def answers_changed(base: np.ndarray, pred: np.ndarray) -> np.ndarray:
    """Per problem: the parsed answer differs from the baseline's (no answer = nan equals nan)."""
    same = (base == pred) | (np.isnan(base) & np.isnan(pred))
    return ~same


def measure(cond: Condition, ex: Outcome, base: Outcome, idx: np.ndarray) -> dict:
    """One row of the validation table."""
    correct = ex.correct.astype(float)
    delta = correct - base.correct.astype(float)
    (lo, hi), (delta_lo, delta_hi) = bootstrap_interval(correct, idx), bootstrap_interval(delta, idx)
    kl = answer_token_kl(base, ex)
    compared = ~np.isnan(kl)
    return {
        "condition": cond.name, "group": cond.group,
        "heads": " ".join(head_label(*h) for h in cond.heads), "blocked": " ".join(thought_name(j) for j in cond.blocked),
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


def intermediate_results(solution: str) -> set[float]:
    """Values c of the `<<expression=c>>` steps of a GSM8K solution (commas removed; unparsable skipped)."""
    out = set()
    for value in INTERMEDIATE.findall(solution):
        try:
            out.add(float(value.replace(",", "").strip()))
        except ValueError:
            continue
    return out


def token_number(text: str) -> float | None:
    """The number a decoded token spells (surrounding spaces and commas ignored), else None."""
    text = text.strip().replace(",", "")
    return float(text) if NUMBER_TOKEN.fullmatch(text) else None


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


@dataclass
class ValidationPlan:
    """The conditions of a validation and how they were chosen; picklable (the flow plans once, then runs groups of
    conditions as parallel tasks: `groups`)."""

    conditions: list[Condition]
    settings: dict  # k, k_requested, n_random, n_problems, seed
    notes: list[str] = field(default_factory=list)

    def groups(self, size: int) -> list[list[Condition]]:
        """The conditions in groups of `size`, in table order."""
        return [self.conditions[i: i + size] for i in range(0, len(self.conditions), size)]


def plan_validation(ranked_heads: pd.DataFrame, n_layers: int, n_heads: int, n_problems: int, k: int = 10,
                    n_random: int = 5, seed: int = 0) -> ValidationPlan:
    """The conditions: the top-k heads of `ranked_heads` (columns layer, head, composite), k capped at a quarter of
    the model's heads (noted), so that other heads are left for the random controls (matched by layer, so where the
    top heads crowd one layer the draws can still coincide: the card says so), n_random same-layer controls, the
    blocking, and the latent swap where there are two problems or more."""
    if k < 1 or n_random < 1:
        raise ValueError(f"k and n_random must be positive, got {k}, {n_random}")
    notes = []
    n_total = n_layers * n_heads
    k_used = min(k, max(1, n_total // K_SHARE))
    if k_used < k:
        notes.append(f"k capped at {k_used} (a quarter of the model's {n_total} heads) so that other heads are left "
                     "for the random controls")
    top = top_heads(ranked_heads, k_used)
    controls, matched = random_controls(top, n_layers, n_heads, n_random, np.random.default_rng(seed))
    if not matched:
        notes.append("some random controls borrow heads from neighbouring layers: a top-k layer has too few "
                     "other heads")
    if n_problems < 2:
        notes.append("no latent swap: it needs two problems or more")
    return ValidationPlan(conditions(top, controls, n_problems >= 2),
                          {"k": k_used, "k_requested": k, "n_random": n_random, "n_problems": n_problems, "seed": seed},
                          notes)


@dataclass
class ValidationPart:
    """What one group of conditions gave, measured against the baseline (which every group runs alike)."""

    rows: list[dict]  # one per condition of the group, COLUMNS
    baseline: dict  # the baseline's row
    logit_lens: pd.DataFrame
    noop_identical: bool | None  # the no-op reproduced the baseline bit for bit; None: the no-op is not in the group
    settings: dict


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
    hooked = [[*c.hooks(ablate, swapped), *r] for c, r in zip(conds, recording)]
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


def join_validation(plan: ValidationPlan, parts: Sequence[ValidationPart]) -> ValidationResult:
    """The ValidationResult of a plan from its groups' parts (in plan order); ValueError where they do not make the
    plan exactly once or ran different baselines."""
    rows = [row for part in parts for row in part.rows]
    if [r["condition"] for r in rows] != [c.name for c in plan.conditions]:
        raise ValueError(f"the validation parts hold conditions {[r['condition'] for r in rows]}, the plan "
                         f"{[c.name for c in plan.conditions]}")
    first = parts[0]
    for part in parts[1:]:
        if part.baseline != first.baseline or not part.logit_lens.equals(first.logit_lens):
            raise ValueError("the validation parts ran different baselines (another model or other problems?)")
    noop = [p.noop_identical for p in parts if p.noop_identical is not None]
    settings = {"k": plan.settings["k"], "k_requested": plan.settings["k_requested"],
                "n_random": plan.settings["n_random"], **first.settings}
    return ValidationResult(pd.DataFrame([first.baseline, *rows], columns=list(COLUMNS)), first.logit_lens,
                            bool(noop and noop[0]), settings, list(plan.notes))


def run_validation(model: CODIModel, questions: Sequence[str], golds: Sequence[str], solutions: Sequence[str],
                   ranked_heads: pd.DataFrame, k: int = 10, n_random: int = 5, ablation: str = "mean",
                   positions: str = "thoughts", batch_size: int = 16, max_new_tokens: int = 256, seed: int = 0,
                   n_boot: int = 1000, progress: Callable[[int], None] | None = None, stack: int = 1
                   ) -> ValidationResult:
    """Ablate the top-k heads of `ranked_heads` (columns layer, head, composite), k random same-layer heads,
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
