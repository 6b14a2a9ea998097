"""The demo CODI module for training: a GPT-2 LM and the projection, saved in the release layout.

Its six thoughts run through the runner's loop (`codi_attn.runner.thought_steps`, with gradients here) and take
the runner's hooks at `thought.{k}.z` / `thought.{k}.hidden` (e.g. `FeedThoughts` for the latent swap).
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file
from transformers import DynamicCache, GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

from codi_attn.conventions import THOUGHTS
from codi_attn.model import make_projection
from codi_attn.runner import Hook, Hooks, thought_steps

THINK_POINTS = tuple(f"thought.{k}.{kind}" for k in THOUGHTS for kind in ("z", "hidden"))  # what think() offers


class CODI(nn.Module):
    """A GPT-2 LM `codi` over V+3 ids (pad/bot/eot = V, V+1, V+2) and the thought projection
    `prj` (Linear, GELU, Linear, LayerNorm), as in codi-spec section 1."""

    def __init__(self, config: GPT2Config):
        super().__init__()
        self.codi = GPT2LMHeadModel(config)
        d = config.n_embd
        self.prj = make_projection(d, d)
        self.bot_id, self.eot_id = config.vocab_size - 2, config.vocab_size - 1

    def think(self, question: torch.Tensor, hooks: Sequence[Hook] = (), rows: Sequence[int] | None = None,
              cache: DynamicCache | None = None) -> tuple[DynamicCache, torch.Tensor]:
        """Question + BOT, then the six thoughts fed one at a time; returns the KV cache
        (Q + 7 positions) and the fed thoughts [B, 6, d]. question: [B, Q] token ids (equal lengths,
        no padding); a given cache already holds the question (only BOT is fed). hooks: runner hooks at
        thought.{k}.z / thought.{k}.hidden, told the batch's `rows` (indices in the caller's records)."""
        lm, B = self.codi.transformer, question.shape[0]
        attached = Hooks(hooks, THINK_POINTS)
        batch = SimpleNamespace(rows=np.arange(B) if rows is None else np.asarray(rows))
        bot = torch.full((B, 1), self.bot_id, dtype=torch.long)
        if cache is None:
            cache = DynamicCache(config=self.codi.config)
            h = lm(input_ids=torch.cat([question, bot], 1), cache=cache, use_cache=True).last_hidden_state
        else:
            h = lm(input_ids=bot, cache=cache, use_cache=True).last_hidden_state

        def step(z: torch.Tensor, k: int) -> torch.Tensor:
            return lm(inputs_embeds=z[:, None], cache=cache, use_cache=True).last_hidden_state[:, -1]

        fed = thought_steps(self.prj, step, h[:, -1], lambda name, value: attached(name, value, batch))
        return cache, torch.stack(fed, 1)


def new_model(vocab_size: int, d: int, n_layer: int, n_head: int, n_positions: int) -> CODI:
    """A randomly initialised CODI over vocab_size + 3 ids (dropout 0, tied head)."""
    config = GPT2Config(
        vocab_size=vocab_size + 3, n_positions=n_positions, n_embd=d, n_layer=n_layer,
        n_head=n_head, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        bos_token_id=0, eos_token_id=0, pad_token_id=vocab_size, tie_word_embeddings=True,
    )
    return CODI(config)


def save_model(model: CODI, tok: PreTrainedTokenizerFast, out: Path, dtype: torch.dtype = torch.float32) -> None:
    """<out>/base: config.json (vocab_size V) and tokenizer; <out>/ckpt/model.safetensors:
    'codi.' + GPT2LMHeadModel keys (lm_head cloned) and 'prj.*'."""
    base = out / "base"
    config = GPT2Config.from_dict(model.codi.config.to_dict())
    config.vocab_size, config.pad_token_id = len(tok), None  # the loader adds [PAD] = V
    config.save_pretrained(base)
    tok.save_pretrained(base)
    state = {k: v.detach().to(dtype).clone().contiguous() for k, v in model.state_dict().items()}
    (out / "ckpt").mkdir(parents=True, exist_ok=True)
    save_file(state, out / "ckpt" / "model.safetensors", metadata={"format": "pt"})


def load_model(out: Path) -> tuple[CODI, PreTrainedTokenizerFast]:
    """Load a model saved by save_model strictly (fp32)."""
    tok = PreTrainedTokenizerFast.from_pretrained(out / "base")
    config = GPT2Config.from_pretrained(out / "base")
    config.vocab_size += 3
    model = CODI(config)
    state = {k: v.float() for k, v in load_file(out / "ckpt" / "model.safetensors").items()}
    model.load_state_dict(state, strict=True)
    model.codi.tie_weights()
    return model.eval(), tok
