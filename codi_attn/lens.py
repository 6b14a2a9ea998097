"""A logit lens per layer at each thought (on the model): the residual after block l at a position, through the
final norm and the LM head, restricted to the number tokens; the rank (1 = top) of the target value among the
values those tokens spell, a value scoring the highest logit of its tokens. Matching rule: a token spells value v
when its decoded text, without spaces and commas, is v written out ("12" or " 12", not "12.0"); a value with no
such token is not ranked (its rank is nan). Positions and targets as in codi_attn.probes; the residuals are
codi_attn.hooks.RecordResiduals'.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch

from codi_attn.model import CODIModel
from codi_attn.probes import POSITIONS, targets
from codi_attn.validate import token_number


def number_token_values(model: CODIModel) -> tuple[np.ndarray, np.ndarray]:
    """(token ids, values) of the tokens that spell a number (the module docstring's matching rule)."""
    texts = model.tokenizer.batch_decode([[i] for i in range(len(model.tokenizer))])
    special = set(model.tokenizer.all_special_ids)
    pairs = [(i, token_number(t)) for i, t in enumerate(texts) if i not in special]
    pairs = [(i, v) for i, v in pairs if v is not None]
    return np.array([i for i, _ in pairs], dtype=np.int64), np.array([v for _, v in pairs], dtype=np.float64)


def final_norm(model: CODIModel) -> torch.nn.Module:
    """The LM's final norm (GPT-2 ln_f, LLaMA norm), applied before the LM head."""
    body = model.lm.base_model
    return body.ln_f if hasattr(body, "ln_f") else body.norm


@torch.inference_mode()
def lens_ranks(model: CODIModel, resid: np.ndarray, values: np.ndarray, batch: int = 64) -> np.ndarray:
    """[N, 7, L] rank (1 = top) of values[n] among the values the number tokens spell, reading the residual after
    each block at each position through the final norm and the LM head; a value scores the highest logit of the
    tokens that spell it. nan where values[n] is None/nan or no token spells it."""
    ids, token_values = number_token_values(model)
    unique, group = np.unique(token_values, return_inverse=True)
    head = model.lm.get_output_embeddings().weight[torch.as_tensor(ids, device=model.device)]  # [T, d]
    group_t = torch.as_tensor(group, device=model.device)
    norm = final_norm(model)
    n, positions, layers, d = resid.shape
    ranks = np.full((n, positions, layers), np.nan)
    where = {float(v): k for k, v in enumerate(unique)}
    target = np.array([where.get(float(v), -1) if v is not None and not pd.isna(v) else -1 for v in values])
    for start in range(0, n, batch):
        rows = np.arange(start, min(n, start + batch))
        x = torch.as_tensor(resid[rows], dtype=model.dtype, device=model.device)
        logits = (norm(x) @ head.T).float()  # [b, 7, L, T]
        scores = logits.new_full((*logits.shape[:-1], len(unique)), -torch.inf)
        scores.scatter_reduce_(-1, group_t.expand_as(logits), logits, "amax")  # [b, 7, L, U]
        for i, row in enumerate(rows):
            if target[row] < 0:
                continue
            own = scores[i, ..., target[row]]
            ranks[row] = (1 + (scores[i] > own[..., None]).sum(-1)).cpu().numpy()
    return ranks


def lens_table(model: CODIModel, resid: np.ndarray, solutions: Sequence[str], max_steps: int = 7,
               seed: int = 0) -> pd.DataFrame:
    """One row per (target value: each step's and the answer, position, layer): the share of problems whose
    target ranks first among the number tokens, within the top 5, the median rank, n ranked, and the chance
    floor `permuted_top1`: the top-1 share with the ranked problems' targets permuted among them (one draw of
    numpy's default_rng(seed) per target, in target order; a lens that reads nothing of the problem, only which
    values are frequent, scores as high)."""
    rng = np.random.default_rng(seed)
    rows = []
    for name, labels in targets(solutions, max_steps).items():
        if name.startswith("op"):
            continue
        ranks = lens_ranks(model, resid, labels)
        ranked = ~np.isnan(ranks[:, 0, 0])
        if not ranked.any():
            continue
        shuffled = np.array(labels, dtype=object)
        idx = np.flatnonzero(ranked)
        shuffled[idx] = shuffled[rng.permutation(idx)]
        permuted = lens_ranks(model, resid, shuffled)
        for p, position in enumerate(POSITIONS):
            for layer in range(resid.shape[2]):
                r = ranks[ranked, p, layer]
                rows.append({"target": name, "position": position, "layer": layer, "n": int(ranked.sum()),
                             "top1": float((r == 1).mean()), "top5": float((r <= 5).mean()),
                             "median_rank": float(np.median(r)),
                             "permuted_top1": float((permuted[ranked, p, layer] == 1).mean())})
    return pd.DataFrame(rows)
