"""Attended tokens (codi_attn.attended): the averaged rows equal a direct computation from the captured attention
rows; token kinds and step operands; the summary's shares."""
from __future__ import annotations

import numpy as np
import torch

from codi_attn.attended import AttendedTokens, attended_summary, question_tokens, token_kind
from codi_attn.runner import Runner, tokenize_questions
from reference import QUESTIONS


def test_attended_tokens_equal_the_mean_of_the_captured_rows(any_model):
    """Every layer's and head's row of thought k, restricted to the problem's question tokens (no padding, no
    BOT, no thoughts), averaged: the hook's weights, for all heads and for chosen heads."""
    m = any_model
    rows: dict = {}

    def keep(value, point, batch):
        for b, n in enumerate(batch.rows):
            length = int(batch.lengths[b])
            rows[(int(n), point.thought, point.layer)] = value[b, :, batch.width - length: batch.width - 1].clone()

    every, chosen = AttendedTokens(m, 4), AttendedTokens(m, 4, heads=[(0, 1), (1, 0)])
    Runner(m, batch_size=3, max_new_tokens=1).run(QUESTIONS, [every, chosen, ("thought.*.attn.*", keep)])
    ids = tokenize_questions(m, QUESTIONS)
    for n in range(4):
        assert every.weights[n].shape == (6, len(ids[n]) - 1)
        for k in range(1, 7):
            stack = torch.stack([rows[(n, k, l)] for l in range(m.n_layers)])  # [L, H, Q]
            np.testing.assert_allclose(every.weights[n][k - 1], stack.mean((0, 1)).numpy(), atol=1e-6)
            picked = torch.stack([stack[0, 1], stack[1, 0]]).mean(0).numpy()
            np.testing.assert_allclose(chosen.weights[n][k - 1], picked, atol=1e-6)


def test_token_kinds_and_operands(gpt2_model):
    assert [token_kind(t) for t in (" 48", " buys", "twice", " Tom", "+", "3rd")] == \
        ["number", "operation", "operation", "other", "operation", "number"]
    ids = tokenize_questions(gpt2_model, ["Tom has 48 pens and buys 2 more."])[0][:-1]
    tokens = question_tokens(gpt2_model, ids, "<<48+2=50>>\n<<50*2=100>>\n#### 100")
    marked = {t.strip(): ops for t, ops in zip(tokens.text, tokens.operand_of) if ops}
    assert marked.get("48") == (1,) and marked.get("2") == (1, 2)
    ids = tokenize_questions(gpt2_model, ["Tom has 48 pens and 2 cups."])[0][:-1]
    tokens = question_tokens(gpt2_model, ids, "<<.48*2=0.96>>\n<<48+1=49>>\n#### 49")  # .48 is not the text's 48
    marked = {t.strip(): ops for t, ops in zip(tokens.text, tokens.operand_of) if ops}
    assert marked == {"48": (2,), "2": (1,)}
    ids = tokenize_questions(gpt2_model, ["Max has 48 cards in 2 boxes."])[0][:-1]
    tokens = question_tokens(gpt2_model, ids, "<<2*24=48>>\n<<48+1=49>>\n#### 49")
    marked = {t.strip(): ops for t, ops in zip(tokens.text, tokens.operand_of) if ops}
    assert marked == {"2": (1,)}  # step 2's 48 is step 1's result, not the question's 48


def test_summary_shares_add_up():
    weights = [np.array([[0.2, 0.1, 0.1]] * 6), np.array([[0.0, 0.3, 0.1]] * 6)]
    from codi_attn.attended import QuestionTokens

    tokens = [QuestionTokens(["5", "more", "x"], ["number", "operation", "other"], [(1,), (), ()]),
              QuestionTokens(["7", "sells", "x"], ["number", "operation", "other"], [(2,), (), ()])]
    by_kind, by_step = attended_summary(weights, tokens)
    np.testing.assert_allclose(by_kind[["share_number", "share_operation", "share_other"]].sum(axis=1), 1.0)
    np.testing.assert_allclose(by_kind["share_number"], (0.5 + 0.0) / 2)
    assert set(by_step["step"]) == {1, 2} and np.allclose(by_step[by_step["step"] == 1]["share"], 0.5)
