"""Causal validation of a head ranking: ablate heads and block thoughts during CODI inference, against controls.

Every condition runs on the same problems as a baseline run of those problems (codi-spec trap 6):
    baseline          plain extraction
    no-op             the intervention code path with nothing ablated and nothing blocked; must equal the
                      baseline bit for bit (`ValidationResult.noop_identical`)
    top-k             the k best heads by composite, ablated together
    top-k single      each of them alone
    random control    n_random draws of k heads from the same layers as the top-k (same layer multiset), none
                      of them a top-k head; a layer without enough other heads lends from its nearest layers
    blocking          each thought z1..z6 blocked (later queries give its key exactly zero weight), and all six
    latent swap       each problem fed the six thoughts its neighbour in the sample computed (problem k gets those
                      of k+1, the last those of the first): do the thoughts carry problem-specific content, or
                      does any thought-shaped input do? (needs two problems or more)
Ablation (`ablation="mean"`, the default, or "zero") replaces each head's slice of the output-projection
input (codi_attn.ablation) at the six latent steps (`positions="latent"`, default) or at every position
("all"). Mean ablation uses the head's mean input over the same problems, per thought on "latent".

Measures per condition: accuracy with a 95 % percentile bootstrap interval over problems; accuracy change
vs baseline with a paired bootstrap interval (the same resamples for every condition); the fraction of
problems whose parsed answer changed; the mean KL(baseline || condition) of the answer token's distribution:
the softmax over the logits (EOT excluded, as in decoding) at the step where the baseline generated the
first token of its answer's number (its first token with a digit, or a bare minus sign; not compared where
it generated none), over the problems whose condition run generated the same tokens up to there
(`kl_compared`, the share of problems compared): the same context, so the KL measures the intervention
alone. CODI answers start with a fixed "The answer is:", whose first token no intervention moves; the number
token is where they differ.

Logit lens: each thought's final-norm last-layer hidden state (`Extraction.thought_hidden`, already after
the final norm) through the LM head; per thought, how often its top token is a number, an intermediate
result of the gold solution (`<<a*b=c>>` values c) or the final answer.
"""
from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch

from codi_attn.ablation import POSITIONS, Head, extract_ablated, head_means
from codi_attn.answers import parse_gold
from codi_attn.extract import N_LATENTS, Extraction, extract
from codi_attn.metrics import head_label, thought
from codi_attn.model import CODIModel

ABLATIONS = ("mean", "zero")
GROUPS = ("baseline", "no-op", "top-k", "top-k single", "random control", "blocking", "latent swap")
CI_LEVEL = 0.95
K_SHARE = 4  # k is capped at a quarter of the heads: with half, the only control is the other half
LENS_TOP_N = 5  # tokens per thought checked for intermediate results
COLUMNS = ("condition", "group", "heads", "blocked", "accuracy", "ci_low", "ci_high", "delta_accuracy",
           "delta_ci_low", "delta_ci_high", "answers_changed", "kl_answer_token", "kl_compared")
INTERMEDIATE = re.compile(r"<<[^<>]*=([^<>=]+)>>")
NUMBER_TOKEN = re.compile(r"-?\d+(\.\d+)?")


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
    """One experiment: heads ablated, thoughts (0-based) blocked, or each problem fed its neighbour's thoughts."""

    name: str
    group: str
    heads: tuple[Head, ...] = ()
    blocked: tuple[int, ...] = ()
    swap: bool = False


def conditions(top: list[Head], controls: list[list[Head]], swap: bool = True) -> list[Condition]:
    """The experiments in table order (baseline first, no-op second); the latent swap last when `swap`."""
    k = len(top)
    out = [Condition("baseline", "baseline"), Condition("no-op", "no-op"), Condition(f"top-{k}", "top-k", tuple(top))]
    out += [Condition(head_label(*h), "top-k single", (h,)) for h in top]
    out += [Condition(f"random {d + 1}", "random control", tuple(c)) for d, c in enumerate(controls)]
    out += [Condition(f"block {thought(j)}", "blocking", blocked=(j,)) for j in range(N_LATENTS)]
    out.append(Condition("block all", "blocking", blocked=tuple(range(N_LATENTS))))
    if swap:
        out.append(Condition("swap thoughts", "latent swap", swap=True))
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


def token_kl(base_logits: np.ndarray, logits: np.ndarray) -> np.ndarray:
    """KL(p_base || p) per problem [N] of the softmax over logits [N, V] (-inf entries allowed; nan rows give nan)."""
    log_p = torch.log_softmax(torch.as_tensor(base_logits, dtype=torch.float64), -1)
    log_q = torch.log_softmax(torch.as_tensor(logits, dtype=torch.float64), -1)
    p = log_p.exp()
    terms = torch.where(p > 0, p * (log_p - log_q), torch.zeros_like(p))
    return terms.sum(-1).clamp(min=0.0).numpy()


def answer_token_kl(base: Extraction, ex: Extraction) -> np.ndarray:
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


def measure(cond: Condition, ex: Extraction, base: Extraction, idx: np.ndarray) -> dict:
    """One row of the validation table."""
    correct = ex.correct.astype(float)
    delta = correct - base.correct.astype(float)
    (lo, hi), (delta_lo, delta_hi) = bootstrap_interval(correct, idx), bootstrap_interval(delta, idx)
    kl = answer_token_kl(base, ex)
    compared = ~np.isnan(kl)
    return {
        "condition": cond.name, "group": cond.group,
        "heads": " ".join(head_label(*h) for h in cond.heads), "blocked": " ".join(thought(j) for j in cond.blocked),
        "accuracy": float(correct.mean()), "ci_low": lo, "ci_high": hi,
        "delta_accuracy": float(delta.mean()), "delta_ci_low": delta_lo, "delta_ci_high": delta_hi,
        "answers_changed": float(answers_changed(base.prediction, ex.prediction).mean()),
        "kl_answer_token": float(np.nanmean(kl)) if compared.any() else math.nan,
        "kl_compared": float(compared.mean()),
    }


def identical(a: Extraction, b: Extraction) -> bool:
    """Bit-for-bit equal attention, logits, thoughts, generated tokens and texts."""
    arrays = ("attention", "mass", "first_logits", "answer_logits", "latents", "thought_hidden")
    return (a.text == b.text and np.array_equal(a.tokens, b.tokens) and np.array_equal(a.answer_step, b.answer_step)
            and all(np.array_equal(getattr(a, n), getattr(b, n), equal_nan=True) for n in arrays))


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
def logit_lens(model: CODIModel, extraction: Extraction, solutions: list[str], top_n: int = LENS_TOP_N,
               n_shown: int = 5) -> pd.DataFrame:
    """Per thought, its last-layer (final-norm) hidden state through the LM head, aggregated over problems.

    extraction: with thought_hidden [N, 6, d] (keep_latents=True); solutions: N GSM8K answers.
    One row per thought: top_tokens (the n_shown most frequent top-1 tokens with their share), number
    (share of problems whose top-1 token is a number), intermediate (top-1 is one of the solution's
    <<...=c>> results), intermediate_top_n (any of the top_n is), final_answer (top-1 is the gold answer).
    """
    if extraction.thought_hidden is None:
        raise ValueError("logit_lens needs thought_hidden: extract with keep_latents=True")
    n = extraction.thought_hidden.shape[0]
    if len(solutions) != n:
        raise ValueError(f"{len(solutions)} solutions for {n} problems")
    head = model.lm.get_output_embeddings()
    hidden = torch.as_tensor(extraction.thought_hidden, dtype=model.dtype, device=model.device)
    top = torch.stack([head(hidden[:, j]).float().topk(top_n, -1).indices for j in range(N_LATENTS)], 1)
    top = top.cpu().numpy()  # [N, 6, top_n]
    texts = {t: _token_text(model, t) for t in np.unique(top)}
    values = {t: token_number(s) for t, s in texts.items()}
    steps = [intermediate_results(s) for s in solutions]
    finals = [parse_gold(s) for s in solutions]
    rows = []
    for j in range(N_LATENTS):
        first = top[:, j, 0]
        counts = Counter(texts[t] for t in first)
        rows.append({
            "thought": thought(j),
            "top_tokens": ", ".join(f"{s!r} {c / n:.0%}" for s, c in counts.most_common(n_shown)),
            "number": float(np.mean([values[t] is not None for t in first])),
            "intermediate": float(np.mean([values[t] in steps[i] for i, t in enumerate(first)])),
            "intermediate_top_n": float(np.mean([any(values[t] in steps[i] for t in top[i, j]) for i in range(n)])),
            "final_answer": float(np.mean([values[t] is not None and values[t] == finals[i]
                                           for i, t in enumerate(first)])),
        })
    return pd.DataFrame(rows)


# ---------------------------------------------------------------- the experiment


def run_validation(model: CODIModel, questions: list[str], golds: list[str], ranked_heads: pd.DataFrame,
                   k: int = 10, n_random: int = 5, ablation: str = "mean", positions: str = "latent",
                   batch_size: int = 16, max_new_tokens: int = 256, seed: int = 0, n_boot: int = 1000,
                   progress: Callable[[str], None] | None = None) -> ValidationResult:
    """Ablate the top-k heads of `ranked_heads` (columns layer, head, composite), k random same-layer heads,
    block each thought and swap the thoughts between problems, on `questions` with GSM8K answers `golds`
    (full solutions for the logit lens).

    `progress(condition_name)` is called after each intervention. k is capped at a quarter of the model's heads
    (noted in `notes`), so that other heads are left for the random controls (matched by layer, so where the
    top heads crowd one layer the draws can still coincide: the card says when they do).
    """
    if ablation not in ABLATIONS:
        raise ValueError(f"ablation must be one of {ABLATIONS}, got {ablation!r}")
    if positions not in POSITIONS:
        raise ValueError(f"positions must be one of {POSITIONS}, got {positions!r}")
    if len(golds) != len(questions) or not questions:
        raise ValueError(f"need one gold per question and at least one question ({len(questions)}, {len(golds)})")
    if k < 1 or n_random < 1:
        raise ValueError(f"k and n_random must be positive, got {k}, {n_random}")
    notes = []
    n_total = model.n_layers * model.n_heads
    k_used = min(k, max(1, n_total // K_SHARE))
    if k_used < k:
        notes.append(f"k capped at {k_used} (a quarter of the model's {n_total} heads) so that other heads are left "
                     "for the random controls")
    top = top_heads(ranked_heads, k_used)
    controls, matched = random_controls(top, model.n_layers, model.n_heads, n_random, np.random.default_rng(seed))
    if not matched:
        notes.append("some random controls borrow heads from neighbouring layers: a top-k layer has too few "
                     "other heads")
    means = head_means(model, questions, positions, batch_size, max_new_tokens) if ablation == "mean" else None

    run_kwargs = dict(golds=golds, batch_size=batch_size, max_new_tokens=max_new_tokens, keep_logits=True)
    idx = resample_indices(len(questions), n_boot, seed)
    if len(questions) < 2:
        notes.append("no latent swap: it needs two problems or more")
    base_cond, noop_cond, *others = conditions(top, controls, swap=len(questions) >= 2)
    base = extract(model, questions, keep_latents=True, **run_kwargs)
    run_kwargs["answer_steps"] = base.answer_step  # every condition's logits at the baseline's answer token
    noop = extract_ablated(model, questions, (), means, positions, keep_latents=True, **run_kwargs)
    rows = [measure(base_cond, base, base, idx), measure(noop_cond, noop, base, idx)]
    for cond in others:
        fed = np.roll(base.latents, -1, axis=0) if cond.swap else None  # problem k gets the thoughts of k+1
        ex = extract_ablated(model, questions, cond.heads, means, positions, blocked_latents=cond.blocked,
                             fed_latents=fed, **run_kwargs)
        rows.append(measure(cond, ex, base, idx))
        if progress is not None:
            progress(cond.name)
    settings = {"k": k_used, "k_requested": k, "n_random": n_random, "ablation": ablation, "positions": positions,
                "n_problems": len(questions), "seed": seed, "n_boot": n_boot, "max_new_tokens": max_new_tokens,
                "model": model.name, "n_layers": model.n_layers, "n_heads": model.n_heads,
                "dtype": str(model.dtype).replace("torch.", ""), "device": str(model.device)}
    return ValidationResult(pd.DataFrame(rows, columns=list(COLUMNS)), logit_lens(model, base, golds),
                            identical(base, noop), settings, notes)
