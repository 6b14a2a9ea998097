"""The causal head analysis (codi_attn.heads) run on the model: the baseline every ablation is measured against,
the exact single-head scan, attribution patching (one backward per batch), the held-out sets ablated on half B,
and the flow's attribute_heads step.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch

from codi_attn.ablation import AblateHeads, HeadInputs, HeadMeans, check_heads
from codi_attn.answers import correctness
from codi_attn.checkpoints import Checkpoints, remembered
from codi_attn.conventions import ABLATIONS, POSITIONS, Head, head_label
from codi_attn.heads import (N_RANDOM_SETS, HeadScan, HeldOut, HeldOutPart, HeldOutPlan, join_held_out,
                             plan_held_out, problem_texts)
from codi_attn.hooks import AnswerLogits, AnswerShift, swap_partners
from codi_attn.model import CODIModel
from codi_attn.runner import Hook, PaddedBatch, Point, Runner, number_tokens


# ---------------------------------------------------------------- the baseline every condition is measured against


@dataclass
class Baseline:
    """One run of the unablated model on the scan's problems, and what the ablations need from it."""

    correct: np.ndarray  # [N] bool
    prediction: np.ndarray  # [N] float64
    tokens: np.ndarray  # [N, G] generated ids
    answer_logits: np.ndarray  # [N, V'] at the answer token (nan where none)
    answer_step: np.ndarray  # [N] decode step where the answer's number starts, -1: none
    answer: np.ndarray  # [N] the token generated there
    runner_up: np.ndarray  # [N] the second most likely token there
    logit_diff: np.ndarray  # [N] logit(answer) - logit(runner_up), nan where no step
    means: dict[str, np.ndarray] = field(default_factory=dict)  # positions -> HeadMeans.means
    inputs: np.ndarray | None = None  # [N, 6, L, H, d_head] head inputs at the thoughts (resample)
    partners: np.ndarray | None = None  # [N] swap partners (resample sources)

    def shift_hook(self) -> AnswerShift:
        return AnswerShift(self.answer_logits, self.answer_step, self.tokens, self.answer, self.runner_up)


def run_baseline(runner: Runner, questions: Sequence[str], golds: Sequence[str], solutions: Sequence[str],
                 kinds: Sequence[str], positions: Sequence[str]) -> Baseline:
    """The baseline run, recording the head means (per kind and positions needed) and the head inputs."""
    model, n = runner.model, len(questions)
    answer = AnswerLogits(n, numbers=number_tokens(model))
    means = {p: HeadMeans(model, p) for p in positions if "mean" in kinds}
    inputs = HeadInputs(model, n) if "resample" in kinds else None
    generation = runner.run(questions, [answer, *means.values(), *([inputs] if inputs else [])])
    logits = np.nan_to_num(answer.logits, nan=-np.inf)
    top2 = np.argsort(-logits, axis=-1)[:, :2]
    rows = np.flatnonzero(answer.step >= 0)
    diff = np.full(n, np.nan)
    diff[rows] = logits[rows, top2[rows, 0]] - logits[rows, top2[rows, 1]]
    return Baseline(correctness(generation.prediction, golds), generation.prediction, generation.tokens,
                    answer.logits, answer.step, top2[:, 0], top2[:, 1], diff,
                    {p: m.means for p, m in means.items()}, None if inputs is None else inputs.inputs,
                    swap_partners(solutions) if "resample" in kinds else None)


def ablation(model: CODIModel, base: Baseline, heads: Sequence[Head], kind: str, positions: str) -> AblateHeads:
    """The AblateHeads hook of `kind` at `positions`, with the baseline's means or inputs."""
    means = None
    if kind == "mean":
        means = base.means["thoughts" if positions == "thoughts" else "all"]
    return AblateHeads(model, heads, kind, positions, means=means, inputs=base.inputs, partners=base.partners)


# ---------------------------------------------------------------- the exact scan


def all_heads(model: CODIModel) -> list[Head]:
    return [(layer, head) for layer in range(model.n_layers) for head in range(model.n_heads)]


def scan_heads(model: CODIModel, questions: Sequence[str], golds: Sequence[str], solutions: Sequence[str],
               heads: Sequence[Head] | None = None, kinds: Sequence[str] = ("mean",),
               positions: Sequence[str] = ("thoughts",), batch_size: int = 16, max_new_tokens: int = 256,
               progress: Callable[[int], None] | None = None, stack: int = 1,
               checkpoints: Checkpoints | None = None) -> HeadScan:
    """Ablate each of `heads` (default: every head) alone, once per kind and positions, on `questions`; `stack`
    conditions run together in one forward (codi_attn.runner.Runner); with `checkpoints`, the baseline and every
    finished batch are saved as they come and read back on a rerun."""
    heads = list(all_heads(model) if heads is None else heads)
    check_heads(model, heads)
    for kind in kinds:
        if kind not in ABLATIONS:
            raise ValueError(f"ablation kinds are {ABLATIONS}, got {kind!r}")
    for where in positions:
        if where not in POSITIONS:
            raise ValueError(f"positions must be among {POSITIONS}, got {where!r}")
    if "resample" in kinds and len(questions) < 2:
        raise ValueError("resample ablation needs two problems or more")
    runner = Runner(model, batch_size, max_new_tokens, stack=stack)
    base = remembered(checkpoints, "baseline", lambda: run_baseline(runner, questions, golds, solutions, kinds,
                                                                     positions))
    conds = [(h, k, p) for h in heads for k in kinds for p in positions if not (k == "resample" and p == "all")]
    shifts = [base.shift_hook() for _ in conds]
    generations = runner.run_conditions(
        questions, [[ablation(model, base, [h], k, p), shift] for (h, k, p), shift in zip(conds, shifts)], progress,
        checkpoints)
    return HeadScan(
        heads=[h for h, _, _ in conds], kinds=[k for _, k, _ in conds], positions=[p for _, _, p in conds],
        base_correct=base.correct, base_prediction=base.prediction, base_logit_diff=base.logit_diff,
        correct=np.array([correctness(g.prediction, golds) for g in generations]).reshape(len(conds), -1),
        prediction=np.array([g.prediction for g in generations]).reshape(len(conds), -1),
        kl=np.array([s.kl for s in shifts], np.float32).reshape(len(conds), -1),
        logit_diff=np.array([s.logit_diff for s in shifts], np.float32).reshape(len(conds), -1),
        settings={"n_problems": len(questions), "batch_size": batch_size, "max_new_tokens": max_new_tokens,
                  "model": model.name, "n_layers": model.n_layers, "n_heads": model.n_heads})


# ---------------------------------------------------------------- attribution patching


class HeadGradients(Hook):
    """Attribution patching on a gradients=True runner: the logit difference at each problem's answer step is
    differentiated with respect to every head input at the thoughts at once (one backward per batch, in `flush`;
    the total derivative at each site, through every later path, as attribution patching takes it), and
    `estimate[kind]` [N, L, H] accumulates sum_k (a'_k - a_k) . gradient_k, the first-order change of the logit
    difference when the head's input is replaced by a' (mean, zero, resample). Like every attribution estimate it
    leaves out that ablating a head at all six thoughts also changes its own later inputs."""

    recorded = ("estimate",)  # a dict per kind: snapshot and restore below

    def __init__(self, model: CODIModel, base: Baseline, kinds: Sequence[str]):
        self.model, self.base, self.kinds = model, base, tuple(kinds)
        self.points = ("thought.*.head_in.*", "decode.*.logits", "decode.*.token")
        n = len(base.correct)
        self.estimate = {k: np.zeros((n, model.n_layers, model.n_heads), np.float64) for k in self.kinds}
        self._leaves: dict[tuple[int, int], torch.Tensor] = {}
        self._values: dict[tuple[int, int], torch.Tensor] = {}
        self._metric: list[torch.Tensor] = []

    def __call__(self, value: torch.Tensor, point: Point, batch: PaddedBatch) -> torch.Tensor | None:
        if point.kind == "head_in":  # value + a zero leaf: the leaf's gradient is the total derivative at this
            # site (every path to the metric, later thoughts included), and value keeps its own history
            leaf = torch.zeros_like(value, requires_grad=True)
            self._leaves[point.thought, point.layer] = leaf
            self._values[point.thought, point.layer] = value.detach()
            return value + leaf
        if point.kind == "token":  # the baseline's own tokens: the context of its answer step, whatever rounding does
            width = self.base.tokens.shape[1]
            forced = self.base.tokens[batch.rows, point.step] if point.step < width else np.full(len(batch), -1)
            forced = torch.as_tensor(forced, device=value.device)
            return torch.where(forced >= 0, forced, value)
        at = np.flatnonzero(self.base.answer_step[batch.rows] == point.step)
        if len(at):
            rows = torch.as_tensor(at, device=value.device)
            answer = torch.as_tensor(self.base.answer[batch.rows[at]], device=value.device)
            runner_up = torch.as_tensor(self.base.runner_up[batch.rows[at]], device=value.device)
            self._metric.append((value[rows, answer] - value[rows, runner_up]).sum())
        return None

    def flush(self, batch: PaddedBatch) -> None:
        if self._metric:
            keys = sorted(self._leaves)
            grads = torch.autograd.grad(torch.stack(self._metric).sum(), [self._leaves[key] for key in keys],
                                        allow_unused=True)
            for (k, layer), grad in zip(keys, grads):
                if grad is None:
                    continue
                a = self._values[k, layer]  # [B, H, d_head]
                for kind in self.kinds:
                    delta = self._replacement(kind, k, layer, batch, a) - a
                    self.estimate[kind][batch.rows, layer] += (delta * grad).sum(-1).double().cpu().numpy()
        self._leaves, self._values, self._metric = {}, {}, []

    def snapshot(self, rows: Sequence[int]) -> dict[str, dict[str, np.ndarray]]:
        """The estimates of one finished batch's problems, per kind."""
        return {"estimate": {kind: e[rows] for kind, e in self.estimate.items()}}

    def restore(self, rows: Sequence[int], saved: dict[str, dict[str, np.ndarray]]) -> None:
        for kind, e in saved["estimate"].items():
            self.estimate[kind][rows] = e

    def _replacement(self, kind: str, k: int, layer: int, batch: PaddedBatch, a: torch.Tensor) -> torch.Tensor:
        if kind == "zero":
            return torch.zeros_like(a)
        if kind == "mean":
            return torch.as_tensor(self.base.means["thoughts"][k - 1, layer], dtype=a.dtype, device=a.device)
        source = self.base.partners[batch.rows]
        return torch.as_tensor(self.base.inputs[source, k - 1, layer], dtype=a.dtype, device=a.device)


def attribution(model: CODIModel, questions: Sequence[str], base: Baseline, kinds: Sequence[str] = ("mean",),
                batch_size: int = 16, checkpoints: Checkpoints | None = None,
                progress: Callable[[int], None] | None = None) -> pd.DataFrame:
    """Attribution-patching estimate of every head's effect at the thoughts: one row per head and kind with the
    mean estimated change of the answer's logit difference (`estimate`) over the problems with an answer step.

    `model` must have PyTorch's linear layers (load_codi(..., prepack=False)); decoding runs up to the last answer
    step only; with `checkpoints`, every finished batch's estimates are saved and read back; `progress(k)` after
    each batch of k problems."""
    budget = int(base.answer_step.max()) + 1 if (base.answer_step >= 0).any() else 0
    if not budget:
        raise ValueError("no problem has an answer step (a number in its decoded answer): nothing to attribute")
    hook = HeadGradients(model, base, kinds)
    with frozen(model):  # the graph starts at the head inputs: no weight gradients, no activations kept for them
        Runner(model, batch_size, budget, gradients=True).run(questions, [hook], progress, checkpoints,
                                                              name="attribution")
    has = base.answer_step >= 0
    rows = []
    for kind in kinds:
        mean = hook.estimate[kind][has].mean(0)
        for layer, head in all_heads(model):
            rows.append({"layer": layer, "head": head, "label": head_label(layer, head), "kind": kind,
                         "estimate": float(mean[layer, head])})
    return pd.DataFrame(rows)


@contextmanager
def frozen(model: CODIModel) -> Iterator[None]:
    """The model's parameters with requires_grad off for a while (restored after)."""
    params = [p for p in (*model.lm.parameters(), *model.prj.parameters()) if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


# ---------------------------------------------------------------- held out


def held_out_part(model: CODIModel, questions: Sequence[str], golds: Sequence[str], solutions: Sequence[str],
                  plan: HeldOutPlan, indices: Sequence[int], batch_size: int = 16, max_new_tokens: int = 256,
                  stack: int = 1, checkpoints: Checkpoints | None = None,
                  progress: Callable[[int], None] | None = None) -> HeldOutPart:
    """Ablate the plan's sets `indices` on half B, against a baseline run on B; with `checkpoints`, the baseline
    and every finished batch are saved as they come and read back; `progress(k)` after each batch of k problems
    of B through every set."""
    qs, gs, ss = ([x[i] for i in plan.problems_b] for x in (questions, golds, solutions))
    runner = Runner(model, batch_size, max_new_tokens, stack=stack)
    base = remembered(checkpoints, "held-out-baseline", lambda: run_baseline(runner, qs, gs, ss, (plan.kind,),
                                                                             (plan.positions,)))
    shifts = [base.shift_hook() for _ in indices]
    generations = runner.run_conditions(
        qs, [[ablation(model, base, list(plan.sets[i][2]), plan.kind, plan.positions), shift]
             for i, shift in zip(indices, shifts)], progress, checkpoints, name="held-out")
    n = len(qs)
    return HeldOutPart(list(indices), [plan.sets[i][2] for i in indices], base.correct, base.prediction,
                       base.logit_diff,
                       np.array([g.prediction for g in generations]).reshape(len(indices), n),
                       np.array([s.logit_diff for s in shifts]).reshape(len(indices), n))


def held_out(model: CODIModel, questions: Sequence[str], golds: Sequence[str], solutions: Sequence[str],
             scan: HeadScan, attention: np.ndarray, kind: str = "mean", positions: str = "thoughts",
             k: int | None = None, n_random: int = N_RANDOM_SETS, seed: int = 0, n_boot: int = 1000,
             batch_size: int = 16, max_new_tokens: int = 256, stack: int = 1,
             checkpoints: Checkpoints | None = None) -> HeldOut:
    """The whole held-out test in one process: `plan_held_out`, one `held_out_part` of every set, the join."""
    plan = plan_held_out(scan, attention, kind, positions, k, n_random, seed)
    part = held_out_part(model, questions, golds, solutions, plan, range(len(plan.sets)), batch_size,
                         max_new_tokens, stack, checkpoints)
    return join_held_out(plan, [part], golds, n_boot, seed)


# ---------------------------------------------------------------- the flow's attribute_heads step


def plan_scan(model: CODIModel, problems: Sequence[dict], kinds: Sequence[str], positions: Sequence[str],
              scan: tuple[str, int | None], group_size: int, batch_size: int = 16, max_new_tokens: int = 256,
              checkpoints: Checkpoints | None = None, progress: Callable[[int], None] | None = None
              ) -> tuple[pd.DataFrame, list[list[Head]]]:
    """The attribute_heads step: attribution estimates of every head (at the thoughts, for each kind), and the
    heads the exact scan ablates, in groups of group_size: all of them, or for scan = ("top", M) the M with the
    most harmful estimate under the first kind. `model` needs PyTorch's linear layers; with `checkpoints`, the
    baseline and every finished batch of the attribution are saved as they come and read back; `progress(k)` after
    each batch of k problems of the attribution."""
    questions, golds, solutions = problem_texts(problems)
    base = remembered(checkpoints, "baseline", lambda: run_baseline(Runner(model, batch_size, max_new_tokens),
                                                                    questions, golds, solutions, kinds, ("thoughts",)))
    estimates = attribution(model, questions, base, kinds, batch_size, checkpoints, progress)
    heads = all_heads(model)
    if scan[0] == "top":
        first = estimates[estimates["kind"] == kinds[0]].sort_values(["estimate", "label"], kind="stable")
        heads = [(int(r.layer), int(r.head)) for r in first.head(scan[1]).itertuples()]
    return estimates, [heads[i: i + group_size] for i in range(0, len(heads), group_size)]
