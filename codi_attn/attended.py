"""Which question tokens each thought reads: its attention over the question, averaged over every layer and head
(the CODI paper's "attended tokens") or over chosen heads, per problem and aggregated by token kind.

Token kinds: `number` (the decoded token has a digit), `operation` (a word or symbol that names an arithmetic
operation: OPERATION_WORDS, or + - * / x), `other`. The operands of solution step s are the question tokens
whose number is a literal of step s's expression (codi_attn.solutions) and not the result of an earlier step (a
literal that is an earlier result reads that step, not the question, even where the question also writes it).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from codi_attn.conventions import N_THOUGHTS, THOUGHTS, Head, thought_name
from codi_attn.model import CODIModel
from codi_attn.runner import Hook, PaddedBatch, Point
from codi_attn.solutions import literals, solution_steps

KINDS = ("number", "operation", "other")
OPERATION_WORDS = frozenset("""more less gets buys finds gives away sells loses doubles triples twice thrice half
double triple times each per every plus minus total sum difference product left remaining remain spends spent
earns earned pays paid costs cost shares split divided multiplied added subtract subtracted add adds increase
increased decrease decreased fewer""".split()) | frozenset("+-*/x×÷")


class AttendedTokens(Hook):
    """Each thought's attention on each question token of each problem, averaged over layers and heads (or over
    `heads` (layer, head) only): `weights[n]` [6, Q_n] for the Q_n question tokens of problem n (BOS included,
    BOT and the thoughts left out)."""

    points = ("thought.*.attn.*",)
    recorded = ("weights",)  # ragged: snapshot and restore below

    def __init__(self, model: CODIModel, n: int, heads: Sequence[Head] | None = None):
        self.heads = None if heads is None else sorted({(int(l), int(h)) for l, h in heads})
        self.by_layer: dict[int, list[int]] = {}
        for layer, head in self.heads or [(l, h) for l in range(model.n_layers) for h in range(model.n_heads)]:
            self.by_layer.setdefault(layer, []).append(head)
        self.count = sum(map(len, self.by_layer.values()))
        self.weights: list[np.ndarray | None] = [None] * n
        self._batch: PaddedBatch | None = None
        self._sums: torch.Tensor | None = None  # [B, 6, W - 1]

    def __call__(self, row: torch.Tensor, point: Point, batch: PaddedBatch) -> None:
        heads = self.by_layer.get(point.layer)
        if not heads:
            return None
        if self._batch is not batch:
            self._batch = batch
            self._sums = row.new_zeros(len(batch), N_THOUGHTS, batch.width - 1, dtype=torch.float32)
        self._sums[:, point.thought - 1] += row[:, heads, : batch.width - 1].float().sum(1)
        return None

    def flush(self, batch: PaddedBatch) -> None:
        if self._batch is not batch:
            return
        sums = (self._sums / self.count).detach().cpu().numpy()
        for b, (n, length) in enumerate(zip(batch.rows, batch.lengths.tolist())):
            self.weights[n] = sums[b, :, batch.width - length:]  # left padding cut off
        self._batch = self._sums = None

    def snapshot(self, rows: Sequence[int]) -> dict[str, list[np.ndarray]]:
        """The weights of one finished batch's problems (ragged: one [6, Q_n] each)."""
        return {"weights": [self.weights[n] for n in rows]}

    def restore(self, rows: Sequence[int], saved: dict[str, list[np.ndarray]]) -> None:
        for n, w in zip(rows, saved["weights"]):
            self.weights[n] = w


def token_kind(text: str) -> str:
    """number, operation or other, for one decoded token."""
    word = text.strip().lower().strip(".,?!:;$")
    if any(c.isdigit() for c in text):
        return "number"
    if word in OPERATION_WORDS:
        return "operation"
    return "other"


@dataclass
class QuestionTokens:
    """One problem's question tokens: decoded text, kind, and the solution steps each token is an operand of."""

    text: list[str]
    kind: list[str]
    operand_of: list[tuple[int, ...]]  # step numbers s (1-based) whose operands have this token's number


def question_tokens(model: CODIModel, question_ids: Sequence[int], solution: str) -> QuestionTokens:
    """Describe the question tokens (ids without BOT) of one problem."""
    from codi_attn.validate import token_number

    texts = [model.tokenizer.decode([i]) for i in question_ids]
    steps = solution_steps(solution)
    operands = [{v for _, _, v in literals(s.expression)} - {e.value for e in steps[:i]} for i, s in enumerate(steps)]
    operand_of = []
    for text in texts:
        value = token_number(text)
        operand_of.append(tuple(s + 1 for s, values in enumerate(operands) if value is not None and value in values))
    return QuestionTokens(texts, [token_kind(t) for t in texts], operand_of)


def attended_summary(weights: Sequence[np.ndarray], tokens: Sequence[QuestionTokens], max_step: int = 7
                     ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(by_kind, by_step) over problems: per thought, the mean share of its question attention on each token kind
    (and the mean weight per token of that kind); per thought and step s, the share on step s's operands."""
    kinds, steps = [], []
    for w, tok in zip(weights, tokens):
        total = w.sum(-1, keepdims=True)  # [6, 1]
        share = np.divide(w, total, out=np.zeros_like(w), where=total > 0)
        kind = np.array(tok.kind)
        for k in THOUGHTS:
            row = {"thought": thought_name(k)}
            for name in KINDS:
                sel = kind == name
                row[f"share_{name}"] = float(share[k - 1, sel].sum())
                row[f"per_token_{name}"] = float(w[k - 1, sel].mean()) if sel.any() else np.nan
            kinds.append(row)
            for s in range(1, max_step + 1):
                sel = np.array([s in ops for ops in tok.operand_of])
                if sel.any():
                    steps.append({"thought": thought_name(k), "step": s, "share": float(share[k - 1, sel].sum())})
    by_kind = pd.DataFrame(kinds).groupby("thought", sort=False).mean().reset_index()
    by_step = pd.DataFrame(steps, columns=["thought", "step", "share"]).groupby(["thought", "step"], sort=False)
    return by_kind, by_step.mean().reset_index()

