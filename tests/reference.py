"""Independent references the tests hold the library against, and the questions they share.

Nothing here uses the runner: these computations read codi-spec's positions straight off one forward.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import numpy as np
import torch

from codi_attn.conventions import N_THOUGHTS, Head
from codi_attn.runner import head_dim, layer_module

QUESTIONS = [
    "Natalia sold 48 clips in April. How many clips?",
    "A robe takes 2 bolts of blue fiber and half that much white fiber.  How many bolts in total does it take?",
    "Weng earns $12 an hour.",
    "James writes a 3-page letter to 2 different friends twice a week. How many pages does he write a year?",
]

PADDED_GROUP = ["Natalia sold 48 clips in April. How many clips?", "Natalia sold 48 clips in May. How many clips?",
                "Natalia sold 48 clips in April. How many?"]  # lengths close enough for one left-padded prefill group


def spec_tokens(model, question: str) -> list[int]:
    """codi-spec 3.1 written out: `question.strip().replace("  ", " ")` (one pass), tokenized as the tokenizer does
    (LLaMA adds BOS), then BOT."""
    return model.tokenizer(question.strip().replace("  ", " "))["input_ids"] + [model.bot_id]


def spec_projection(model, h: torch.Tensor) -> torch.Tensor:
    """codi-spec's projection written out from its parameters (keys prj.1, prj.3, prj.ln): [B, d] -> [B, d],
    LayerNorm(W3 GELU(W1 h + b1) + b3) with the exact (erf) GELU and LayerNorm's default eps 1e-5."""
    p = dict(model.prj.named_parameters())
    x = torch.nn.functional.linear(h, p["1.weight"], p["1.bias"])
    x = torch.nn.functional.linear(torch.nn.functional.gelu(x), p["3.weight"], p["3.bias"])
    return torch.nn.functional.layer_norm(x, x.shape[-1:], p["ln.weight"], p["ln.bias"], eps=1e-5)


def full_sequence_reference(model, question: str, thoughts: np.ndarray, blocked: Sequence[int] = ()):
    """6x6 block and mass split from ONE eager forward over [question, BOT, z1..z6] (no cache, no batching), with
    the keys of the `blocked` thoughts (numbered from 1) hidden from every later query.

    Independent of the runner's cache, padding and row bookkeeping: positions are read straight off
    the codi-spec layout (question 0..Q-1, BOT at Q, z_k at Q+k), whatever is blocked.
    """
    ids = spec_tokens(model, question)
    q = len(ids) - 1
    embed = model.lm.get_input_embeddings()
    with torch.no_grad():
        seq = torch.cat([embed(torch.tensor([ids])), torch.tensor(thoughts[None], dtype=model.dtype)], dim=1)
        n = seq.shape[1]
        visible = torch.ones(n, n, dtype=torch.bool).tril()
        for k in blocked:
            visible[q + k + 1:, q + k] = False
        mask = torch.zeros(n, n, dtype=model.dtype).masked_fill(~visible, torch.finfo(model.dtype).min)
        model.lm.set_attn_implementation("eager")
        try:
            out = model.lm.base_model(inputs_embeds=seq, attention_mask=mask[None, None],
                                      position_ids=torch.arange(n)[None], output_attentions=True)
        finally:
            model.lm.set_attn_implementation("sdpa")
    full = torch.stack(out.attentions, dim=1)[0].float().numpy()  # [L, H, S, S]
    rows = full[:, :, q + 1: q + 1 + N_THOUGHTS, :]  # [L, H, 6, S]
    block = rows[..., q + 1: q + 1 + N_THOUGHTS]
    split = np.stack([rows[..., 0], rows[..., 1:q].sum(-1), rows[..., q], block.sum(-1)], axis=-1)
    return block, split


def latent_loop(model, question: str, max_new_tokens: int) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """codi-spec section 3 by full forwards and nothing else: no cache, no padding, no batch. Each step runs the
    whole sequence so far ([question, BOT], then the thoughts, EOT, the decoded tokens, as embeddings) and reads
    its last position: z_{k+1} = spec_projection(final-norm hidden state), the first token from EOT's logits with
    EOT excluded, until a stop token (kept) or max_new_tokens. Returns the thoughts z1..z6 [6, d], the hidden state at
    each thought [6, d] (float32) and the decoded ids."""
    embed = model.lm.get_input_embeddings()
    seq = embed(torch.tensor([spec_tokens(model, question)]))  # [1, Q + 1, d]

    def last_hidden(seq: torch.Tensor) -> torch.Tensor:
        return model.lm.base_model(inputs_embeds=seq, position_ids=torch.arange(seq.shape[1])[None]
                                   ).last_hidden_state[:, -1]  # [1, d]

    thoughts, hidden, tokens = [], [], []
    with torch.no_grad():
        h = last_hidden(seq)
        for _ in range(N_THOUGHTS):
            z = spec_projection(model, h)
            seq = torch.cat([seq, z[:, None]], dim=1)
            h = last_hidden(seq)
            thoughts.append(z[0])
            hidden.append(h[0])
        seq = torch.cat([seq, embed(torch.tensor([[model.eot_id]]))], dim=1)
        for _ in range(max_new_tokens):
            logits = model.lm.get_output_embeddings()(last_hidden(seq)).float()
            logits[:, model.eot_id] = -torch.inf
            token = int(logits.argmax(-1))
            tokens.append(token)
            if token in model.stop_ids:
                break
            seq = torch.cat([seq, embed(torch.tensor([[token]]))], dim=1)
    return torch.stack(thoughts).float().numpy(), torch.stack(hidden).float().numpy(), tokens


@contextmanager
def zeroed_heads(model, heads: Sequence[Head]) -> Iterator[None]:
    """Zero ablation everywhere without any hook: the heads' input rows of the output projection's weight set to 0
    (GPT-2's Conv1D weight is [in, out]), restored on exit."""
    d, saved = head_dim(model), {}
    try:
        for layer, head in heads:
            proj = layer_module(model, "head_in", layer)
            saved.setdefault(layer, proj.weight.detach().clone())
            with torch.no_grad():
                proj.weight[head * d:(head + 1) * d] = 0.0
        yield
    finally:
        with torch.no_grad():
            for layer, weight in saved.items():
                layer_module(model, "head_in", layer).weight.copy_(weight)
