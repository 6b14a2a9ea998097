"""Batched CODI latent inference (codi-spec section 3) that captures the 6x6 attention between thoughts.

Per batch: the prefill of the left-padded questions + BOT (sdpa, body only, no LM head; run in groups of
similar length so that little compute goes to padding, the groups' caches joined at the batch width); six
latent steps of one position each, under eager attention with `output_attentions`, so each layer returns
just the one query row [B, H, 1, S] of that thought, which is reduced at once to the 6x6 entries and the
mass split; then EOT and greedy decoding (sdpa, LM head on the last position only). The KV cache writes
each new position into room reserved up front instead of copying itself at every step.
Left padding with a 2-D attention mask and per-problem position ids makes every problem's result
equal its batch-of-one result (codi-spec trap 8).
"""
from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager as ContextManager
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import numpy as np
import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from codi_attn.answers import is_correct, normalize_question, parse_answer, parse_gold
from codi_attn.model import CODIModel

N_LATENTS = 6
MASS_PARTS = ("sink", "question", "bot", "latents")
PREFILL_EFFICIENCY = 0.95  # each prefill group's real tokens are at least this share of its padded tokens


@dataclass
class Extraction:
    """Results for N problems, in input order."""

    attention: np.ndarray  # [N, L, H, 6, 6] float32: A[n, l, h, i, j], query thought i -> key thought j
    mass: np.ndarray  # [N, L, H, 6, 4] float32: each thought row's mass on sink, question, BOT, latents
    text: list[str]  # decoded answer text
    prediction: np.ndarray  # [N] float64, nan where the text has no number
    correct: np.ndarray  # [N] bool
    latents: np.ndarray | None = None  # [N, 6, d] float32, the fed vectors z1..z6 (keep_latents)
    thought_hidden: np.ndarray | None = None  # [N, 6, d] float32, final-norm hidden state at z1..z6 (keep_latents)
    first_logits: np.ndarray | None = None  # [N, V+3] float32, logits of the first token after EOT (keep_logits)
    answer_logits: np.ndarray | None = None  # [N, V+3] float32, logits at answer_step (keep_logits)
    answer_step: np.ndarray | None = None  # [N] int: step of answer_logits; -1: no number came / step not reached
    tokens: np.ndarray | None = None  # [N, G] int: the generated ids, -1 after the stop token (keep_logits)


def number_tokens(model: CODIModel) -> torch.Tensor:
    """[V+3] bool: tokens that can start an answer's number: decoded text with a digit, or a bare minus sign.
    Special tokens and CODI's extra ids (pad, BOT, EOT) are not."""
    tokenizer = model.tokenizer
    texts = tokenizer.batch_decode([[i] for i in range(len(tokenizer))])
    special = set(tokenizer.all_special_ids)

    def starts_number(text: str) -> bool:
        return any(c in "0123456789" for c in text) or text.strip() == "-"

    mask = torch.zeros(model.lm.get_output_embeddings().weight.shape[0], dtype=torch.bool)
    mask[: len(texts)] = torch.tensor([i not in special and starts_number(t) for i, t in enumerate(texts)])
    return mask.to(model.device)


def tokenize_questions(model: CODIModel, questions: list[str]) -> list[list[int]]:
    """Token ids of each normalised question (BOS as the tokenizer adds it) followed by BOT."""
    ids = []
    for k, question in enumerate(questions):
        text = normalize_question(question) if isinstance(question, str) else ""
        if not text:
            raise ValueError(f"question {k} is empty")
        tokens = model.tokenizer(text)["input_ids"] + [model.bot_id]
        if len(tokens) + N_LATENTS + 1 > model.max_positions:
            raise ValueError(f"question {k} has {len(tokens) - 1} tokens; with BOT, six latents and EOT it "
                             f"exceeds the model's context of {model.max_positions} positions")
        ids.append(tokens)
    return ids


@contextmanager
def attention_implementation(lm, name: str) -> Iterator[None]:
    """Temporarily switch the HF model's attention kernel (e.g. to eager, which returns weights)."""
    before = lm.config._attn_implementation
    lm.set_attn_implementation(name)
    try:
        yield
    finally:
        lm.set_attn_implementation(before)


class PreallocatedLayer(DynamicLayer):
    """A DynamicLayer that writes new positions into buffers of `capacity` positions reserved at the first update.

    transformers' DynamicLayer concatenates (copies) the whole cache at every step; with a few hundred prompt
    positions and one new position per latent or decode step, that copy dominated those steps on CPU.
    `keys`/`values` are views of the used part, so everything that reads the cache sees a DynamicLayer.
    The buffers grow (one copy) if a batch needs more than `capacity` positions.
    """

    def __init__(self, capacity: int):
        super().__init__()
        self.capacity, self.used = capacity, 0
        self.buffers: tuple[torch.Tensor, torch.Tensor] | None = None

    def _unsupported(self, *args, **kwargs):
        raise NotImplementedError("PreallocatedLayer only appends positions (crop, reset and batch reordering "
                                  "would leave its buffers stale)")

    crop = reset = batch_repeat_interleave = batch_select_indices = _unsupported

    def reserve(self, like: torch.Tensor, batch: int, length: int) -> None:
        """Start with `length` positions of uninitialised keys and values for `batch` rows, with the heads,
        head size, dtype and device of `like` [*, H, *, D]: the caller fills them in place through `keys` /
        `values` (no zero-filled copy of the whole width)."""
        self.lazy_initialization(like, like)
        shape = (batch, *like.shape[1:-2], max(self.capacity, length), like.shape[-1])
        self.buffers = (like.new_empty(shape), like.new_empty(shape))
        self.used = length
        self.keys, self.values = (buffer[..., :length, :] for buffer in self.buffers)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if self.buffers is None:
            self.reserve(key_states, key_states.shape[0], 0)
        n = key_states.shape[-2]
        if self.used + n > self.buffers[0].shape[-2]:
            size = 2 * (self.used + n)
            grown = tuple(t.new_empty(*t.shape[:-2], size, t.shape[-1]) for t in self.buffers)
            for new, old in zip(grown, self.buffers):
                new[..., : self.used, :] = old[..., : self.used, :]
            self.buffers = grown
        for buffer, new in zip(self.buffers, (key_states, value_states)):
            buffer[..., self.used: self.used + n, :] = new
        self.used += n
        self.keys, self.values = (buffer[..., : self.used, :] for buffer in self.buffers)
        return self.keys, self.values


def preallocated_cache(config, capacity: int) -> DynamicCache:
    """A DynamicCache for `config` whose layers reserve `capacity` positions (`PreallocatedLayer`)."""
    cache = DynamicCache(config=config)
    kinds = {type(layer).__name__ for layer in cache.layers}
    if kinds != {"DynamicLayer"}:  # e.g. sliding windows, which drop old keys: the join would misalign
        raise NotImplementedError(f"{config.model_type} asks for KV cache layers {sorted(kinds)}; the extractor "
                                  "supports full-attention models (plain DynamicLayer) only")
    cache.layers = [PreallocatedLayer(capacity) for _ in cache.layers]
    return cache


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


def decode_budget(model: CODIModel, prompt_len: int, max_new_tokens: int) -> int:
    """Tokens to decode after EOT: max_new_tokens, capped by the context left after the latents and EOT."""
    return max(0, min(max_new_tokens, model.max_positions - prompt_len - N_LATENTS - 1))


class PaddedBatch:
    """KV-cached state of one left-padded batch: attention mask and next position of each problem.

    `budget` (`decode_budget` of the longest prompt) tokens are decoded; the cache reserves room after the
    prompt for the six latents, EOT and every decoded token but the last (which is never fed back).
    """

    def __init__(self, model: CODIModel, token_ids: list[list[int]], max_new_tokens: int):
        self.model = model
        width = max(map(len, token_ids))
        self.budget = decode_budget(model, width, max_new_tokens)
        dev = model.device
        self.lengths = torch.tensor([len(t) for t in token_ids], device=dev)
        self.width = width  # P: BOT sits at P-1 and latent k at P+k in every row
        ids = torch.full((len(token_ids), width), model.pad_id, dtype=torch.long, device=dev)
        for b, t in enumerate(token_ids):
            ids[b, width - len(t):] = torch.tensor(t, device=dev)
        self.input_ids = ids
        self.mask = (torch.arange(width, device=dev)[None] >= (width - self.lengths)[:, None]).long()
        self.cache = preallocated_cache(model.lm.config, width + N_LATENTS + max(self.budget, 1))
        # transformers renamed past_key_values to cache (5.2x); an unknown name would be swallowed silently
        self.cache_arg = "cache" if "cache" in inspect.signature(model.lm.base_model.forward).parameters \
            else "past_key_values"

    def prefill(self) -> torch.Tensor:
        """Forward the questions + BOT and fill the cache; the last hidden state of each problem [B, d].

        Runs in groups of similar length (`prefill_groups`), each left-padded only to its own longest question,
        and writes each group's keys and values into the batch cache at the batch width, zeros to their left
        (masked out in every later step; zeros, not garbage, so that no NaN can leak through a masked score):
        each problem still gets its batch-of-one result.
        """
        body, config = self.model.lm.base_model, self.model.lm.config
        lengths = self.lengths.tolist()
        groups = prefill_groups(lengths)
        if len(groups) == 1:  # already even: one forward straight into the batch cache, rows in batch order
            groups = [list(range(len(lengths)))]
        hidden = self.input_ids.new_empty(len(lengths), config.hidden_size, dtype=self.model.dtype)
        for group in groups:
            index = torch.tensor(group, device=self.input_ids.device)
            w = max(lengths[k] for k in group)
            mask = self.mask[index, self.width - w:]
            cache = self.cache if len(groups) == 1 else DynamicCache(config=config)
            out = body(input_ids=self.input_ids[index, self.width - w:], attention_mask=mask,
                       position_ids=(mask.cumsum(-1) - 1).clamp(min=0), use_cache=True, **{self.cache_arg: cache})
            hidden[index] = out.last_hidden_state[:, -1]
            if len(groups) == 1:
                break
            pad = self.width - w
            for joined, part in zip(self.cache.layers, cache.layers):
                if not joined.is_initialized:
                    joined.reserve(part.keys, len(lengths), self.width)
                for whole, piece in ((joined.keys, part.keys), (joined.values, part.values)):
                    whole[index, ..., pad:, :] = piece  # views of the buffers: written in place
                    if pad:
                        whole[index, ..., :pad, :] = 0
        return hidden

    def forward(self, embeds: torch.Tensor, attentions: bool = False):
        """Run the body (no LM head) on one new position per problem, embeds [B, d]."""
        body = self.model.lm.base_model
        positions = self.mask.sum(-1, keepdim=True)
        self.mask = torch.cat([self.mask, torch.ones_like(self.mask[:, :1])], dim=1)
        out = body(inputs_embeds=embeds[:, None], attention_mask=self.mask, position_ids=positions,
                   use_cache=True, output_attentions=attentions, **{self.cache_arg: self.cache})
        if self.cache.get_seq_length() != self.mask.shape[1]:
            raise RuntimeError(f"the KV cache holds {self.cache.get_seq_length()} positions, expected "
                               f"{self.mask.shape[1]}: this transformers version did not use it")
        return out


def _thought_rows(attentions: tuple[torch.Tensor, ...], batch: PaddedBatch, step: int, n_layers: int):
    """Reduce one latent step's rows to (6x6 row entries [B, L, H, step+1], mass split [B, L, H, 4])."""
    if attentions is None or len(attentions) != n_layers or any(a is None for a in attentions):
        raise RuntimeError("the attention kernel returned no weights (codi-spec trap 2): eager attention must "
                           "be in effect for the latent steps")
    rows = torch.stack([a[:, :, -1, :].float() for a in attentions], dim=1)  # [B, L, H, S]
    p = batch.width
    first = (p - batch.lengths).view(-1, 1, 1, 1).expand(-1, rows.shape[1], rows.shape[2], 1)
    sink = rows.gather(-1, first)[..., 0]
    question = rows[..., : p - 1].sum(-1) - sink  # pads get exactly 0 weight under the mask
    bot = rows[..., p - 1]
    latent = rows[..., p: p + step + 1]
    return latent, torch.stack([sink, question, bot, latent.sum(-1)], dim=-1)


@torch.inference_mode()
def _run_batch(model: CODIModel, token_ids: list[list[int]], max_new_tokens: int,
               blocked_latents: Sequence[int], latent_context: Callable[[], ContextManager],
               fed: torch.Tensor | None = None, answer_at: torch.Tensor | None = None) -> dict:
    """Latent inference for one batch: attention [B,L,H,6,6], mass [B,L,H,6,4], generated ids, latents, logits.
    fed [B, 6, d]: latents fed instead of prj(h). answer_at (logits are returned only with it): [B] decode
    steps whose logits to keep, or a [V+3] bool mask of number tokens: keep them where the first one comes."""
    lm, n_layers = model.lm, model.n_layers
    batch = PaddedBatch(model, token_ids, max_new_tokens)
    budget = batch.budget
    n = len(token_ids)
    attention = torch.zeros(n, n_layers, model.n_heads, N_LATENTS, N_LATENTS, device=model.device)
    mass = torch.zeros(n, n_layers, model.n_heads, N_LATENTS, len(MASS_PARTS), device=model.device)
    latents, thought_hidden = [], []

    hidden = batch.prefill()
    with attention_implementation(lm, "eager"), latent_context():
        for step in range(N_LATENTS):
            z = model.prj(hidden) if fed is None else fed[:, step]
            latents.append(z)
            out = batch.forward(z, attentions=True)
            row, split = _thought_rows(out.attentions, batch, step, n_layers)
            attention[:, :, :, step, : step + 1] = row
            mass[:, :, :, step] = split
            hidden = out.last_hidden_state[:, -1]
            thought_hidden.append(hidden)
            if step in blocked_latents:  # later queries get exactly zero weight on this key (trap 3)
                batch.mask[:, batch.width + step] = 0

    embed = lm.get_input_embeddings()
    stop = torch.tensor(model.stop_ids, device=model.device)
    generated = torch.full((n, budget), -1, dtype=torch.long, device=model.device)
    done = torch.zeros(n, dtype=torch.bool, device=model.device)
    hidden = batch.forward(embed(torch.full((n,), model.eot_id, device=model.device))).last_hidden_state[:, -1]

    def next_logits(hidden: torch.Tensor) -> torch.Tensor:
        logits = lm.get_output_embeddings()(hidden).float()
        logits[:, model.eot_id] = -math.inf  # the original decoder excludes only EOT
        return logits

    first_logits = next_logits(hidden)
    if answer_at is not None:
        answer_logits = torch.full_like(first_logits, math.nan)
        answer_step = torch.full((n,), -1, dtype=torch.long, device=model.device)
    for t in range(budget):
        logits = first_logits if t == 0 else next_logits(hidden)
        token = logits.argmax(-1)
        generated[:, t] = torch.where(done, -1, token)
        if answer_at is not None:
            keep = ~done & (answer_at[token] & (answer_step < 0) if answer_at.dtype == torch.bool else answer_at == t)
            answer_logits[keep], answer_step[keep] = logits[keep], t
        done |= torch.isin(token, stop)
        if bool(done.all()) or t == budget - 1:
            break
        hidden = batch.forward(embed(token)).last_hidden_state[:, -1]

    def host(tensors: list[torch.Tensor]) -> np.ndarray:
        return torch.stack(tensors, dim=1).float().cpu().numpy()

    out = {"attention": attention.cpu().numpy(), "mass": mass.cpu().numpy(), "generated": generated.cpu().numpy(),
           "latents": host(latents), "thought_hidden": host(thought_hidden)}
    if answer_at is not None:  # [B, V+3] each: copied to the host only when asked for
        out.update(first_logits=first_logits.cpu().numpy(), answer_logits=answer_logits.cpu().numpy(),
                   answer_step=answer_step.cpu().numpy())
    return out


def decode_answer(model: CODIModel, ids: np.ndarray) -> str:
    """Decoded text of generated ids up to the stop token, special tokens and CODI's extra ids skipped."""
    keep = []
    for i in ids.tolist():
        if i < 0 or i in model.stop_ids:
            break
        if i < len(model.tokenizer):
            keep.append(i)
    return model.tokenizer.decode(keep, skip_special_tokens=True)


def extract(model: CODIModel, questions: list[str], golds: list[str] | None = None, batch_size: int = 16,
            max_new_tokens: int = 256, progress: Callable[[int], None] | None = None,
            keep_latents: bool = False, keep_logits: bool = False, blocked_latents: Sequence[int] = (),
            latent_context: Callable[[], ContextManager] = nullcontext,
            fed_latents: np.ndarray | None = None, answer_steps: np.ndarray | None = None) -> Extraction:
    """Run CODI latent inference on `questions` and capture the six thoughts' attention.

    Problems are batched by length (less padding); results come back in input order.
    `golds` are GSM8K answers ('#### N' or the number); `progress(k)` is called after each batch of k.
    Interventions for causal checks: `blocked_latents` (0-based thoughts whose keys later queries may not
    attend, through the attention mask) and `latent_context` (a context entered around the six latent steps
    only, e.g. hooks that ablate heads there) and `fed_latents` [N, 6, d] (fed as z1..z6 instead of
    prj(h), e.g. another problem's thoughts; attention is still captured).
    keep_logits also keeps the generated ids and the logits at each problem's answer token: where its number
    starts (the first generated token with a digit, or a bare minus sign; step -1 and nan logits where none
    comes), or at the decode steps `answer_steps` [N] (e.g. a baseline's, to compare an intervention's logits
    at the same position; -1 for none).
    """
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if any(k not in range(N_LATENTS) for k in blocked_latents):
        raise ValueError(f"blocked_latents must be thoughts 0..5, got {list(blocked_latents)}")
    token_ids = tokenize_questions(model, questions)
    if fed_latents is not None:
        fed_latents = np.asarray(fed_latents)
        want = (len(questions), N_LATENTS, model.lm.config.hidden_size)
        if fed_latents.shape != want:
            raise ValueError(f"fed_latents must have shape {want} (problems, thoughts, hidden size), "
                             f"got {fed_latents.shape}")
    if answer_steps is not None and not keep_logits:
        raise ValueError("answer_steps needs keep_logits=True (they say where to keep logits)")
    if answer_steps is not None and np.shape(answer_steps) != (len(questions),):
        raise ValueError(f"answer_steps must have one step per question, shape ({len(questions)},), "
                         f"got {np.shape(answer_steps)}")
    numbers = number_tokens(model) if keep_logits and answer_steps is None else None
    order = sorted(range(len(token_ids)), key=lambda k: len(token_ids[k]))
    n = len(token_ids)
    parts: dict[str, np.ndarray] = {}
    texts = [""] * n
    tokens: list[list[int]] = [[] for _ in range(n)]
    for start in range(0, n, batch_size):
        idx = order[start: start + batch_size]
        fed = None if fed_latents is None else torch.as_tensor(fed_latents[idx], dtype=model.dtype,
                                                               device=model.device)
        answer_at = numbers if answer_steps is None else \
            torch.as_tensor(np.asarray(answer_steps)[idx], dtype=torch.long, device=model.device)
        out = _run_batch(model, [token_ids[k] for k in idx], max_new_tokens, tuple(blocked_latents), latent_context,
                         fed, answer_at)
        wanted = (("attention", "mass") + ("latents", "thought_hidden") * keep_latents
                  + ("first_logits", "answer_logits", "answer_step") * keep_logits)
        for name in wanted:
            if name not in parts:
                parts[name] = np.zeros((n, *out[name].shape[1:]), out[name].dtype)
            parts[name][idx] = out[name]
        for k, ids in zip(idx, out["generated"]):
            texts[k], tokens[k] = decode_answer(model, ids), ids.tolist()
        if progress is not None:
            progress(len(idx))
    if keep_logits:  # decode budgets can differ between batches (context left): pad with -1 to the longest
        width = max(map(len, tokens), default=0)
        parts["tokens"] = np.array([t + [-1] * (width - len(t)) for t in tokens], dtype=np.int64).reshape(n, width)
    parsed = [parse_answer(t) for t in texts]
    prediction = np.array([math.nan if p is None else p for p in parsed], dtype=np.float64)
    gold = [parse_gold(g) for g in golds] if golds is not None else [None] * n
    correct = np.array([is_correct(p, g) for p, g in zip(parsed, gold)], dtype=bool)
    return Extraction(parts["attention"], parts["mass"], texts, prediction, correct, latents=parts.get("latents"),
                      thought_hidden=parts.get("thought_hidden"), first_logits=parts.get("first_logits"),
                      answer_logits=parts.get("answer_logits"), answer_step=parts.get("answer_step"),
                      tokens=parts.get("tokens"))
