"""Held-out accuracy of the demo model in every mode, through the runner's loops and hooks.

Modes: 'prj' (the student: question + BOT, six thoughts, EOT, greedy decoding; codi-spec section 3), 'zeros'
and 'bot' (every thought replaced by zeros or by the BOT embedding), 'swap' (each problem fed the six thoughts
its latent-swap partner computed: `codi_attn.hooks.swap_partners`, the definition the flow's validation uses),
'teacher' (greedy CoT after the question) and 'nocot' (greedy after the question, for the baseline).
Batches hold problems with one question and CoT length, so nothing is padded.
"""
from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch
from transformers import DynamicCache, PreTrainedTokenizerFast

from codi_attn.answers import parse_answer
from codi_attn.conventions import N_THOUGHTS
from codi_attn.demo import task
from codi_attn.demo.codi import CODI, load_model
from codi_attn.demo.tokenizer import Encoded, encode, gold_answer
from codi_attn.hooks import FeedThoughts, solution_steps, swap_partners
from codi_attn.runner import greedy_steps

MODES = ("prj", "zeros", "bot", "swap", "teacher", "nocot")
TEST_MODES = ("teacher", "prj", "zeros", "bot", "swap")  # evaluated on the whole test split
SUBSET = 100  # first test problems whose accuracy the tests check against metrics.json


@torch.no_grad()
def greedy(model: CODI, cache: DynamicCache, first: torch.Tensor, max_new: int, eos_id: int) -> list[list[int]]:
    """Greedy decoding (`codi_attn.runner.greedy_steps`) after the cached prefix, starting by feeding `first`
    [B, L]; the EOT id is excluded from the argmax; stops at eos. Returns the new ids of each row, eos excluded."""
    def feed(ids: torch.Tensor, t: int) -> torch.Tensor:
        return model.codi(input_ids=ids, cache=cache, use_cache=True).logits[:, -1]

    generated = greedy_steps(feed(first, 0), lambda token, t: feed(token[:, None], t), max_new, (eos_id,),
                             model.eot_id)
    return [[i for i in row if i >= 0 and i != eos_id] for row in generated.tolist()]


def length_groups(tok: PreTrainedTokenizerFast, records: list[dict]) -> dict[tuple[int, int], list[int]]:
    """Record indices grouped by (question length, CoT length) in tokens."""
    groups: dict[tuple[int, int], list[int]] = {}
    for i, r in enumerate(records):
        e = encode(tok, [r])
        groups.setdefault((e.question.shape[1], e.cot.shape[1]), []).append(i)
    return groups


def batches_by_length(tok: PreTrainedTokenizerFast, records: list[dict], size: int,
                      groups: dict[tuple[int, int], list[int]] | None = None) -> Iterator[tuple[list[int], Encoded]]:
    """(indices, encoded batch) over records grouped by question and CoT length (`groups`: their
    `length_groups`, when already computed)."""
    for idx in (groups or length_groups(tok, records)).values():
        for s in range(0, len(idx), size):
            chunk = idx[s:s + size]
            yield chunk, encode(tok, [records[i] for i in chunk])


def replacement_thoughts(model: CODI, mode: str, tok: PreTrainedTokenizerFast, records: list[dict],
                         batches: list[tuple[list[int], Encoded]]) -> FeedThoughts | None:
    """The hook that feeds mode's thoughts instead of the model's ([N, 6, d] in records order), or None for 'prj'."""
    n, d = len(records), model.codi.config.n_embd
    if mode == "prj":
        return None
    if mode == "zeros":
        return FeedThoughts(torch.zeros(n, N_THOUGHTS, d))
    if mode == "bot":
        return FeedThoughts(model.codi.transformer.wte.weight[model.bot_id].expand(n, N_THOUGHTS, d))
    own = torch.zeros(n, N_THOUGHTS, d)
    for idx, b in batches:
        own[idx] = model.think(b.question)[1]
    return FeedThoughts(own[swap_partners([r["answer"] for r in records])])


@torch.no_grad()
def predict(model: CODI, tok: PreTrainedTokenizerFast, records: list[dict], mode: str = "prj",
            batch_size: int = 256) -> list[float | None]:
    """Parsed answers in `mode` (module docstring)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    model.eval()
    preds: list[float | None] = [None] * len(records)
    batches = list(batches_by_length(tok, records, batch_size))
    feed = None if mode in ("teacher", "nocot") else replacement_thoughts(model, mode, tok, records, batches)
    for idx, b in batches:
        if mode in ("teacher", "nocot"):
            rows = greedy(model, DynamicCache(config=model.codi.config), b.question, 64, tok.eos_token_id)
        else:
            cache, _ = model.think(b.question, hooks=[feed] if feed else (), rows=idx)
            rows = greedy(model, cache, torch.full((len(idx), 1), model.eot_id), 16, tok.eos_token_id)
        for i, row in zip(idx, rows):
            preds[i] = parse_answer(tok.decode(row, skip_special_tokens=True))
    return preds


def accuracy(model: CODI, tok: PreTrainedTokenizerFast, records: list[dict], mode: str = "prj") -> float:
    preds = predict(model, tok, records, mode)
    return sum(p == gold_answer(r) for p, r in zip(preds, records)) / len(records)


def evaluate_all(model: CODI, tok: PreTrainedTokenizerFast, test: list[dict], modes: tuple[str, ...]) -> dict:
    """Held-out accuracy of each mode, overall and by number of operations."""
    steps = [solution_steps(r["answer"]) for r in test]
    result: dict = {}
    for mode in modes:
        ok = [p == gold_answer(r) for p, r in zip(predict(model, tok, test, mode), test)]
        result[mode] = round(sum(ok) / len(ok), 4)
        for k in sorted(set(steps)):
            sel = [o for o, s in zip(ok, steps) if s == k]
            result.setdefault("by_steps", {}).setdefault(str(k), {})[mode] = round(sum(sel) / len(sel), 4)
    return result


def reevaluate(out: Path) -> dict:
    """Evaluate the model saved in <out> on the whole test split in every mode of TEST_MODES and rewrite the
    test entry of <out>/metrics.json and the model card (e.g. after a mode was added); returns the entry."""
    from codi_attn.demo.card import update_report

    path = out / "metrics.json"
    if not path.exists():
        raise SystemExit(f"{path} not found: --evaluate re-evaluates a model that `--out {out}` trained")
    model, tok = load_model(out)
    m = json.loads(path.read_text())
    test = task.synthetic_records("test", m["test"]["n"])
    m["test"] = {"n": len(test)} | evaluate_all(model, tok, test, TEST_MODES)
    path.write_text(json.dumps(m, indent=1) + "\n")
    update_report(out)
    return m["test"]
