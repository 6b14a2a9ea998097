"""Attention of the one-query steps over only the keys each row can see.

A left-padded batch's KV cache is as wide as its longest prompt. In a one-position step (a thought, EOT, a
decoded token) a short prompt's row would read and score every padded key of that width, only to mask it out;
on GSM8K batches (the longest prompts 2-3x the median) that is about half of the keys, and on CPU these steps
are bound by reading them. Here each one-query forward runs its attention per run of consecutive rows whose
first visible key lies in the same block of `KEY_QUANTUM` columns, on the keys from that block on, with the
function the model's forward would call (its eager function, or sdpa; a function a user registered under either
name with transformers' AttentionInterface included). Eager's weights come back at full width, zeros left of the
window: what the masked full-width softmax gives there (exp(min - max) underflows to 0).

A row's window depends only on its own mask, never on its neighbours, so stacked conditions keep each row's
result bit for bit. Against the full-width kernels the results agree to float32 rounding (~1e-7 on attention
weights): windows start on multiples of 32 columns, a whole number of SIMD vectors, and the benchmark's 48
GSM8K problems came out bit for bit equal, but the matmul takes another path for windows of a few keys and
sdpa splits more than 512 keys into blocks, where the last bits can differ.

The mask contract is transformers' for eager and sdpa: [B, 1, q, S], bool (True = visible) or float (0 =
visible, finfo.min = masked); anything else (a mask per head, additive biases) runs at full width.

The twins are registered with transformers' AttentionInterface as `codi_windowed_eager` and
`codi_windowed_sdpa` (with the masks of eager and sdpa) the first time `windowed_implementation` picks one.
"""
from __future__ import annotations

import sys
from collections.abc import Callable
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import nn

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


def visible_keys(mask: torch.Tensor | None, batch: int) -> torch.Tensor | None:
    """[B, S] bool: the keys each row's one query may attend, from a mask of the contract above ([B, 1, 1, S],
    bool, or float 0 / finfo.min); None for any other mask."""
    if mask is None or mask.shape[:3] != (batch, 1, 1):
        return None
    row = mask[:, 0, 0]
    if row.dtype == torch.bool:
        return row
    visible = row == 0
    return visible if bool((visible | (row == torch.finfo(row.dtype).min)).all()) else None


def eager_function(module: nn.Module) -> Callable:
    """The eager attention of `module`'s modeling file (the `eager_attention_forward` that GPT-2, LLaMA and the
    other HF decoders define and fall back to)."""
    function = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
    if function is None:
        raise NotImplementedError(f"{type(module).__module__} defines no eager_attention_forward to window")
    return function


def kernel_function(module: nn.Module, kernel: str) -> Callable:
    """The function `module`'s own forward calls for implementation `kernel` ("eager" or "sdpa"), looked up as its
    modeling file looks it up (its ALL_ATTENTION_FUNCTIONS, falling back to its eager function), so that a function
    a user registered under that name with transformers' AttentionInterface runs in the windows too."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    functions = getattr(sys.modules[type(module).__module__], "ALL_ATTENTION_FUNCTIONS", ALL_ATTENTION_FUNCTIONS)
    return functions.get_interface(kernel, eager_function(module))


def windowed(kernel: str) -> Callable:
    """The windowed twin of the eager or sdpa attention function (transformers' AttentionInterface signature:
    query [B, H, q, dh], key / value [B, H_kv, S, dh], mask [B, 1, q, S]; returns output [B, q, H, dh] and
    weights [B, H, q, S] or None)."""

    def attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                  attention_mask: torch.Tensor | None, **kwargs) -> tuple[torch.Tensor, torch.Tensor | None]:
        base = kernel_function(module, kernel)
        visible = visible_keys(attention_mask, query.shape[0]) if query.shape[-2] == 1 else None
        windows = None if visible is None else key_windows(visible)
        if windows is None or len(windows) == 1 and windows[0][1] == 0:  # nothing to cut
            return base(module, query, key, value, attention_mask, **kwargs)
        outputs, weights = [], []
        for rows, start in windows:
            out, w = base(module, query[rows], key[rows, ..., start:, :], value[rows, ..., start:, :],
                          attention_mask[rows, ..., start:], **kwargs)
            outputs.append(out)
            weights.append(None if w is None else F.pad(w, (start, 0)))
        return torch.cat(outputs), None if weights[0] is None else torch.cat(weights)

    return attention


@lru_cache(maxsize=None)
def register() -> None:
    """Register the twins and their masks with transformers, once, at first use (transformers' attention
    registry imports its modeling code: 1.8 s, which steps that never run a model should not pay)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask, sdpa_mask

    for kernel, mask in (("eager", eager_mask), ("sdpa", sdpa_mask)):
        AttentionInterface.register(PREFIX + kernel, windowed(kernel))
        AttentionMaskInterface.register(PREFIX + kernel, mask)


def windowed_implementation(lm: nn.Module, name: str, padding: int) -> str:
    """The windowed twin of attention implementation `name` for the HF model `lm` where it applies, else `name`:
    on CPU, for eager and sdpa (not eager under GPT-2's reorder_and_upcast_attn, which only the plain name runs),
    for a batch whose widest left padding (`padding`, in keys) reaches a block of `KEY_QUANTUM`; with less no
    window could start past column 0, and the plain kernel saves the per-layer look at the mask (~12% of an
    8-condition run on the small demo model, whose prompts never span two blocks). GPUs keep the full-width
    kernels (not measured there: padded keys cost less, and each window is one more launch)."""
    if lm.device.type != "cpu" or name not in ("eager", "sdpa") or padding < KEY_QUANTUM or \
            name == "eager" and getattr(lm.config, "reorder_and_upcast_attn", False):
        return name
    register()
    return PREFIX + name
