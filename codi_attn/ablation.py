"""Head ablation at the right place (codi-spec trap 4): a head's contribution is its slice of the INPUT of the
attention output projection (LLaMA `self_attn.o_proj`, GPT-2 `attn.c_proj`), not a slice of its output.

The input of that projection is [B, S, H * d_head], head h at `[..., h * d_head:(h + 1) * d_head]`. Ablation
replaces the slice by zero or by the head's mean input. Means are an array [P, L, H, d_head]:
    P = 6  position-specific means at the six thoughts (slot k = the k-th call of the projection inside the
           context, i.e. latent step k when the context is `extract`'s `latent_context`);
    P = 1  one pooled mean, used at every position.
Where ablation acts is the caller's choice (`POSITIONS`): "latent" enters the hooks only around the six
latent steps (`extract(latent_context=...)`), "all" wraps the whole extraction (question, latents, EOT and
decoding).
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import numpy as np
import torch
from torch import nn

from codi_attn.extract import N_LATENTS, Extraction, extract
from codi_attn.model import CODIModel

POSITIONS = ("latent", "all")
Head = tuple[int, int]  # (layer, head)


def out_proj(model: CODIModel, layer: int) -> nn.Module:
    """The attention output projection of `layer` whose input holds the per-head outputs."""
    body = model.lm.base_model
    if model.family == "gpt2":
        return body.h[layer].attn.c_proj
    if model.family == "llama":
        return body.layers[layer].self_attn.o_proj
    raise ValueError(f"head ablation supports gpt2 and llama models, not {model.family!r}")


def head_dim(model: CODIModel) -> int:
    """d_head: the output projection's input width over the number of query heads."""
    proj = out_proj(model, 0)
    width = getattr(proj, "in_features", None) or getattr(proj, "nx", None)
    if width is None or width % model.n_heads:
        raise ValueError(f"cannot split the output projection's input ({width}) into {model.n_heads} heads")
    return width // model.n_heads


def _check_heads(model: CODIModel, heads: Iterable[Head]) -> dict[int, list[int]]:
    """{layer: [heads]} after range checks."""
    by_layer: dict[int, list[int]] = {}
    for layer, head in heads:
        if not (0 <= layer < model.n_layers and 0 <= head < model.n_heads):
            raise ValueError(f"head L{layer}H{head} is outside the model's {model.n_layers} x {model.n_heads} heads")
        by_layer.setdefault(int(layer), []).append(int(head))
    return by_layer


@contextmanager
def _pre_hooks(model: CODIModel, make_hook) -> Iterator[None]:
    """Register `make_hook(layer)` as a forward pre-hook on every layer's output projection (when not None)."""
    handles = []
    try:
        for layer in range(model.n_layers):
            hook = make_hook(layer)
            if hook is not None:
                handles.append(out_proj(model, layer).register_forward_pre_hook(hook))
        yield
    finally:
        for handle in handles:
            handle.remove()


def _slot(calls: list[int], layer: int, n_slots: int) -> int:
    """Which mean slot this call of the layer's projection uses (counting calls inside the context)."""
    slot = calls[layer] if n_slots > 1 else 0
    if slot >= n_slots:
        raise RuntimeError(f"position-specific means cover {n_slots} calls per layer; use them only as "
                           "extract's latent_context (six latent steps), or pool them for all positions")
    calls[layer] += 1
    return slot


@contextmanager
def ablate_heads(model: CODIModel, heads: Iterable[Head], means: np.ndarray | None = None) -> Iterator[None]:
    """Replace each head's slice of its layer's output-projection input by zero (means=None) or by its mean.

    means: [P, L, H, d_head] (P = 6 position-specific at the latent steps, or 1 pooled), as `head_means` gives.
    With no heads nothing is changed, through the same hooks (the no-op control).
    """
    by_layer = _check_heads(model, heads)
    d_head = head_dim(model)
    table = None
    if means is not None:
        expected = (model.n_layers, model.n_heads, d_head)
        if means.ndim != 4 or means.shape[1:] != expected or means.shape[0] not in (1, N_LATENTS):
            raise ValueError(f"means must be [1 or {N_LATENTS}, {', '.join(map(str, expected))}], "
                             f"got {list(means.shape)}")
        table = torch.as_tensor(means, dtype=model.dtype, device=model.device)
    calls = [0] * model.n_layers

    def make_hook(layer: int):
        idx = torch.tensor(by_layer.get(layer, []), dtype=torch.long, device=model.device)

        def hook(module: nn.Module, args: tuple) -> tuple:
            x = args[0]
            slot = _slot(calls, layer, 1 if table is None else table.shape[0])
            if not len(idx):
                return args
            x = x.clone()
            view = x.view(*x.shape[:-1], model.n_heads, d_head)
            view[..., idx, :] = 0.0 if table is None else table[slot, layer, idx].to(x.dtype)
            return (x, *args[1:])

        return hook

    with _pre_hooks(model, make_hook):
        yield


@contextmanager
def record_head_inputs(model: CODIModel, sums: torch.Tensor, counts: torch.Tensor) -> Iterator[None]:
    """Accumulate the output-projection inputs into sums [P, L, H * d_head] and counts [P, L] (float64).

    Every row of every call is added to its slot (see `ablate_heads` for slots).
    """
    calls = [0] * model.n_layers

    def make_hook(layer: int):
        def hook(module: nn.Module, args: tuple) -> None:
            x = args[0].reshape(-1, args[0].shape[-1])
            slot = _slot(calls, layer, sums.shape[0])
            sums[slot, layer] += x.double().sum(0)
            counts[slot, layer] += x.shape[0]

        return hook

    with _pre_hooks(model, make_hook):
        yield


def head_means(model: CODIModel, questions: list[str], positions: str = "latent", batch_size: int = 16,
               max_new_tokens: int = 256) -> np.ndarray:
    """Mean input of every head over `questions`: [6, L, H, d_head] for positions="latent" (per thought,
    over problems), [1, L, H, d_head] for "all" (over every position CODI inference runs: question, BOT,
    latents, EOT and the decoded tokens up to the stop token). float32.

    "all" runs one problem at a time, so that no padding and no token after a problem's stop enters the mean.
    """
    if positions not in POSITIONS:
        raise ValueError(f"positions must be one of {POSITIONS}, got {positions!r}")
    n_slots = N_LATENTS if positions == "latent" else 1
    width = model.n_heads * head_dim(model)
    sums = torch.zeros(n_slots, model.n_layers, width, dtype=torch.float64, device=model.device)
    counts = torch.zeros(n_slots, model.n_layers, dtype=torch.float64, device=model.device)
    if positions == "latent":
        extract(model, questions, batch_size=batch_size, max_new_tokens=1,
                latent_context=lambda: record_head_inputs(model, sums, counts))
    else:
        for question in questions:
            with record_head_inputs(model, sums, counts):
                extract(model, [question], max_new_tokens=max_new_tokens)
    mean = (sums / counts[..., None]).float().cpu().numpy()
    return mean.reshape(n_slots, model.n_layers, model.n_heads, -1)


def extract_ablated(model: CODIModel, questions: list[str], heads: Iterable[Head], means: np.ndarray | None = None,
                    positions: str = "latent", **extract_kwargs) -> Extraction:
    """`extract` with `heads` ablated at the latent steps only ("latent") or at every position ("all").

    means: from `head_means` with the same `positions` (None = zero ablation). Other keyword arguments
    (golds, blocked_latents, keep_logits, ...) go to `extract`.
    """
    if positions not in POSITIONS:
        raise ValueError(f"positions must be one of {POSITIONS}, got {positions!r}")
    heads = list(heads)
    if positions == "latent":
        return extract(model, questions, latent_context=lambda: ablate_heads(model, heads, means), **extract_kwargs)
    with ablate_heads(model, heads, means):
        return extract(model, questions, **extract_kwargs)
