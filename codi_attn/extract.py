"""Batched CODI latent inference (codi-spec section 3) that captures the 6x6 attention between thoughts.

Per batch: one prefill over the left-padded questions + BOT (sdpa, body only, no LM head); six latent
steps of one position each, under eager attention with `output_attentions`, so each layer returns
just the one query row [B, H, 1, S] of that thought, which is reduced at once to the 6x6 entries and the
mass split; then EOT and greedy decoding (sdpa, LM head on the last position only).
Left padding with a 2-D attention mask and per-problem position ids makes every problem's result
equal its batch-of-one result (codi-spec trap 8).
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch

from codi_attn.answers import is_correct, normalize_question, parse_answer, parse_gold
from codi_attn.model import CODIModel

N_LATENTS = 6
MASS_PARTS = ("sink", "question", "bot", "latents")


@dataclass
class Extraction:
    """Results for N problems, in input order."""

    attention: np.ndarray  # [N, L, H, 6, 6] float32: A[n, l, h, i, j], query thought i -> key thought j
    mass: np.ndarray  # [N, L, H, 6, 4] float32: each thought row's mass on sink, question, BOT, latents
    text: list[str]  # decoded answer text
    prediction: np.ndarray  # [N] float64, nan where the text has no number
    correct: np.ndarray  # [N] bool
    latents: np.ndarray | None = None  # [N, 6, d] float32, the fed vectors z1..z6 (when requested)


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


class _Batch:
    """KV-cached state of one left-padded batch: attention mask and next position of each problem."""

    def __init__(self, model: CODIModel, token_ids: list[list[int]]):
        from transformers import DynamicCache

        self.model = model
        width = max(map(len, token_ids))
        dev = model.device
        self.lengths = torch.tensor([len(t) for t in token_ids], device=dev)
        self.width = width  # P: BOT sits at P-1 and latent k at P+k in every row
        ids = torch.full((len(token_ids), width), model.pad_id, dtype=torch.long, device=dev)
        for b, t in enumerate(token_ids):
            ids[b, width - len(t):] = torch.tensor(t, device=dev)
        self.input_ids = ids
        self.mask = (torch.arange(width, device=dev)[None] >= (width - self.lengths)[:, None]).long()
        self.cache = DynamicCache(config=model.lm.config)

    def forward(self, embeds: torch.Tensor | None = None, attentions: bool = False):
        """Run the body (no LM head) on the prefill ids or on one new position per problem."""
        body = self.model.lm.base_model
        if embeds is None:
            positions = (self.mask.cumsum(-1) - 1).clamp(min=0)
            return body(input_ids=self.input_ids, attention_mask=self.mask, position_ids=positions,
                        cache=self.cache, use_cache=True)
        positions = self.mask.sum(-1, keepdim=True)
        self.mask = torch.cat([self.mask, torch.ones_like(self.mask[:, :1])], dim=1)
        return body(inputs_embeds=embeds[:, None], attention_mask=self.mask, position_ids=positions,
                    cache=self.cache, use_cache=True, output_attentions=attentions)


def _thought_rows(attentions: tuple[torch.Tensor, ...], batch: _Batch, step: int, n_layers: int):
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
def _run_batch(model: CODIModel, token_ids: list[list[int]], max_new_tokens: int, keep_latents: bool):
    """Latent inference for one batch: (attention [B,L,H,6,6], mass [B,L,H,6,4], generated ids, latents)."""
    lm, n_layers = model.lm, model.n_layers
    batch = _Batch(model, token_ids)
    n = len(token_ids)
    attention = torch.zeros(n, n_layers, model.n_heads, N_LATENTS, N_LATENTS, device=model.device)
    mass = torch.zeros(n, n_layers, model.n_heads, N_LATENTS, len(MASS_PARTS), device=model.device)
    latents = []

    hidden = batch.forward().last_hidden_state[:, -1]
    with attention_implementation(lm, "eager"):
        for step in range(N_LATENTS):
            z = model.prj(hidden)
            latents.append(z)
            out = batch.forward(z, attentions=True)
            row, split = _thought_rows(out.attentions, batch, step, n_layers)
            attention[:, :, :, step, : step + 1] = row
            mass[:, :, :, step] = split
            hidden = out.last_hidden_state[:, -1]

    embed = lm.get_input_embeddings()
    budget = min(max_new_tokens, model.max_positions - int(batch.lengths.max()) - N_LATENTS - 1)
    stop = torch.tensor(model.stop_ids, device=model.device)
    generated = torch.full((n, max(budget, 0)), -1, dtype=torch.long, device=model.device)
    done = torch.zeros(n, dtype=torch.bool, device=model.device)
    hidden = batch.forward(embed(torch.full((n,), model.eot_id, device=model.device))).last_hidden_state[:, -1]
    for t in range(budget):
        logits = lm.get_output_embeddings()(hidden).float()
        logits[:, model.eot_id] = -math.inf  # the original decoder excludes only EOT
        token = logits.argmax(-1)
        generated[:, t] = torch.where(done, -1, token)
        done |= torch.isin(token, stop)
        if bool(done.all()) or t == budget - 1:
            break
        hidden = batch.forward(embed(token)).last_hidden_state[:, -1]
    z = torch.stack(latents, dim=1).float().cpu().numpy() if keep_latents else None
    return attention.cpu().numpy(), mass.cpu().numpy(), generated.cpu().numpy(), z


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
            keep_latents: bool = False) -> Extraction:
    """Run CODI latent inference on `questions` and capture the six thoughts' attention.

    Problems are batched by length (less padding); results come back in input order.
    `golds` are GSM8K answers ('#### N' or the number); `progress(k)` is called after each batch of k.
    """
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    token_ids = tokenize_questions(model, questions)
    order = sorted(range(len(token_ids)), key=lambda k: len(token_ids[k]))
    n = len(token_ids)
    attention = np.zeros((n, model.n_layers, model.n_heads, N_LATENTS, N_LATENTS), np.float32)
    mass = np.zeros((n, model.n_layers, model.n_heads, N_LATENTS, len(MASS_PARTS)), np.float32)
    latents = np.zeros((n, N_LATENTS, model.lm.config.hidden_size), np.float32) if keep_latents else None
    texts = [""] * n
    for start in range(0, n, batch_size):
        idx = order[start: start + batch_size]
        att, ms, gen, z = _run_batch(model, [token_ids[k] for k in idx], max_new_tokens, keep_latents)
        attention[idx], mass[idx] = att, ms
        if keep_latents:
            latents[idx] = z
        for k, ids in zip(idx, gen):
            texts[k] = decode_answer(model, ids)
        if progress is not None:
            progress(len(idx))
    parsed = [parse_answer(t) for t in texts]
    prediction = np.array([math.nan if p is None else p for p in parsed], dtype=np.float64)
    gold = [parse_gold(g) for g in golds] if golds is not None else [None] * n
    correct = np.array([is_correct(p, g) for p, g in zip(parsed, gold)], dtype=bool)
    return Extraction(attention, mass, texts, prediction, correct, latents)
