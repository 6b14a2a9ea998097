"""Causal validation of a head ranking: ablate heads and block thoughts during CODI inference, against controls.

Every condition runs on the same problems as a baseline run of those problems (codi-spec trap 6):
    baseline          plain inference (with the attention capture and the thoughts recorded)
    no-op             the intervention code path with nothing ablated (`AblateHeads` with no heads) and the same
                      recording; must equal the baseline bit for bit (`ValidationResult.noop_identical`)
    top-k             the k best heads by composite, ablated together
    top-k single      each of them alone
    random control    n_random distinct sets of k heads, none of them a top-k head (`random_head_sets`): with the
                      top-k's layer multiset where those layers leave enough distinct sets, else from all layers
    blocking          each thought z1..z6 blocked (later queries give its key exactly zero weight), and all six
    latent swap       each problem fed the six thoughts of its swap partner (codi_attn.hooks.swap_partners: another
                      problem with the same number of solution steps): do the thoughts carry problem-specific
                      content, or does any thought-shaped input do? (needs two problems or more)
This module plans and joins (numpy, no model); codi_attn.validate_run runs on the model. Each condition (a
`Condition`: data, planned once by `plan_validation`) makes its hooks on the runner (codi_attn.runner);
`validate_group` runs the baseline first (it records the head means and the answer steps the others need), then a
group of conditions batch by batch on one shared prefill per batch (`stack` conditions in one forward, the no-op
alone). The baseline is deterministic, so groups run as separate tasks (the flow's
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
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from codi_attn.conventions import THOUGHTS, Head, head_label, thought_name

GROUPS = ("baseline", "no-op", "top-k", "top-k single", "random control", "blocking", "latent swap")
CI_LEVEL = 0.95
K_SHARE = 4  # k is capped at a quarter of the heads: with half, the only control is the other half
LENS_TOP_N = 5  # tokens per thought checked for intermediate results
COLUMNS = ("condition", "group", "heads", "blocked", "accuracy", "ci_low", "ci_high", "delta_accuracy",
           "delta_ci_low", "delta_ci_high", "answers_changed", "kl_answer_token", "kl_compared")
INTERMEDIATE = re.compile(r"<<[^<>]*=([^<>=]+)>>")
NUMBER_TOKEN = re.compile(r"-?(0|[1-9]\d*)(\.\d*[1-9])?")  # a value written out: not "012", "00", "12.0"


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


def random_head_sets(top: Sequence[Head], n_layers: int, n_heads: int, n_sets: int, rng: np.random.Generator
                     ) -> tuple[list[tuple[Head, ...]], bool]:
    """n_sets distinct sets of len(top) heads, none in `top`: with `top`'s layer multiset where those layers have
    enough other heads for n_sets distinct layer-matched sets (the flag), otherwise drawn from all the other heads.
    Fewer sets come back only when fewer distinct ones exist at all."""
    excluded, k = set(top), len(top)
    need = Counter(layer for layer, _ in top)
    pools = {layer: [(layer, h) for h in range(n_heads) if (layer, h) not in excluded] for layer in need}
    everything = [(l, h) for l in range(n_layers) for h in range(n_heads) if (l, h) not in excluded]
    matched_sets = math.prod(math.comb(len(pools[layer]), count) for layer, count in need.items())
    matched = matched_sets >= n_sets
    possible = matched_sets if matched else math.comb(len(everything), k)
    sets: list[tuple[Head, ...]] = []
    seen = set()
    for _ in range(50 * n_sets):
        if len(sets) == min(n_sets, possible):
            break
        if matched:
            chosen = [pools[layer][i] for layer, count in sorted(need.items())
                      for i in rng.choice(len(pools[layer]), size=count, replace=False)]
        else:
            chosen = [everything[i] for i in rng.choice(len(everything), size=k, replace=False)]
        key = tuple(sorted(chosen))
        if key not in seen:
            seen.add(key)
            sets.append(key)
    return sets, matched



def controls_origin(settings: dict) -> str:
    """Where a validation's random controls came from, for its card and figure (runs before the flag: same layers)."""
    return "from the same layers" if settings.get("controls_matched", True) else "from all layers"


@dataclass(frozen=True)
class Condition:
    """One experiment, as data (picklable: the flow hands groups of them to its validation tasks): heads ablated
    (the ablation groups), blocked thoughts (blocking) or the swap (latent swap); codi_attn.validate_run's
    `condition_hooks` makes its runner hooks."""

    name: str
    group: str
    heads: tuple[Head, ...] = ()
    blocked: tuple[int, ...] = ()


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
    """95 % percentile interval of the mean of per-problem `values` [N] over resamples idx [n_boot, N]; nan without
    resamples or with fewer than 2 problems (every resample of one problem is that problem: no interval)."""
    if not len(idx) or idx.shape[1] < 2:
        return math.nan, math.nan
    q = 100 * (1 - CI_LEVEL) / 2
    lo, hi = np.percentile(values[idx].mean(1), [q, 100 - q])
    return float(lo), float(hi)


def drawn_interval(values: np.ndarray, n_boot: int, rng: np.random.Generator) -> tuple[float, float]:
    """bootstrap_interval of the mean of `values` [N] over n_boot resamples drawn from `rng` (nan, nan for N < 2)."""
    if not len(values):
        return math.nan, math.nan
    return bootstrap_interval(values, rng.integers(0, len(values), (n_boot, len(values))))


def answers_changed(base: np.ndarray, pred: np.ndarray) -> np.ndarray:
    """Per problem: the parsed answer differs from the baseline's (no answer = nan equals nan)."""
    same = (base == pred) | (np.isnan(base) & np.isnan(pred))
    return ~same


# ---------------------------------------------------------------- numbers (the logit lens reads them)


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
    """The number a decoded token spells as it is written out (surrounding spaces and commas ignored; "12", not
    "012" or "12.0": LLaMA-3's tokenizer has every three-digit string, so a looser rule gives small values two or
    three spellings to score by), else None."""
    text = text.strip().replace(",", "")
    return float(text) if NUMBER_TOKEN.fullmatch(text) else None


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
    the model's heads (noted), so that other heads are left for the random controls, n_random distinct random sets
    of k other heads (`random_head_sets`: from the top-k's layers where they leave enough distinct sets, otherwise
    from all layers; noted), the blocking, and the latent swap where there are two problems or more."""
    if k < 1 or n_random < 1:
        raise ValueError(f"k and n_random must be positive, got {k}, {n_random}")
    notes = []
    n_total = n_layers * n_heads
    k_used = min(k, max(1, n_total // K_SHARE))
    if k_used < k:
        notes.append(f"k capped at {k_used} (a quarter of the model's {n_total} heads) so that other heads are left "
                     "for the random controls")
    top = top_heads(ranked_heads, k_used)
    controls, matched = random_head_sets(top, n_layers, n_heads, n_random, np.random.default_rng(seed))
    if not matched:
        notes.append(f"the random controls come from all layers: the top-{k_used}'s layers have too few other heads "
                     f"for {n_random} distinct layer-matched sets")
    if len(controls) < n_random:
        notes.append(f"only {len(controls)} distinct random sets of {k_used} heads exist outside the top-{k_used}")
    if n_problems < 2:
        notes.append("no latent swap: it needs two problems or more")
    return ValidationPlan(conditions(top, controls, n_problems >= 2),
                          {"k": k_used, "k_requested": k, "n_random": n_random, "n_problems": n_problems, "seed": seed,
                           "controls_matched": matched},
                          notes)


@dataclass
class ValidationPart:
    """What one group of conditions gave, measured against the baseline (which every group runs alike)."""

    rows: list[dict]  # one per condition of the group, COLUMNS
    baseline: dict  # the baseline's row
    logit_lens: pd.DataFrame
    noop_identical: bool | None  # the no-op reproduced the baseline bit for bit; None: the no-op is not in the group
    settings: dict


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
                "n_random": plan.settings["n_random"], "controls_matched": plan.settings.get("controls_matched", True),
                **first.settings}
    return ValidationResult(pd.DataFrame([first.baseline, *rows], columns=list(COLUMNS)), first.logit_lens,
                            bool(noop and noop[0]), settings, list(plan.notes))


