"""The demo model's word-level tokenizer and the encoding of equal-length batches of its task's records."""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from tokenizers import Regex, Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from codi_attn.answers import normalize_question, parse_gold
from codi_attn.demo import task

EOS, UNK, ANSWER = "<|endoftext|>", "[UNK]", "The answer is:"


def build_tokenizer(n_texts: int = 5000) -> PreTrainedTokenizerFast:
    """Word-level tokenizer built from the task's text: eos (id 0), unk, then
    "The answer is:", every word, symbol and whole number (0..MAX_VALUE) seen in
    n_texts training records, sorted. No BOS; pad/bot/eot are NOT in it."""
    pre = pre_tokenizers.Sequence([
        pre_tokenizers.WhitespaceSplit(),
        pre_tokenizers.Split(Regex(r"<<|>>|\d+|[^\w\s]"), behavior="isolated"),
    ])
    stream = task.train_stream(steps=(1, 2, 3, 4))
    pieces = {str(v) for v in range(task.MAX_VALUE + 1)}
    for _ in range(n_texts):
        rec = next(stream)
        for text in (rec["question"], rec["answer"]):
            pieces.update(p for p, _ in pre.pre_tokenize_str(text))
    vocab = {t: i for i, t in enumerate([EOS, UNK, ANSWER] + sorted(pieces))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    tok.pre_tokenizer = pre
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, unk_token=UNK)
    fast.add_tokens([ANSWER])  # matched whole, before pre-tokenization; keeps its id
    return fast


def gold_answer(record: dict) -> float:
    return parse_gold(record["answer"])


@dataclass
class Encoded:
    """Token ids of a batch of problems with one number of operations.
    question [B, Q] (the text as the extractor tokenizes it), cot [B, C] (the
    <<a op b=c>> steps), answer [B, 3] ("The answer is:", N, eos)."""

    question: torch.Tensor
    cot: torch.Tensor
    answer: torch.Tensor


def encode(tok: PreTrainedTokenizerFast, records: list[dict]) -> Encoded:
    """Encode records whose questions and CoTs have equal token lengths."""
    def ids(texts: list[str]) -> torch.Tensor:
        return torch.tensor([tok.encode(t, add_special_tokens=False) for t in texts])

    questions = [normalize_question(r["question"]) for r in records]
    cots = [" ".join(re.findall(r"<<[^>]*>>", r["answer"])) for r in records]
    answers = [f"{ANSWER} {int(gold_answer(r))}{EOS}" for r in records]
    return Encoded(ids(questions), ids(cots), ids(answers))
