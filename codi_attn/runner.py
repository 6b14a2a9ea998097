"""One CODI latent runner with named hook points (codi-spec section 3), in the TransformerLens / nnsight style.

Per batch of left-padded questions: the prefill of question + BOT (sdpa, body only, in groups of similar length
that write their keys and values straight into their rows of the batch cache, right-aligned at the batch width),
six thought steps of one position each under eager attention (the kernel that returns weights; used for every
run, so that all conditions share the baseline's numerics), then EOT and greedy decoding (sdpa, LM head on the
last position only). On CPU these one-position steps attend only to the keys each row can see, not to the
batch's left padding (codi_attn.windowed_attention). The KV cache writes each new position into room reserved
up front, in memory kept from batch to batch and run to run (codi_attn.kv_cache: `batch.cache` is valid only
while its batch runs). Left padding with a 2-D attention mask and per-problem position ids gives every problem
its batch-of-one result (codi-spec trap 8).

Hook points (k = thought 1..6, l = layer, t = decode step; W = the batch's prompt width: BOT at column W - 1,
thought j's key at column W + j - 1; V' = embedding rows, V + 3):

    prefill                  [B, d]          final-norm hidden state at BOT; z1 = prj(it)          read, replace
    prefill.embed            [B, W, d]       the prompt's token embeddings (left padding included)   read, replace
    prefill.head_in.{l}      [B, W, H, dh]   input of layer l's attention output projection, split per query head,
                                             at every prompt position (left padding included)       read, replace
    prefill.resid.{l}        [B, W, d]       residual stream after block l                          read, replace
    thought.{k}.z            [B, d]          the vector fed as thought k                            read, replace
    thought.{k}.attn.{l}     [B, H, W + k]   layer l's attention weights of thought k's query row   read
    thought.{k}.head_in.{l}  [B, H, dh]      per-head output-projection input at thought k         read, replace
    thought.{k}.resid.{l}    [B, d]          residual stream after block l at thought k             read, replace
    thought.{k}.mask         [B, W + k]      1 where later queries may attend a key (after step k)  read, replace
    thought.{k}.hidden       [B, d]          final-norm hidden state at thought k; z_{k+1} = prj(it) read, replace
    decode.{t}.head_in.{l}   [B, H, dh]      in the forward that yields step t's logits: it feeds EOT
    decode.{t}.resid.{l}     [B, d]          (t = 0) or the token chosen at step t - 1              read, replace
    decode.{t}.logits        [B, V']         float32 logits of generated token t, EOT at -inf       read, replace
    decode.{t}.token         [B]             the token chosen at step t (argmax of the logits)      read, replace

A hook is `fn(value, point, batch) -> None | tensor`: None reads, a tensor of `value`'s shape replaces (cast to
its dtype). `point` (a `Point`) says where it is (k, l, t come from the name, never from counting calls);
`batch` (a `PaddedBatch`) gives the rows of the batch in the caller's problem list (`batch.rows`), the prompt
width, the attention mask and which problems have finished decoding. Attach hooks as `Hook` objects (a
`points` tuple of names or fnmatch patterns such as "thought.*.head_in.3", and `__call__`) or as
(pattern, fn) pairs. Never modify `value` in place: return the replacement.

The prefill runs in groups of rows of similar length, so `prefill.embed`, `prefill.head_in.{l}` and
`prefill.resid.{l}` fire once per group (once per run of consecutive rows of a group, where a caller's batch
is not sorted by length; the Runner's always is), with a `PrefillGroup` as `batch` (its rows, width and mask);
every other point fires once per batch.

`Runner.run` runs one set of hooks; `Runner.run_conditions` runs several on the same batches and computes each
batch's prefill once for every condition without prefill hooks (the cache is rewound to the prompt between
them): the thoughts and the decoding are what such conditions change.
"""
from __future__ import annotations

import fnmatch
import inspect
import math
import re
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
from torch import nn
from transformers import DynamicCache

from codi_attn.answers import normalize_question, parse_answer
from codi_attn.conventions import N_THOUGHTS, THOUGHTS
from codi_attn.kv_cache import KVStorage, kv_storage, preallocated_cache
from codi_attn.model import CODIModel
from codi_attn.presets import FAMILIES
from codi_attn.windowed_attention import windowed_implementation

PREFILL_EFFICIENCY = 0.95  # each prefill group's real tokens are at least this share of its padded tokens
CONDITION_ROWS = 256  # rows of one forward when the causal analyses stack conditions (conditions x batch size)
LAYER_KINDS = ("attn", "head_in", "resid")
READ_ONLY = ("attn",)
_NAME = re.compile(r"^(?:(prefill)(?:\.(embed)|\.(head_in|resid)\.(\d+))?"
                   r"|thought\.(\d+)\.(?:(z|mask|hidden)|(attn|head_in|resid)\.(\d+))"
                   r"|decode\.(\d+)\.(?:(logits|token)|(head_in|resid)\.(\d+)))$")


# ------------------------------------------------------------------------------------------------ hook points


@dataclass(frozen=True)
class Point:
    """A hook point: its name and what the name says (phase 'prefill' | 'thought' | 'decode', kind, k, l, t)."""

    name: str
    phase: str
    kind: str  # 'hidden' (prefill: at BOT), 'z', 'attn', 'head_in', 'resid', 'mask', 'hidden', 'logits', 'token'
    thought: int | None = None  # k, 1..6
    layer: int | None = None
    step: int | None = None  # decode step t


@lru_cache(maxsize=None)
def point(name: str) -> Point:
    """The Point a hook-point name denotes; ValueError for a name that is not one."""
    m = _NAME.match(name)
    if m is None:
        raise ValueError(f"{name!r} is not a hook point name (see codi_attn.runner's docstring for the list)")
    (pre, embed, pre_kind, pre_layer, k, k_kind, k_layer_kind, k_layer, t, t_kind, t_layer_kind, t_layer) = m.groups()
    if pre:
        layer = None if pre_layer is None else int(pre_layer)
        return Point(name, "prefill", embed or pre_kind or "hidden", layer=layer)
    if k is not None:
        if int(k) not in THOUGHTS:
            raise ValueError(f"{name!r}: thoughts are numbered 1..{N_THOUGHTS}")
        layer = None if k_layer is None else int(k_layer)
        return Point(name, "thought", k_kind or k_layer_kind, thought=int(k), layer=layer)
    layer = None if t_layer is None else int(t_layer)
    return Point(name, "decode", t_kind or t_layer_kind, layer=layer, step=int(t))


def point_names(n_layers: int, max_new_tokens: int) -> list[str]:
    """Every hook point of a run with n_layers layers and up to max_new_tokens decode steps."""
    layers = range(n_layers)
    names = ["prefill", "prefill.embed"] + [f"prefill.{kind}.{l}" for kind in ("head_in", "resid") for l in layers]
    for k in THOUGHTS:
        names += [f"thought.{k}.{kind}" for kind in ("z", "mask", "hidden")]
        names += [f"thought.{k}.{kind}.{l}" for kind in LAYER_KINDS for l in layers]
    for t in range(max(max_new_tokens, 1)):
        names += [f"decode.{t}.{kind}" for kind in ("logits", "token")]
        names += [f"decode.{t}.{kind}.{l}" for kind in ("head_in", "resid") for l in layers]
    return names


HookFn = Callable[[torch.Tensor, Point, "PaddedBatch"], "torch.Tensor | None"]


class Hook:
    """Base of the hook objects: attach at `points` (names or fnmatch patterns) and implement `__call__`; an
    optional `flush(batch)` is called once after each batch's run (e.g. to copy what was recorded to the host).

    `recorded` names the hook's per-problem arrays (first axis: the caller's problem; None until a first batch
    allocates it, then `n` rows of `blank`): what a checkpointed run saves of each finished batch and restores
    instead of running it again. None marks state that cannot be saved batch by batch (a running mean)."""

    points: tuple[str, ...] = ()
    recorded: tuple[str, ...] | None = ()
    blank: float = math.nan

    def __call__(self, value: torch.Tensor, point: Point, batch: "PaddedBatch") -> torch.Tensor | None:
        raise NotImplementedError

    def snapshot(self, rows: Sequence[int]) -> dict[str, np.ndarray]:
        """The recorded arrays' rows of one finished batch."""
        return {name: getattr(self, name)[rows] for name in self.recorded if getattr(self, name) is not None}

    def restore(self, rows: Sequence[int], saved: dict[str, np.ndarray]) -> None:
        """Put a batch's `snapshot` back, as if the batch had run."""
        for name, values in saved.items():
            if getattr(self, name) is None:
                setattr(self, name, np.full((self.n, *values.shape[1:]), self.blank, values.dtype))
            getattr(self, name)[rows] = values


class Hooks:
    """The hooks of one condition, looked up by point name (the patterns are matched against every name once)."""

    def __init__(self, hooks: Iterable[Hook | tuple[str, HookFn]], names: Sequence[str]):
        self.pairs: list[tuple[str, HookFn]] = []
        for hook in hooks:
            if isinstance(hook, tuple) and len(hook) == 2 and isinstance(hook[0], str) and callable(hook[1]):
                self.pairs.append(hook)
            elif callable(hook) and getattr(hook, "points", None):
                self.pairs += [(pattern, hook) for pattern in hook.points]
            else:
                raise TypeError(f"a hook is a Hook object with `points` or a (pattern, fn) pair, got {hook!r}")
        self.matched: set[str] = set()
        for pattern in dict.fromkeys(p for p, _ in self.pairs):
            regex = re.compile(fnmatch.translate(pattern))
            found = [name for name in names if regex.match(name)]
            if not found:
                raise ValueError(f"hook pattern {pattern!r} matches no hook point of this run (names such as "
                                 f"'prefill', 'thought.1.z', 'thought.3.head_in.0', 'decode.0.logits'; decode steps "
                                 f"go up to max_new_tokens - 1)")
            self.matched.update(found)
        points = [point(name) for name in self.matched]
        self.layer_sites = {(p.kind, p.layer) for p in points if p.layer is not None}  # module hooks needed
        self.prefill_layers = any(p.phase == "prefill" and p.kind != "hidden" for p in points)  # own prefill
        self._cache: dict[str, list[HookFn]] = {}

    def get(self, name: str) -> list[HookFn]:
        """The hooks at `name`, in attachment order."""
        if name not in self.matched:
            return []
        fns = self._cache.get(name)
        if fns is None:
            fns = self._cache[name] = [fn for pattern, fn in self.pairs if fnmatch.fnmatchcase(name, pattern)]
        return fns

    def flush(self, batch: "PaddedBatch") -> None:
        """Tell every hook object with a `flush(batch)` method that the batch's run is over."""
        for fn in dict.fromkeys(fn for _, fn in self.pairs):
            if hasattr(fn, "flush"):
                fn.flush(batch)

    def __call__(self, name: str, value: torch.Tensor, batch: "PaddedBatch") -> torch.Tensor:
        """`value` after every hook at `name`, in order (each sees the previous one's replacement)."""
        fns = self.get(name)
        if not fns:
            return value
        where = point(name)
        for fn in fns:
            out = fn(value, where, batch)
            if out is None:
                continue
            if where.kind in READ_ONLY:
                raise ValueError(f"hook point {name} is read-only (attention weights are captured, not replaced)")
            if not isinstance(out, torch.Tensor) or tuple(out.shape) != tuple(value.shape):
                shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
                raise ValueError(f"hook {fn!r} at {name} returned {shape}; a replacement must have the shape "
                                 f"{tuple(value.shape)}")
            value = out.to(dtype=value.dtype, device=value.device)
        return value


NO_HOOKS = Hooks((), ())
# per causal LM, the runners whose runs are under way, innermost last (a run started from inside a hook): only the
# innermost one's module hooks act, so an outer run's layer hooks never fire on a nested run's forwards
_RUNNING: "weakref.WeakKeyDictionary[nn.Module, list[Runner]]" = weakref.WeakKeyDictionary()

# ------------------------------------------------------------------------------------------------ the loop


def thought_steps(prj: nn.Module, step: Callable[[torch.Tensor, int], torch.Tensor], hidden: torch.Tensor,
                  hooks: Callable[[str, torch.Tensor], torch.Tensor] | None = None) -> list[torch.Tensor]:
    """The six thoughts (codi-spec section 3): z_k = prj(h_{k-1}) with h_0 the hidden state at BOT, fed one at a
    time by `step(z_k, k) -> h_k`; `hooks(name, value)` may read or replace thought.{k}.z and thought.{k}.hidden.
    Returns the fed vectors z1..z6. Used by the runner and, with gradients, by the demo model's training."""
    fed = []
    for k in THOUGHTS:
        z = prj(hidden)
        if hooks is not None:
            z = hooks(f"thought.{k}.z", z)
        fed.append(z)
        hidden = step(z, k)
        if hooks is not None:
            hidden = hooks(f"thought.{k}.hidden", hidden)
    return fed


def greedy_steps(logits: torch.Tensor, feed: Callable[[torch.Tensor, int], torch.Tensor], budget: int,
                 stop_ids: Sequence[int], eot_id: int, hooks: Callable[[str, torch.Tensor], torch.Tensor] | None = None,
                 done: torch.Tensor | None = None, limits: torch.Tensor | None = None) -> torch.Tensor:
    """Greedy decoding as the original CODI decoder: the EOT id is excluded from the argmax, a row stops at a stop
    id. logits [B, V'] yield token 0; `feed(token, t) -> logits` feeds the token chosen at step t - 1 and returns
    step t's logits. `done` [B] bool (updated in place) says which rows have stopped; `limits` [B], where given,
    how many tokens each row may decode (at most `budget`): a row is done after its last. Returns the chosen ids
    [B, budget], -1 after a row's stop token (which is kept) or its limit."""
    n = logits.shape[0]
    generated = torch.full((n, budget), -1, dtype=torch.long, device=logits.device)
    stop = torch.tensor(list(stop_ids), device=logits.device)
    done = torch.zeros(n, dtype=torch.bool, device=logits.device) if done is None else done
    for t in range(budget):
        logits = logits.float()
        logits[:, eot_id] = -math.inf
        if hooks is not None:
            logits = hooks(f"decode.{t}.logits", logits)
        token = logits.argmax(-1)
        if hooks is not None:
            token = hooks(f"decode.{t}.token", token)
        generated[:, t] = torch.where(done, -1, token)
        done |= torch.isin(token, stop)
        if limits is not None:
            done |= limits <= t + 1
        if bool(done.all()) or t == budget - 1:
            break
        logits = feed(token, t + 1)
    return generated


# ------------------------------------------------------------------------------------------------ batch state


def question_tokens(model: CODIModel, question: str, name: str = "the question") -> list[int]:
    """Token ids of one normalised question (BOS as the tokenizer adds it) followed by BOT; ValueError naming it
    (`name`) when it is empty or too long for the model's context."""
    text = normalize_question(question) if isinstance(question, str) else ""
    if not text:
        raise ValueError(f"{name} is empty")
    tokens = model.tokenizer(text)["input_ids"] + [model.bot_id]
    if len(tokens) + N_THOUGHTS + 1 > model.max_positions:
        raise ValueError(f"{name} has {len(tokens) - 1} tokens; with BOT, six thoughts and EOT it exceeds the "
                         f"model's context of {model.max_positions} positions")
    return tokens


def tokenize_questions(model: CODIModel, questions: Sequence[str]) -> list[list[int]]:
    """question_tokens of each question; the error names the question's position k."""
    return [question_tokens(model, question, f"question {k}") for k, question in enumerate(questions)]


def decode_answer(model: CODIModel, ids: np.ndarray | Sequence[int]) -> str:
    """Decoded text of generated ids up to the stop token, special tokens and CODI's extra ids skipped."""
    keep = []
    for i in np.asarray(ids).tolist():
        if i < 0 or i in model.stop_ids:
            break
        if i < len(model.tokenizer):
            keep.append(i)
    return model.tokenizer.decode(keep, skip_special_tokens=True)


def number_tokens(model: CODIModel) -> torch.Tensor:
    """[V'] bool: tokens that can start an answer's number: decoded text with a digit, or a bare minus sign.
    Special tokens and CODI's extra ids (pad, BOT, EOT) are not."""
    tokenizer = model.tokenizer
    texts = tokenizer.batch_decode([[i] for i in range(len(tokenizer))])
    special = set(tokenizer.all_special_ids)

    def starts_number(text: str) -> bool:
        return any(c in "0123456789" for c in text) or text.strip() == "-"

    mask = torch.zeros(model.lm.get_output_embeddings().weight.shape[0], dtype=torch.bool)
    mask[: len(texts)] = torch.tensor([i not in special and starts_number(t) for i, t in enumerate(texts)])
    return mask.to(model.device)


def prefill_groups(lengths: Sequence[int], efficiency: float = PREFILL_EFFICIENCY) -> list[list[int]]:
    """Row indices grouped greedily by ascending length so that each group's real tokens are at least
    `efficiency` of its padded tokens (its size x its longest length); one group when the rows are that even."""
    groups: list[list[int]] = []
    total = 0
    for k in sorted(range(len(lengths)), key=lambda k: lengths[k]):
        if groups and total + lengths[k] >= efficiency * lengths[k] * (len(groups[-1]) + 1):
            groups[-1].append(k)
            total += lengths[k]
        else:
            groups.append([k])
            total = lengths[k]
    return groups


def consecutive_runs(rows: Sequence[int]) -> list[slice]:
    """`rows` (batch positions) as slices of consecutive positions, e.g. [0, 1, 2, 5, 6] -> [0:3, 5:7]."""
    runs: list[slice] = []
    for k in sorted(rows):
        if runs and runs[-1].stop == k:
            runs[-1] = slice(runs[-1].start, k + 1)
        else:
            runs.append(slice(k, k + 1))
    return runs


def decode_budget(model: CODIModel, prompt_len: int, max_new_tokens: int) -> int:
    """Tokens to decode after EOT: max_new_tokens, capped by the context. The prompt, six thoughts and EOT take
    positions 0 .. prompt_len + 6; the first token comes from EOT's logits, and each later one is read after its
    predecessor is fed at the next position, so the last of `budget` tokens needs prompt_len + 5 + budget to be a
    position of the model."""
    return max(0, min(max_new_tokens, model.max_positions - prompt_len - N_THOUGHTS))


@dataclass
class PrefillGroup:
    """What prefill hooks see as `batch`: one prefill group, rows of similar length left-padded to `width`."""

    model: CODIModel
    rows: np.ndarray  # [G] the problems' indices in the caller's list
    width: int
    lengths: torch.Tensor  # [G] real prompt tokens (BOT included) per row
    prompt_mask: torch.Tensor  # [G, width] 1 = real token
    phase: str = "prefill"

    def __len__(self) -> int:
        return len(self.rows)


class PaddedBatch:
    """KV-cached state of one left-padded batch, as hooks see it.

    rows: [B] the problems' indices in the caller's list; width: W, the prompt width (BOT at column W - 1,
    thought k's key at `key_column(k)`); lengths [B]: real prompt tokens per row; mask [B, S]: the attention mask
    so far (1 = attend); done [B] bool: rows that have emitted their stop token or their last allowed token
    (decode_limits); phase: the forward running ('prefill', 'thought.{k}', 'decode.{t}'). At most `budget` tokens
    are decoded (the shortest prompt's decode_budget); the cache reserves room after the
    prompt for the six thoughts, EOT and every decoded token but the last (which is never fed back), in the
    buffers `storage` keeps for `role` where given (codi_attn.kv_cache).
    """

    def __init__(self, model: CODIModel, token_ids: list[list[int]], max_new_tokens: int,
                 rows: Sequence[int] | None = None, preallocate: bool = True, storage: KVStorage | None = None,
                 role: str = "batch"):
        self.model = model
        width = max(map(len, token_ids))
        self.budget = decode_budget(model, min(map(len, token_ids)), max_new_tokens)  # the shortest prompt's
        dev = model.device
        self.rows = np.arange(len(token_ids)) if rows is None else np.asarray(rows)
        self.lengths = torch.tensor([len(t) for t in token_ids], device=dev)
        self.width = width
        ids = torch.full((len(token_ids), width), model.pad_id, dtype=torch.long, device=dev)
        for b, t in enumerate(token_ids):
            ids[b, width - len(t):] = torch.tensor(t, device=dev)
        self.input_ids = ids
        self.prompt_mask = (torch.arange(width, device=dev)[None] >= (width - self.lengths)[:, None]).long()
        self.mask = self.prompt_mask
        self.done = torch.zeros(len(token_ids), dtype=torch.bool, device=dev)
        self.phase = "prefill"
        self.view: PaddedBatch | PrefillGroup = self  # what hooks see: the batch, or the prefill group running
        # room reserved up front, written in place; without it (gradients: autograd cannot follow in-place writes
        # into tensors earlier steps read) a plain DynamicCache and a one-group prefill
        self.cache = preallocated_cache(model.lm.config, width + N_THOUGHTS + max(self.budget, 1), storage, role) \
            if preallocate else DynamicCache(config=model.lm.config)
        self.preallocate = preallocate
        # transformers renamed past_key_values to cache (5.2x); an unknown name would be swallowed silently
        self.cache_arg = "cache" if "cache" in inspect.signature(model.lm.base_model.forward).parameters \
            else "past_key_values"

    def __len__(self) -> int:
        return len(self.rows)

    def key_column(self, k: int) -> int:
        """Column of thought k's key in `mask` (and in the cache)."""
        return self.width + k - 1

    def prefill(self, hooks: Hooks | None = None) -> torch.Tensor:
        """Forward the questions + BOT and fill the cache; the last hidden state of each problem [B, d].

        Runs in groups of similar length (`prefill_groups`; a group whose rows are not consecutive in the batch
        runs as one forward per run of consecutive rows), each left-padded only to its own longest question
        (`view` is the group's `PrefillGroup` meanwhile). Each forward writes its keys and values straight into
        its rows of the batch cache, right-aligned at the batch width, zeros to their left (masked out in every
        later step; zeros, not garbage, so that no NaN can leak through a masked score): each problem still gets
        its batch-of-one result.
        """
        body, config = self.model.lm.base_model, self.model.lm.config
        lengths = self.lengths.tolist()
        groups = prefill_groups(lengths) if self.preallocate else [list(range(len(lengths)))]
        self.phase = "prefill"
        hidden = self.input_ids.new_empty(len(lengths), config.hidden_size, dtype=self.model.dtype)
        for group in groups:
            w = max(lengths[k] for k in group)
            for rows in consecutive_runs(group):
                mask = self.prompt_mask[rows, self.width - w:]
                self.view = PrefillGroup(self.model, self.rows[rows], w, self.lengths[rows], mask)
                cache = self.cache
                if self.preallocate:
                    cache = DynamicCache(config=config)
                    cache.layers = [layer.window(rows, self.width - w, len(lengths), self.width)
                                    for layer in self.cache.layers]
                ids = self.input_ids[rows, self.width - w:]
                tokens = {"input_ids": ids}
                if hooks is not None and hooks.get("prefill.embed"):  # [G, w, d] token embeddings: read or replace
                    tokens = {"inputs_embeds": hooks("prefill.embed", self.model.lm.get_input_embeddings()(ids),
                                                     self.view)}
                out = body(**tokens, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                           use_cache=True, **{self.cache_arg: cache})
                hidden[rows] = out.last_hidden_state[:, -1]
                if self.preallocate and w < self.width:
                    for layer in self.cache.layers:
                        for buffer in layer.buffers:
                            buffer[rows, ..., : self.width - w, :] = 0
        self.view = self
        return hidden

    def repeat(self, times: int, storage: KVStorage | None = None) -> "PaddedBatch":
        """A batch of `times` copies of this one's rows after the prefill (condition-major: copy c holds rows
        [c B, (c + 1) B)), with the prompt's keys and values copied into a cache of its own (in `storage` where
        given): for conditions that run stacked in one forward. Its room for decoding is small and grows if
        needed."""
        if not self.preallocate:
            raise RuntimeError("only a preallocated cache repeats")
        out = PaddedBatch.__new__(PaddedBatch)
        out.__dict__.update(self.__dict__)
        out.rows = np.tile(self.rows, times)
        out.lengths, out.input_ids = self.lengths.repeat(times), self.input_ids.repeat(times, 1)
        out.prompt_mask = out.mask = self.prompt_mask.repeat(times, 1)
        out.done = torch.zeros(len(out.rows), dtype=torch.bool, device=self.done.device)
        out.phase, out.view = "prefill", out
        out.cache = preallocated_cache(self.model.lm.config, self.width + N_THOUGHTS + min(max(self.budget, 1), 32),
                                       storage, "stacked")
        for mine, theirs in zip(out.cache.layers, self.cache.layers):
            mine.reserve(theirs.keys, len(out.rows), self.width)
            mine.keys.copy_(theirs.keys[..., : self.width, :].repeat(times, *[1] * (theirs.keys.dim() - 1)))
            mine.values.copy_(theirs.values[..., : self.width, :].repeat(times, *[1] * (theirs.values.dim() - 1)))
        return out

    def rewind(self) -> None:
        """Back to the state right after the prefill: the cache keeps the prompt, mask and done are reset."""
        if not self.preallocate:
            raise RuntimeError("only a preallocated cache rewinds")
        for layer in self.cache.layers:
            layer.rewind(self.width)
        self.mask, self.phase = self.prompt_mask, "prefill"
        self.done = torch.zeros_like(self.done)

    def decode_limits(self) -> torch.Tensor:
        """[B] tokens each row may decode: decode_budget of its own prompt (the batch's `budget` is the shortest
        prompt's), so that a row decodes as far as it would alone."""
        return torch.tensor([decode_budget(self.model, n, self.budget) for n in self.lengths.tolist()],
                            device=self.lengths.device)

    def forward(self, embeds: torch.Tensor, phase: str) -> torch.Tensor:
        """Run the body (no LM head) on one new position per problem, embeds [B, d]; its hidden state [B, d]."""
        self.phase = phase
        # the codi-spec position (BOT at length - 1, thought k at length - 1 + k, ...), never the mask's count of
        # visible keys: a mask hook hiding a thought or question columns from later queries moves no position
        # (capped at the last position: only a row past its own decode budget, whose output nobody reads, gets there)
        positions = (self.lengths + (self.mask.shape[1] - self.width)).clamp(max=self.model.max_positions - 1)[:, None]
        self.mask = torch.cat([self.mask, torch.ones_like(self.mask[:, :1])], dim=1)
        out = self.model.lm.base_model(inputs_embeds=embeds[:, None], attention_mask=self.mask,
                                       position_ids=positions, use_cache=True, **{self.cache_arg: self.cache})
        if self.cache.get_seq_length() != self.mask.shape[1]:
            raise RuntimeError(f"the KV cache holds {self.cache.get_seq_length()} positions, expected "
                               f"{self.mask.shape[1]}: this transformers version did not use it")
        return out.last_hidden_state[:, -1]


class RowView:
    """What the hooks of one stacked condition see as `batch`: rows [start, start + B) of a stacked batch."""

    def __init__(self, batch: "PaddedBatch", start: int, size: int):
        self._batch, self._rows = batch, slice(start, start + size)
        self.rows, self.model, self.width, self.budget = batch.rows[self._rows], batch.model, batch.width, batch.budget
        self.lengths, self.prompt_mask = batch.lengths[self._rows], batch.prompt_mask[self._rows]
        self.view = self

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def phase(self) -> str:
        return self._batch.phase

    @property
    def mask(self) -> torch.Tensor:
        return self._batch.mask[self._rows]

    @property
    def done(self) -> torch.Tensor:
        return self._batch.done[self._rows]

    def key_column(self, k: int) -> int:
        return self._batch.key_column(k)


class Stack:
    """The conditions that run together in one forward: (hooks, view) per condition, each condition owning the
    rows of its view. A point's value is handed to each condition's hooks as its own rows, replacements written
    back into those rows."""

    def __init__(self, members: Sequence[tuple[Hooks, "PaddedBatch | RowView | PrefillGroup"]]):
        self.members = list(members)

    def get(self, name: str) -> bool:
        return any(hooks.get(name) for hooks, _ in self.members)

    def __call__(self, name: str, value: torch.Tensor, batch=None) -> torch.Tensor:
        if len(self.members) == 1:  # the whole batch is one condition's
            hooks, view = self.members[0]
            return hooks(name, value, batch if batch is not None else view)
        out = value
        for hooks, view in self.members:
            if not hooks.get(name):
                continue
            part = out[view._rows]
            new = hooks(name, part, view)
            if new is not part:
                if out is value:
                    out = value.clone()
                out[view._rows] = new
        return out

    def flush(self) -> None:
        for hooks, view in self.members:
            hooks.flush(view)


# ------------------------------------------------------------------------------------------------ the runner


@dataclass
class Generation:
    """What one run decoded for N problems, in the caller's order."""

    tokens: np.ndarray  # [N, G] int64: generated ids, -1 after the stop token (G = the longest budget)
    text: list[str]  # decoded answer text (special tokens skipped)
    prediction: np.ndarray  # [N] float64: the last number in the text, nan where there is none


@contextmanager
def attention_implementation(lm, name: str) -> Iterator[None]:
    """Temporarily switch the HF model's attention kernel (e.g. to eager, which returns weights)."""
    before = lm.config._attn_implementation
    lm.set_attn_implementation(name)
    try:
        yield
    finally:
        lm.set_attn_implementation(before)


def layer_module(model: CODIModel, kind: str, layer: int) -> nn.Module:
    """The module whose hook gives `kind` at `layer`: the block ('resid'), its attention ('attn') or the attention
    output projection, whose input holds the per-head outputs ('head_in'; codi-spec trap 4)."""
    family = FAMILIES.get(model.family)
    if family is None:
        raise ValueError(f"hook points support {', '.join(FAMILIES)} models, not {model.family!r}")
    module = getattr(model.lm.base_model, family.blocks)[layer]
    path = {"resid": "", "attn": family.attention, "head_in": family.out_proj}[kind]
    for name in filter(None, path.split(".")):
        module = getattr(module, name)
    return module


def head_dim(model: CODIModel) -> int:
    """d_head: the output projection's input width over the number of query heads."""
    proj = layer_module(model, "head_in", 0)
    width = getattr(proj, "in_features", None) or getattr(proj, "nx", None)
    if width is None or width % model.n_heads:
        raise ValueError(f"cannot split the output projection's input ({width}) into {model.n_heads} heads")
    return width // model.n_heads


def stack_for(batch_size: int, rows: int = CONDITION_ROWS) -> int:
    """How many conditions to stack so that one forward has about `rows` rows (at least 1; rows 0: no stacking)."""
    return max(1, rows // batch_size) if rows > 0 else 1


class Runner:
    """Batched CODI latent inference with named hook points (see the module docstring).

    runner = Runner(model, batch_size=16, max_new_tokens=256)
    generation = runner.run(questions, hooks=[capture, ablate])

    stack=S runs up to S conditions of `run_conditions` together, in one forward over S copies of a batch's rows
    (each condition's hooks see only its copy): the same results to rounding, and faster where one forward
    does not fill the machine (small models, GPUs). Memory: the KV cache of S x batch_size rows.

    gradients=True runs with autograd on (and a plain DynamicCache, every condition with its own prefill): hooks
    may make a point's value a leaf that requires grad and differentiate a later value with respect to it, e.g.
    in `flush` (attribution patching). It needs PyTorch's linear layers (`load_codi(..., prepack=False)`).
    """

    def __init__(self, model: CODIModel, batch_size: int = 16, max_new_tokens: int = 256, gradients: bool = False,
                 stack: int = 1):
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be 0 or more, got {max_new_tokens}")
        if gradients and "prepacked" in str(model.source.get("linear", "")):
            raise ValueError("gradients need PyTorch's linear layers, and this model's are oneDNN-prepacked "
                             "(inference only): load it with load_codi(..., prepack=False)")
        if stack < 1:
            raise ValueError(f"stack must be 1 or more, got {stack}")
        self.model, self.batch_size, self.max_new_tokens = model, batch_size, max_new_tokens
        self.gradients, self.stack = gradients, stack
        self._names = point_names(model.n_layers, max_new_tokens)
        self._d_head = head_dim(model)

    def batches(self, questions: Sequence[str]) -> list[tuple[list[int], list[list[int]]]]:
        """(rows, token ids) of each batch: problems sorted by length (less padding), batch_size at a time."""
        token_ids = tokenize_questions(self.model, questions)
        order = sorted(range(len(token_ids)), key=lambda k: len(token_ids[k]))
        return [(rows, [token_ids[k] for k in rows])
                for rows in (order[s: s + self.batch_size] for s in range(0, len(order), self.batch_size))]

    def run(self, questions: Sequence[str], hooks: Iterable = (), progress: Callable[[int], None] | None = None,
            checkpoints=None, name: str = "batch") -> Generation:
        """CODI inference on `questions` with `hooks`; `progress(k)` after each batch of k problems; `checkpoints`
        and `name` as in `run_conditions`."""
        return self.run_conditions(questions, [hooks], progress, checkpoints, name)[0]

    def run_conditions(self, questions: Sequence[str], conditions: Sequence[Iterable],
                       progress: Callable[[int], None] | None = None, checkpoints=None, name: str = "batch"
                       ) -> list[Generation]:
        """Run every hook set of `conditions` on the same batches; one Generation per condition.

        Per batch the prefill runs once for all conditions without prefill hooks, the cache rewound to the
        prompt before each; a condition with prefill hooks gets a prefill of its own.
        `checkpoints` (codi_attn.checkpoints.Checkpoints): each finished batch's tokens and the hooks' `recorded`
        rows are saved there as `{name}-{i}`, and a batch found there is restored instead of run.
        """
        conditions = [list(c) for c in conditions]
        conds = [Hooks(c, self._names) for c in conditions]
        if checkpoints is not None:
            unsaved = [h for c in conditions for h in c if not isinstance(h, Hook) or h.recorded is None]
            if unsaved:
                raise ValueError(f"a checkpointed run saves the `recorded` arrays of Hook objects; {unsaved[0]!r} "
                                 "keeps state that cannot be saved batch by batch")
        n = len(questions)
        tokens: list[list[list[int]]] = [[[] for _ in range(n)] for _ in conds]
        own = [c for c, hooks in enumerate(conds) if hooks.prefill_layers or self.gradients]  # a prefill of its own
        shared_ones = [c for c in range(len(conds)) if c not in set(own)]
        stacks = [shared_ones[i: i + self.stack] for i in range(0, len(shared_ones), self.stack)]
        grad_mode = torch.enable_grad() if self.gradients else torch.inference_mode()
        with grad_mode, attention_implementation(self.model.lm, self.model.attention), self._module_hooks(conds), \
                kv_storage(self.model.lm).lease() as storage:  # the model's kernel, even in a run started by a hook
            for b, (rows, ids) in enumerate(self.batches(questions)):
                saved = None if checkpoints is None else checkpoints.load(f"{name}-{b}")
                if saved is not None and saved["rows"] == rows:
                    for c, hooks in enumerate(conditions):
                        for k, row in zip(rows, saved["tokens"][c]):
                            tokens[c][k] = row
                        for hook, state in zip(hooks, saved["recorded"][c]):
                            hook.restore(rows, state)
                else:
                    self._run_batch(rows, ids, conds, own, stacks, tokens, storage)
                    if checkpoints is not None:
                        checkpoints.save(f"{name}-{b}", {
                            "rows": rows, "tokens": [[t[k] for k in rows] for t in tokens],
                            "recorded": [[hook.snapshot(rows) for hook in hooks] for hooks in conditions]})
                if progress is not None:
                    progress(len(rows))
        return [self._generation(t) for t in tokens]

    def _run_batch(self, rows: list[int], ids: list[list[int]], conds: list[Hooks], own: list[int],
                   stacks: list[list[int]], tokens: list[list[list[int]]], storage: KVStorage) -> None:
        """One batch through every condition: those of `own` each on a prefill of its own, the others on one shared
        prefill, `stacks` of them at a time; the generated ids go to tokens[condition][row]; the caches are
        written into `storage`."""
        for c in own:
            batch = PaddedBatch(self.model, ids, self.max_new_tokens, rows, preallocate=not self.gradients,
                                storage=storage, role="own")
            stack = Stack([(conds[c], batch)])
            self._active, self._batch = stack, batch
            self._run(batch, batch.prefill(conds[c]), stack, [c], tokens)
        shared, fresh = None, True
        for group in stacks:
            if shared is None:
                shared = PaddedBatch(self.model, ids, self.max_new_tokens, rows, storage=storage, role="shared")
                self._active, self._batch = Stack([(NO_HOOKS, shared)]), shared
                shared_bot = shared.prefill()
            if len(group) == 1:
                if not fresh:
                    shared.rewind()
                batch, bot, fresh = shared, shared_bot.clone(), False
                stack = Stack([(conds[group[0]], shared)])
            else:
                batch, bot = shared.repeat(len(group), storage), shared_bot.repeat(len(group), 1)
                stack = Stack([(conds[c], RowView(batch, i * len(rows), len(rows))) for i, c in enumerate(group)])
            self._active, self._batch = stack, batch
            self._run(batch, bot, stack, group, tokens)

    def _run(self, batch: PaddedBatch, bot: torch.Tensor, stack: Stack, group: list[int],
             tokens: list[list[list[int]]]) -> None:
        """The thoughts and the decoding of one (stacked) batch; each condition's generated ids into tokens."""
        generated = self._thoughts_and_decoding(batch, bot, stack).cpu().numpy()
        stack.flush()
        size = len(generated) // len(group)
        for i, c in enumerate(group):
            for k, row in zip(batch.rows[i * size: (i + 1) * size], generated[i * size: (i + 1) * size]):
                tokens[c][k] = row.tolist()

    def _generation(self, tokens: list[list[int]]) -> Generation:
        width = max(map(len, tokens), default=0)  # budgets can differ between batches (context left)
        ids = np.array([t + [-1] * (width - len(t)) for t in tokens], dtype=np.int64).reshape(len(tokens), width)
        text = [decode_answer(self.model, row) for row in ids]
        parsed = [parse_answer(t) for t in text]
        return Generation(ids, text, np.array([math.nan if p is None else p for p in parsed], dtype=np.float64))

    def _thoughts_and_decoding(self, batch: PaddedBatch, bot: torch.Tensor, stack: Stack) -> torch.Tensor:
        model = self.model

        def dispatch(name: str, value: torch.Tensor) -> torch.Tensor:
            return stack(name, value)

        def thought(z: torch.Tensor, k: int) -> torch.Tensor:
            hidden = batch.forward(z, f"thought.{k}")
            batch.mask = dispatch(f"thought.{k}.mask", batch.mask)
            return hidden

        padding = batch.width - int(batch.lengths.min())  # the widest left padding: may windows pay?
        with attention_implementation(model.lm, windowed_implementation(model.lm, "eager", padding)):
            thought_steps(model.prj, thought, dispatch("prefill", bot), dispatch)
        if not batch.budget:  # no room to decode: EOT would yield logits nobody reads
            return torch.zeros(len(batch), 0, dtype=torch.long)
        embed, head = model.lm.get_input_embeddings(), model.lm.get_output_embeddings()

        def feed(token: torch.Tensor, t: int) -> torch.Tensor:
            return head(batch.forward(embed(token), f"decode.{t}"))

        with attention_implementation(model.lm, windowed_implementation(model.lm, model.attention, padding)):
            logits = feed(torch.full((len(batch),), model.eot_id, device=model.device), 0)
            return greedy_steps(logits, feed, batch.budget, model.stop_ids, model.eot_id, dispatch, batch.done,
                                batch.decode_limits())

    # ---- per-layer points: module hooks that dispatch to the current condition's hooks at the current phase

    @contextmanager
    def _module_hooks(self, conds: list[Hooks]) -> Iterator[None]:
        handles, running = [], _RUNNING.setdefault(self.model.lm, [])
        running.append(self)
        try:
            for kind in LAYER_KINDS:
                for layer in range(self.model.n_layers):
                    if not any((kind, layer) in c.layer_sites for c in conds):
                        continue
                    module = layer_module(self.model, kind, layer)
                    if kind == "head_in":
                        handles.append(module.register_forward_pre_hook(self._head_in_hook(layer)))
                    else:
                        handles.append(module.register_forward_hook(self._output_hook(kind, layer)))
            yield
        finally:
            for handle in handles:
                handle.remove()
            running.remove(self)

    def _head_in_hook(self, layer: int):
        running = _RUNNING[self.model.lm]

        def hook(module: nn.Module, args: tuple):
            name = f"{self._batch.phase}.head_in.{layer}"
            if running[-1] is not self or not self._active.get(name):
                return None
            x = args[0]  # [B, S, H * dh]
            b, s = x.shape[:2]
            heads = x.view(b, s, self.model.n_heads, self._d_head)
            value = heads if self._batch.phase == "prefill" else heads[:, -1]
            out = self._active(name, value, self._batch.view)
            if out is value:
                return None
            return (out.reshape(b, s, -1), *args[1:])

        return hook

    def _output_hook(self, kind: str, layer: int):
        running = _RUNNING[self.model.lm]

        def hook(module: nn.Module, args: tuple, output):
            name = f"{self._batch.phase}.{kind}.{layer}"
            if running[-1] is not self or not self._active.get(name):
                return None
            if kind == "attn":
                weights = output[1] if isinstance(output, tuple) and len(output) > 1 else None
                if weights is None:
                    raise RuntimeError("the attention kernel returned no weights (codi-spec trap 2): eager "
                                       "attention must be in effect for the thought steps")
                self._active(name, weights[:, :, -1, :], self._batch.view)
                return None
            hidden = output[0] if isinstance(output, tuple) else output  # [B, S, d]
            value = hidden if self._batch.phase == "prefill" else hidden[:, -1]
            out = self._active(name, value, self._batch.view)
            if out is value:
                return None
            if self._batch.phase != "prefill":
                out = torch.cat([hidden[:, :-1], out[:, None]], dim=1)
            return (out, *output[1:]) if isinstance(output, tuple) else out

        return hook
