"""The names and indices every module shares (no torch here: settings, metrics and cards import it cheaply).

Thoughts. CODI feeds six continuous thoughts z1..z6 after the question and BOT (codi-spec section 3):
"thought k" (k = 1..6) is the vector z_k fed at position Q + k (Q = question tokens, BOT at Q); z1 = prj(hidden
state at BOT), z_{k+1} = prj(hidden state at thought k). Hook points and every public argument count thoughts
from 1 (`thought.3.z`, `BlockThoughts([3])`); array axes count from 0 as numpy does, so thought k is index k - 1
of the 6-long axes (`attention[n, l, h, k - 1, :]`). Text and figures say z1..z6.

Heads. (layer, head), both 0-based, labelled L{layer}H{head} as TransformerLens does; "head" means query head
(LLaMA has 32 query heads sharing 8 key/value heads).
"""
from __future__ import annotations

N_THOUGHTS = 6
THOUGHTS = tuple(range(1, N_THOUGHTS + 1))  # thought numbers k
MASS_PARTS = ("sink", "question", "bot", "thoughts")  # where a thought's attention row goes: first token, rest of
# the question, BOT, the thought positions
Head = tuple[int, int]  # (layer, head)

POSITIONS = ("thoughts", "all")  # where head ablation acts: the six thought steps, or every position
ABLATIONS = ("mean", "zero", "resample")  # what an ablated head's input is replaced by


def thought_name(k: int) -> str:
    """Thought number k (1..6) -> 'z{k}'."""
    if k not in THOUGHTS:
        raise ValueError(f"thoughts are numbered 1..{N_THOUGHTS}, got {k!r}")
    return f"z{k}"


def head_label(layer: int, head: int) -> str:
    """TransformerLens-style label, e.g. L4H5."""
    return f"L{layer}H{head}"


def check_thoughts(thoughts, what: str = "thoughts") -> tuple[int, ...]:
    """Thought numbers as a sorted tuple after the range check (1..6), naming `what` in the error."""
    out = tuple(sorted({int(k) for k in thoughts}))
    bad = [k for k in out if k not in THOUGHTS]
    if bad:
        raise ValueError(f"{what} are thought numbers 1..{N_THOUGHTS} (z1..z6), got {bad}")
    return out
