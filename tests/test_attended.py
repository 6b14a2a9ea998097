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


def test_token_kind_reads_a_word_without_its_punctuation():
    assert [token_kind(t) for t in (" more.", " each,", " left?", " Total:", " sum!", " cost;", " $")] == \
        ["operation"] * 6 + ["other"]


def test_a_literal_equal_to_its_own_steps_result_is_still_an_operand(gpt2_model):
    """Only an earlier step's result is left out of a step's operands: in <<5*1=5>> the question's 5 is read."""
    ids = tokenize_questions(gpt2_model, ["Tom has 5 boxes of 1 pen and 2 cups."])[0][:-1]
    tokens = question_tokens(gpt2_model, ids, "<<5*1=5>>\n<<5+2=7>>\n#### 7")
    marked = {t.strip(): ops for t, ops in zip(tokens.text, tokens.operand_of) if ops}
    assert marked == {"5": (1,), "1": (1,), "2": (2,)}


def test_summary_per_token_weights_are_raw_means_over_the_problems_with_that_kind():
    """per_token_<kind>: the mean raw weight of the kind's tokens in a problem (not its share), averaged over the
    problems that have such a token; share_<kind>: the kind's share of the row, averaged over every problem."""
    from codi_attn.attended import QuestionTokens

    rows = [np.array([0.2, 0.4, 0.1, 0.3]) * (k + 1) / 6 for k in range(6)]  # thought k: the row scaled
    weights = [np.stack(rows), np.stack([np.array([0.1, 0.3, 0.6]) * (k + 1) / 6 for k in range(6)])]
    tokens = [QuestionTokens(["5", "7", "more", "x"], ["number", "number", "operation", "other"], [(), (), (), ()]),
              QuestionTokens(["9", "x", "y"], ["number", "other", "other"], [(), (), ()])]  # no operation word
    by_kind, _ = attended_summary(weights, tokens)
    for k in range(6):
        scale, row = (k + 1) / 6, by_kind.iloc[k]
        assert row["thought"] == f"z{k + 1}"
        np.testing.assert_allclose(row["per_token_number"], scale * (0.3 + 0.1) / 2)
        np.testing.assert_allclose(row["per_token_operation"], scale * 0.1)  # the first problem only
        np.testing.assert_allclose(row["per_token_other"], scale * (0.3 + 0.45) / 2)
        np.testing.assert_allclose(row["share_number"], (0.6 + 0.1) / 2)
        np.testing.assert_allclose(row["share_operation"], (0.1 + 0.0) / 2)
