"""The 6x6 attention between the six thoughts, captured on the runner (codi_attn.runner).

`CaptureAttention` reads each thought's attention row (`thought.{k}.attn.{l}`, [B, H, W + k]) and keeps the
entries on the thought keys z1..zk and the row's mass split; `extract` is the runner plus that hook.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from codi_attn.answers import correctness
from codi_attn.conventions import MASS_PARTS, N_THOUGHTS
from codi_attn.model import CODIModel
from codi_attn.runner import Hook, PaddedBatch, Point, Runner


@dataclass
class Extraction:
    """Results for N problems, in input order."""

    attention: np.ndarray  # [N, L, H, 6, 6] float32: A[n, l, h, i, j], query thought i+1 -> key thought j+1
    mass: np.ndarray  # [N, L, H, 6, 4] float32: each thought row's mass on MASS_PARTS (sink, question, BOT, thoughts)
    text: list[str]  # decoded answer text
    prediction: np.ndarray  # [N] float64, nan where the text has no number
    correct: np.ndarray  # [N] bool
    tokens: np.ndarray  # [N, G] int64: generated ids, -1 after the stop token


class CaptureAttention(Hook):
    """The 6x6 block and the mass split of every thought row, [N, L, H, 6, 6] and [N, L, H, 6, 4] float32.

    Row k-1 holds thought k's query: its weights on the keys of z1..zk (a share of the whole row; the entries
    after k stay 0), and the row split into the first token (the attention sink), the rest of the question, BOT
    and the thoughts. Pads get exactly 0 weight under the mask, so they fall in no part.
    """

    points = ("thought.*.attn.*",)
    recorded = ("attention", "mass")

    def __init__(self, model: CODIModel, n: int):
        self.attention = np.zeros((n, model.n_layers, model.n_heads, N_THOUGHTS, N_THOUGHTS), np.float32)
        self.mass = np.zeros((n, model.n_layers, model.n_heads, N_THOUGHTS, len(MASS_PARTS)), np.float32)
        self._batch: PaddedBatch | None = None
        self._rows: torch.Tensor | None = None  # [B, L, H, 6, 6 + 4] of the current batch, on the device

    def __call__(self, row: torch.Tensor, point: Point, batch: PaddedBatch) -> None:
        b, n_heads, _ = row.shape
        if self._batch is not batch:
            self._batch = batch
            self._rows = row.new_zeros(b, self.attention.shape[1], n_heads, N_THOUGHTS, N_THOUGHTS + len(MASS_PARTS),
                                       dtype=torch.float32)
        k, p = point.thought, batch.width
        row = row.float()
        first = (p - batch.lengths).view(-1, 1, 1).expand(-1, n_heads, 1)
        sink = row.gather(-1, first)[..., 0]
        thoughts = row[..., p: p + k]
        out = self._rows[:, point.layer, :, k - 1]
        out[..., :k] = thoughts
        out[..., N_THOUGHTS:] = torch.stack([sink, row[..., : p - 1].sum(-1) - sink, row[..., p - 1],
                                             thoughts.sum(-1)], dim=-1)

    def flush(self, batch: PaddedBatch) -> None:
        if self._batch is not batch:
            return
        rows = self._rows.detach().cpu().numpy()
        self.attention[batch.rows], self.mass[batch.rows] = rows[..., :N_THOUGHTS], rows[..., N_THOUGHTS:]
        self._batch = self._rows = None


def extract(model: CODIModel, questions: Sequence[str], golds: Sequence[str] | None = None, batch_size: int = 16,
            max_new_tokens: int = 256, progress: Callable[[int], None] | None = None,
            hooks: Iterable[Hook] = ()) -> Extraction:
    """Run CODI latent inference on `questions` and capture the six thoughts' attention.

    `golds`: gold answers (the number, or a GSM8K answer ending in '#### N'); `progress(k)` after each batch of
    k problems; `hooks`: more hooks run alongside the capture (ablation, blocking, recording: codi_attn.hooks,
    codi_attn.ablation). Results come back in input order.
    """
    capture = CaptureAttention(model, len(questions))
    generation = Runner(model, batch_size, max_new_tokens).run(questions, [capture, *hooks], progress)
    return Extraction(capture.attention, capture.mass, generation.text, generation.prediction,
                      correctness(generation.prediction, golds), generation.tokens)
