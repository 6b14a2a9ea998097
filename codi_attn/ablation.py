"""Head ablation at the right place (codi-spec trap 4), as hooks on the runner's `*.head_in.{l}` points.

A head's contribution is its slice of the INPUT of the attention output projection (LLaMA `self_attn.o_proj`,
GPT-2 `attn.c_proj`): `head_in` is that input split per query head, [B, H, d_head] at a thought or decode step,
[B, W, H, d_head] in the prefill. `AblateHeads` replaces chosen heads' slices by

    zero      0
    mean      the head's mean input over problems: means [P, L, H, d_head], P = 6 one mean per thought (slot k-1
              at thought k, read off the hook point), or P = 1 one pooled mean for every position
    resample  the same head's input on another problem at the same thought (Chan et al.'s causal scrubbing:
              on-distribution): inputs [N, 6, L, H, d_head] of every problem and partners [N]

at the six thought steps (`positions="thoughts"`) or at every position the model runs ("all": question, BOT,
thoughts, EOT and decoding; zero and pooled-mean only). `HeadMeans` and `HeadInputs` record what mean and
resample ablation need.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import torch

from codi_attn.conventions import ABLATIONS, N_THOUGHTS, POSITIONS, Head, head_label
from codi_attn.model import CODIModel
from codi_attn.runner import Hook, PaddedBatch, Point, Runner, head_dim


def check_heads(model: CODIModel, heads: Iterable[Head]) -> dict[int, list[int]]:
    """{layer: [heads]} after range checks."""
    by_layer: dict[int, list[int]] = {}
    for layer, head in heads:
        if not (0 <= layer < model.n_layers and 0 <= head < model.n_heads):
            raise ValueError(f"head {head_label(layer, head)} is outside the model's {model.n_layers} layers x "
                             f"{model.n_heads} heads")
        by_layer.setdefault(int(layer), []).append(int(head))
    return by_layer


def _position_patterns(positions: str, layer: int | str) -> str:
    if positions not in POSITIONS:
        raise ValueError(f"positions must be one of {POSITIONS}, got {positions!r}")
    return f"thought.*.head_in.{layer}" if positions == "thoughts" else f"*.head_in.{layer}"


class AblateHeads(Hook):
    """Replace `heads` (layer, head) by zero, their mean or their input on another problem (module docstring).

    With no heads it still runs the replacement at every layer and writes nothing: the no-op control of the
    same code path.
    """

    def __init__(self, model: CODIModel, heads: Iterable[Head], kind: str = "zero", positions: str = "thoughts",
                 means: np.ndarray | None = None, inputs: np.ndarray | None = None,
                 partners: Sequence[int] | None = None):
        if kind not in ABLATIONS:
            raise ValueError(f"ablation must be one of {ABLATIONS}, got {kind!r}")
        self.heads = tuple((int(l), int(h)) for l, h in heads)
        self.by_layer = check_heads(model, self.heads)
        self.kind, self.positions = kind, positions
        d_head = head_dim(model)
        layers = sorted(self.by_layer) or ["*"]
        self.points = tuple(_position_patterns(positions, layer) for layer in layers)
        self._index = {layer: torch.tensor(idx, device=model.device) for layer, idx in self.by_layer.items()}
        self.table = None
        if kind == "mean":
            expected = (model.n_layers, model.n_heads, d_head)
            if means is None or means.ndim != 4 or means.shape[1:] != expected or means.shape[0] not in (1, N_THOUGHTS):
                got = None if means is None else list(means.shape)
                raise ValueError(f"mean ablation needs means [1 or {N_THOUGHTS}, {', '.join(map(str, expected))}] "
                                 f"(HeadMeans), got {got}")
            if positions == "all" and means.shape[0] != 1:
                raise ValueError("position-specific means cover the six thoughts; for positions='all' use pooled "
                                 "means (HeadMeans(positions='all'))")
            self.table = torch.as_tensor(means, dtype=model.dtype, device=model.device)
        elif kind == "resample":
            if positions != "thoughts":
                raise ValueError("resample ablation is defined at the thought positions only (a question position "
                                 "has no counterpart in another problem)")
            shape = (N_THOUGHTS, *expected_shape(model))
            if inputs is None or partners is None or inputs.ndim != 5 or inputs.shape[1:] != shape:
                raise ValueError(f"resample ablation needs inputs [N, {', '.join(map(str, shape))}] (HeadInputs) "
                                 "and partners [N]")
            if len(partners) != inputs.shape[0]:
                raise ValueError(f"{len(partners)} partners for the inputs of {inputs.shape[0]} problems")
            layers = sorted(self.by_layer)
            self._layer_slot = {layer: i for i, layer in enumerate(layers)}
            self.table = torch.as_tensor(inputs[:, :, layers], dtype=model.dtype, device=model.device)
            self.partners = torch.as_tensor(np.asarray(partners), device=model.device)

    def __call__(self, value: torch.Tensor, point: Point, batch: PaddedBatch) -> torch.Tensor:
        idx = self._index.get(point.layer)
        out = value.clone()
        if idx is None:  # the no-op: through the same code path, nothing written
            return out
        if self.kind == "zero":
            out[..., idx, :] = 0.0
        elif self.kind == "mean":
            slot = point.thought - 1 if self.table.shape[0] == N_THOUGHTS else 0
            out[..., idx, :] = self.table[slot, point.layer, idx].to(out.dtype)
        else:
            source = self.partners[torch.as_tensor(batch.rows, device=out.device)]
            out[:, idx, :] = self.table[source, point.thought - 1, self._layer_slot[point.layer]][:, idx]
        return out


def expected_shape(model: CODIModel) -> tuple[int, int, int]:
    """(L, H, d_head): the per-layer, per-head shape of recorded head inputs."""
    return model.n_layers, model.n_heads, head_dim(model)


class HeadMeans(Hook):
    """Mean input of every head, float32: [6, L, H, d_head] per thought over problems (positions="thoughts"), or
    [1, L, H, d_head] pooled over every position CODI inference runs (positions="all": question and BOT without
    the padding, thoughts, EOT, and each decoded token fed back until the problem's stop token)."""

    recorded = None  # a running sum over every batch

    def __init__(self, model: CODIModel, positions: str = "thoughts"):
        self.positions = positions
        self.points = (_position_patterns(positions, "*"),)
        self.n_slots = N_THOUGHTS if positions == "thoughts" else 1
        shape = (self.n_slots, model.n_layers, model.n_heads * head_dim(model))
        self.sums = torch.zeros(shape, dtype=torch.float64, device=model.device)
        self.counts = torch.zeros(shape[:2], dtype=torch.float64, device=model.device)
        self._shape = expected_shape(model)

    def __call__(self, value: torch.Tensor, point: Point, batch: PaddedBatch) -> None:
        if point.phase == "prefill":  # [B, W, H, dh]: real prompt positions only
            keep = batch.prompt_mask.bool()
            rows = value[keep]
        elif point.phase == "decode":  # rows still decoding (a stop token is never fed back)
            rows = value[~batch.done]
        else:
            rows = value
        slot = point.thought - 1 if self.n_slots == N_THOUGHTS else 0
        self.sums[slot, point.layer] += rows.reshape(-1, self.sums.shape[-1]).double().sum(0)
        self.counts[slot, point.layer] += rows.shape[0]

    @property
    def means(self) -> np.ndarray:
        mean = (self.sums / self.counts[..., None]).detach().float().cpu().numpy()
        return mean.reshape(self.n_slots, *self._shape)


class HeadInputs(Hook):
    """Every problem's head inputs at the six thoughts, [N, 6, L, H, d_head] float32 on the host (exact for the
    model's float16 or bfloat16 values); `layers` limits it to some layers, the others staying 0."""

    points = ("thought.*.head_in.*",)
    recorded = ("inputs",)

    def __init__(self, model: CODIModel, n: int, layers: Sequence[int] | None = None):
        self.layers = set(range(model.n_layers) if layers is None else layers)
        self.inputs = np.zeros((n, N_THOUGHTS, *expected_shape(model)), np.float32)
        self._pending: dict[tuple[int, int], torch.Tensor] = {}

    def __call__(self, value: torch.Tensor, point: Point, batch: PaddedBatch) -> None:
        if point.layer in self.layers:
            self._pending[point.thought, point.layer] = value

    def flush(self, batch: PaddedBatch) -> None:
        for (k, layer), value in self._pending.items():
            self.inputs[batch.rows, k - 1, layer] = value.detach().float().cpu().numpy()
        self._pending.clear()


def head_means(model: CODIModel, questions: Sequence[str], positions: str = "thoughts", batch_size: int = 16,
               max_new_tokens: int = 256) -> np.ndarray:
    """`HeadMeans` of `questions`: [6 or 1, L, H, d_head] float32 (see HeadMeans). "thoughts" decodes nothing."""
    means = HeadMeans(model, positions)
    Runner(model, batch_size, max_new_tokens if positions == "all" else 0).run(questions, [means])
    return means.means
