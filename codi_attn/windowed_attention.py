"""Attention of the one-query steps over only the keys each row can see.

A left-padded batch's KV cache is as wide as its longest prompt. In a one-position step (a thought, EOT, a
decoded token) a short prompt's row would read and score every padded key of that width, only to mask it out;
on GSM8K batches (the longest prompts 2-3x the median) that is about half of the keys, and on CPU these steps
are bound by reading them. Here each one-query forward runs its attention per run of consecutive rows whose
first visible key lies in the same block of `KEY_QUANTUM` columns, on the keys from that block on, with the
model's own kernel (its eager function, or sdpa). Eager's weights come back at full width, zeros left of the
window: what the masked full-width softmax gives there (exp(min - max) underflows to 0).

A row's window depends only on its own mask, never on its neighbours, so stacked conditions keep each row's
result. Windows start on multiples of 32 columns, a whole number of SIMD vectors: on the CPUs measured the
results equal the full-width ones bit for bit (attention, mass and tokens of the benchmark's 48 problems).

The twins are registered with transformers' AttentionInterface as `codi_windowed_eager` and
`codi_windowed_sdpa` (with the masks of eager and sdpa); `windowed_implementation` picks one.
"""
from __future__ import annotations

import sys
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, eager_mask, sdpa_mask

KEY_QUANTUM = 32  # windows start on multiples of this many key columns
PREFIX = "codi_windowed_"
Windows = list[tuple[slice, int]]  # (rows, first key column) per run of consecutive rows


def key_windows(visible: torch.Tensor, quantum: int = KEY_QUANTUM) -> Windows:
    """Runs of consecutive rows and the column their window starts at: each row's first visible key, rounded
    down to a multiple of `quantum`. visible: [B, S] bool (True = the query may attend the key)."""
    starts = (visible.int().argmax(-1) // quantum * quantum).tolist()  # argmax: the first True
    windows, first = [], 0
    for row in range(1, len(starts) + 1):
        if row == len(starts) or starts[row] != starts[first]:
            windows.append((slice(first, row), starts[first]))
            first = row
    return windows


def eager_function(module: nn.Module) -> Callable:
    """The eager attention of `module`'s modeling file (every HF decoder defines `eager_attention_forward`)."""
    function = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
    if function is None:
        raise NotImplementedError(f"{type(module).__module__} defines no eager_attention_forward to window")
    return function


def windowed(kernel: str) -> Callable:
    """The windowed twin of the eager or sdpa attention function (transformers' AttentionInterface signature:
    query [B, H, q, dh], key / value [B, H_kv, S, dh], mask [B, 1, q, S]; returns output [B, q, H, dh] and
    weights [B, H, q, S] or None)."""

    def attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                  attention_mask: torch.Tensor | None, **kwargs) -> tuple[torch.Tensor, torch.Tensor | None]:
        base = eager_function(module) if kernel == "eager" else sdpa_attention_forward
        if attention_mask is None or query.shape[-2] != 1 or attention_mask.shape[0] != query.shape[0]:
            return base(module, query, key, value, attention_mask, **kwargs)
        mask = attention_mask[:, 0, -1]  # [B, S]
        windows = key_windows(mask if mask.dtype == torch.bool else mask == 0)
        if len(windows) == 1 and windows[0][1] == 0:
            return base(module, query, key, value, attention_mask, **kwargs)
        outputs, weights = [], []
        for rows, start in windows:
            out, w = base(module, query[rows], key[rows, ..., start:, :], value[rows, ..., start:, :],
                          attention_mask[rows, ..., start:], **kwargs)
            outputs.append(out)
            weights.append(None if w is None else F.pad(w, (start, 0)))
        return torch.cat(outputs), None if weights[0] is None else torch.cat(weights)

    return attention


for _kernel, _mask in (("eager", eager_mask), ("sdpa", sdpa_mask)):
    AttentionInterface.register(PREFIX + _kernel, windowed(_kernel))
    AttentionMaskInterface.register(PREFIX + _kernel, _mask)


def windowed_implementation(lm: nn.Module, name: str) -> str:
    """The windowed twin of attention implementation `name` for the HF model `lm` where it applies (on CPU, for
    eager and sdpa; not for GPT-2's reorder_and_upcast_attn, which only the plain eager name runs), else `name`.
    GPUs keep the full-width kernels: there the padded keys cost less than the extra launches."""
    if lm.device.type != "cpu" or name not in ("eager", "sdpa") or getattr(lm.config, "reorder_and_upcast_attn", False):
        return name
    return PREFIX + name
