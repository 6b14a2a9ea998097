"""Small hook objects on the runner's points (codi_attn.runner): record thoughts, feed or swap them, block them,
keep the logits at the answer token, record the residual stream (for the probes and the lens). Head ablation
lives in codi_attn.ablation, attention capture in codi_attn.extract.

Recording hooks keep what a batch gives them on the device and copy it to the host once per batch (`flush`),
so that a GPU run does not wait for a copy at every layer.

The latent swap (one definition, used by the flow's validation and the demo model's evaluation): problem i is
fed the six thoughts that `swap_partners` picks for it, the next problem in the list (cyclically) with the same
number of solution steps (`<<...>>` annotations), or the next problem of the list when no other has that
number: the fed thoughts come from another problem of the same length of reasoning.
"""
from __future__ import annotations

import math
import re
from collections.abc import Sequence

import numpy as np
import torch

from codi_attn.conventions import N_THOUGHTS, THOUGHTS, check_thoughts
from codi_attn.model import CODIModel
from codi_attn.runner import Hook, PaddedBatch, Point

STEP = re.compile(r"<<[^<>]*>>")


class RecordThoughts(Hook):
    """The fed thoughts z1..z6 (`z`) and the final-norm hidden state at each thought (`hidden`), [N, 6, d] float32."""

    points = ("thought.*.z", "thought.*.hidden")
    recorded, blank = ("z", "hidden"), 0.0

    def __init__(self, n: int):
        self.n = n
        self.z: np.ndarray | None = None
        self.hidden: np.ndarray | None = None
        self._pending: dict[str, dict[int, torch.Tensor]] = {"z": {}, "hidden": {}}

    def __call__(self, value: torch.Tensor, point: Point, batch: PaddedBatch) -> None:
        self._pending[point.kind][point.thought] = value

    def flush(self, batch: PaddedBatch) -> None:
        for kind, parts in self._pending.items():
            if not parts:
                continue
            stacked = torch.stack([parts[k] for k in THOUGHTS], dim=1).detach().float().cpu().numpy()  # [B, 6, d]
            if getattr(self, kind) is None:
                setattr(self, kind, np.zeros((self.n, *stacked.shape[1:]), np.float32))
            getattr(self, kind)[batch.rows] = stacked
            parts.clear()


class FeedThoughts(Hook):
    """Feed given vectors as thoughts: z [N, 6, d] (the caller's problem order), at `thoughts` (default all six)
    instead of the vectors the model computes (latent swap, patching)."""

    def __init__(self, z: np.ndarray | torch.Tensor, thoughts: Sequence[int] = THOUGHTS):
        if z.ndim != 3 or z.shape[1] != N_THOUGHTS:
            raise ValueError(f"fed thoughts must be [problems, {N_THOUGHTS}, hidden size], got {list(z.shape)}")
        self.z = torch.as_tensor(z)
        self.thoughts = check_thoughts(thoughts, "fed thoughts")
        self.points = tuple(f"thought.{k}.z" for k in self.thoughts)
        self._device: dict[tuple, torch.Tensor] = {}

    def __call__(self, value: torch.Tensor, point: Point, batch: PaddedBatch) -> torch.Tensor:
        if value.shape[-1] != self.z.shape[-1]:
            raise ValueError(f"fed thoughts have size {self.z.shape[-1]}, the model's are {value.shape[-1]}")
        key = (value.device, value.dtype)
        if key not in self._device:  # moved once, not per batch
            self._device[key] = self.z.to(device=value.device, dtype=value.dtype)
        rows = torch.as_tensor(batch.rows, device=value.device)
        return self._device[key][rows, point.thought - 1]


class BlockThoughts(Hook):
    """Thoughts whose keys later queries may not attend: exactly zero weight through the attention mask (codi-spec
    trap 3); a blocked thought's own step still sees itself."""

    def __init__(self, thoughts: Sequence[int]):
        self.thoughts = check_thoughts(thoughts, "blocked thoughts")
        if not self.thoughts:
            raise ValueError("BlockThoughts needs at least one thought to block")
        self.points = tuple(f"thought.{k}.mask" for k in self.thoughts)

    def __call__(self, mask: torch.Tensor, point: Point, batch: PaddedBatch) -> torch.Tensor:
        mask = mask.clone()
        mask[:, batch.key_column(point.thought)] = 0
        return mask


class AnswerLogits(Hook):
    """Logits [N, V'] at each problem's answer token, float32, and its decode step [N] (-1: none).

    The answer token is where the answer's number starts: the first generated token in `numbers` ([V'] bool,
    `codi_attn.runner.number_tokens`), or the decode step given per problem in `steps` [N] (e.g. a baseline's,
    to read a condition's logits at the same position; -1 for none). Rows that never get there keep nan.
    """

    points = ("decode.*.logits", "decode.*.token")
    recorded = ("logits", "step")

    def __init__(self, n: int, numbers: torch.Tensor | None = None, steps: np.ndarray | None = None):
        if (numbers is None) == (steps is None):
            raise ValueError("AnswerLogits takes either numbers (a token mask) or steps (one per problem)")
        if steps is not None and np.shape(steps) != (n,):
            raise ValueError(f"steps must have one decode step per problem, shape ({n},), got {np.shape(steps)}")
        self.n, self.numbers = n, numbers
        self.given = None if steps is None else np.asarray(steps, dtype=np.int64)
        self.logits: np.ndarray | None = None
        self.step = np.full(n, -1, dtype=np.int64)
        self._batch: PaddedBatch | None = None
        self._logits: torch.Tensor | None = None  # this step's logits, until its token is known
        self._kept: torch.Tensor | None = None  # [B, V'] of the current batch
        self._step: torch.Tensor | None = None  # [B]

    def __call__(self, value: torch.Tensor, point: Point, batch: PaddedBatch) -> None:
        if point.kind == "logits":
            self._logits = value
            return None
        if self._batch is not batch:
            self._batch = batch
            self._kept = torch.full_like(self._logits, math.nan)
            self._step = torch.full((len(batch),), -1, dtype=torch.long, device=value.device)
        t = point.step
        if self.given is None:
            keep = ~batch.done & self.numbers.to(value.device)[value] & (self._step < 0)
        else:
            keep = ~batch.done & torch.as_tensor(self.given[batch.rows] == t, device=value.device)
        self._kept[keep], self._step[keep] = self._logits[keep], t
        return None

    def flush(self, batch: PaddedBatch) -> None:
        if self.logits is None:
            width = batch.model.lm.get_output_embeddings().weight.shape[0]
            self.logits = np.full((self.n, width), np.nan, np.float32)
        if self._batch is batch:
            self.logits[batch.rows] = self._kept.detach().cpu().numpy()
            self.step[batch.rows] = self._step.cpu().numpy()
        self._batch = self._kept = self._step = self._logits = None


def solution_steps(solution: str) -> int:
    """Number of `<<...>>` calculation annotations in a GSM8K solution."""
    return len(STEP.findall(solution))


def swap_partners(solutions: Sequence[str]) -> np.ndarray:
    """[N] partner of each problem in the latent swap (module docstring): the next problem (cyclically) with the
    same number of solution steps, else the next problem of the list. Needs two problems or more."""
    n = len(solutions)
    if n < 2:
        raise ValueError("the latent swap needs two problems or more")
    groups: dict[int, list[int]] = {}
    for i, solution in enumerate(solutions):
        groups.setdefault(solution_steps(solution), []).append(i)
    partner = np.array([(i + 1) % n for i in range(n)])
    for members in groups.values():
        if len(members) > 1:
            for j, i in enumerate(members):
                partner[i] = members[(j + 1) % len(members)]
    return partner


class AnswerShift(Hook):
    """How a condition moves the baseline's answer token, per problem, without keeping [N, V'] logits.

    At the baseline's answer step `steps` [N] (-1: none), where the condition generated the baseline's `tokens`
    [N, G] up to there (the same context), it records `kl` [N], KL(baseline || condition) of the next-token
    distribution (EOT excluded, as in decoding; nats), and `logit_diff` [N], the condition's logit of the
    baseline's answer token minus that of the baseline's runner-up (`answer` and `runner_up` [N] token ids).
    nan where there is no such step or another context. `base_logits` [N, V'] are the baseline's logits there.
    """

    points = ("decode.*.logits", "decode.*.token")
    recorded = ("kl", "logit_diff")

    def __init__(self, base_logits: np.ndarray, steps: np.ndarray, tokens: np.ndarray, answer: np.ndarray,
                 runner_up: np.ndarray):
        n = len(steps)
        self.base_logits, self.steps, self.tokens = base_logits, np.asarray(steps), np.asarray(tokens)
        self.answer, self.runner_up = np.asarray(answer), np.asarray(runner_up)
        self.kl = np.full(n, np.nan)
        self.logit_diff = np.full(n, np.nan)
        self._batch: PaddedBatch | None = None
        self._same: torch.Tensor | None = None  # [B] the context so far equals the baseline's

    def __call__(self, value: torch.Tensor, point: Point, batch: PaddedBatch) -> None:
        t, rows = point.step, batch.rows
        if self._batch is not batch:
            self._batch = batch
            self._same = torch.ones(len(rows), dtype=torch.bool, device=value.device)
        if point.kind == "logits":
            at = np.flatnonzero(self.steps[rows] == t)
            keep = at[self._same[at].cpu().numpy()] if len(at) else at
            if len(keep):
                logits = value[torch.as_tensor(keep, device=value.device)].double()
                base = torch.as_tensor(self.base_logits[rows[keep]], device=value.device, dtype=torch.float64)
                log_q, log_p = torch.log_softmax(logits, -1), torch.log_softmax(base, -1)
                p = log_p.exp()
                kl = torch.where(p > 0, p * (log_p - log_q), torch.zeros_like(p)).sum(-1).clamp(min=0.0)
                pick = torch.arange(len(keep), device=value.device)
                answer = torch.as_tensor(self.answer[rows[keep]], device=value.device)
                runner_up = torch.as_tensor(self.runner_up[rows[keep]], device=value.device)
                self.kl[rows[keep]] = kl.detach().cpu().numpy()
                self.logit_diff[rows[keep]] = (logits[pick, answer] - logits[pick, runner_up]).detach().cpu().numpy()
            return None
        width = self.tokens.shape[1]
        base = torch.as_tensor(self.tokens[rows, t] if t < width else np.full(len(rows), -1), device=value.device)
        self._same &= value == base
        return None

    def flush(self, batch: PaddedBatch) -> None:
        self._batch = self._same = None


class RecordResiduals(Hook):
    """`resid` [N, 7, L, d] float32: the residual stream after each block at BOT (p = 0, the last prompt position,
    whose final hidden state gives z1) and at thought k (p = k: where it is fed)."""

    points = ("prefill.resid.*", "thought.*.resid.*")
    recorded = ("resid",)

    def __init__(self, model: CODIModel, n: int):
        self.n = n
        self.resid = np.zeros((n, N_THOUGHTS + 1, model.n_layers, model.lm.config.hidden_size), np.float32)

    def __call__(self, value: torch.Tensor, point: Point, batch: PaddedBatch) -> None:
        if point.phase == "prefill":  # one prefill group: rows end with BOT at the group's last column
            self.resid[batch.rows, 0, point.layer] = value[:, -1].detach().float().cpu().numpy()
        else:
            self.resid[batch.rows, point.thought, point.layer] = value.detach().float().cpu().numpy()
