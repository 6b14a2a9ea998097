"""The hook objects of codi_attn.hooks: thoughts recorded, fed and blocked (codi-spec trap 3), the answer-token
logits, and the one definition of the latent swap."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from codi_attn.conventions import N_THOUGHTS
from codi_attn.extract import extract
from codi_attn.hooks import (AnswerLogits, AnswerShift, BlockThoughts, FeedThoughts, RecordThoughts, solution_steps,
                             swap_partners)
from codi_attn.runner import Hook, Runner, number_tokens
from reference import QUESTIONS, full_sequence_reference


def test_recorded_thoughts_chain_through_the_projection(gpt2_model):
    """hidden is the final-norm hidden state at each thought; prj of thought k's hidden state is thought k+1."""
    record = RecordThoughts(2)
    Runner(gpt2_model, max_new_tokens=1).run(QUESTIONS[:2], [record])
    assert record.z.shape == record.hidden.shape == (2, N_THOUGHTS, gpt2_model.lm.config.hidden_size)
    with torch.no_grad():
        nxt = gpt2_model.prj(torch.tensor(record.hidden[:, :5])).numpy()
    np.testing.assert_allclose(nxt, record.z[:, 1:], atol=1e-5)


def test_fed_thoughts_replace_the_projection(any_model):
    """Fed its own thoughts, a problem reproduces its run; fed another problem's, its attention changes, and the
    capture still equals the independent full-sequence forward over the fed vectors."""
    own = RecordThoughts(3)
    base = extract(any_model, QUESTIONS[:3], batch_size=3, max_new_tokens=3, hooks=[own])
    again = extract(any_model, QUESTIONS[:3], batch_size=3, max_new_tokens=3, hooks=[FeedThoughts(own.z)])
    np.testing.assert_allclose(again.attention, base.attention, atol=1e-6)
    assert again.text == base.text
    swapped = np.roll(own.z, 1, axis=0)  # problem k gets the thoughts of problem k-1
    fed = RecordThoughts(3)
    other = extract(any_model, QUESTIONS[:3], batch_size=3, max_new_tokens=3, hooks=[FeedThoughts(swapped), fed])
    np.testing.assert_array_equal(fed.z, swapped)
    assert np.abs(other.attention - base.attention).max() > 1e-3
    for k, question in enumerate(QUESTIONS[:3]):
        block, split = full_sequence_reference(any_model, question, swapped[k])
        np.testing.assert_allclose(other.attention[k], block, atol=1e-5)
        np.testing.assert_allclose(other.mass[k], split, atol=1e-5)


def test_feeding_one_thought_leaves_the_earlier_ones(gpt2_model):
    own = RecordThoughts(2)
    Runner(gpt2_model, max_new_tokens=1).run(QUESTIONS[:2], [own])
    patched, fed = np.roll(own.z, 1, axis=0), RecordThoughts(2)
    Runner(gpt2_model, max_new_tokens=1).run(QUESTIONS[:2], [FeedThoughts(patched, thoughts=[3]), fed])
    np.testing.assert_array_equal(fed.z[:, :2], own.z[:, :2])
    np.testing.assert_array_equal(fed.z[:, 2], patched[:, 2])
    assert not np.allclose(fed.z[:, 3:], own.z[:, 3:])


def test_fed_thoughts_must_have_the_right_shape(gpt2_model):
    d = gpt2_model.lm.config.hidden_size
    with pytest.raises(ValueError, match=r"fed thoughts must be \[problems, 6, hidden size\]"):
        FeedThoughts(np.zeros((2, 5, d), np.float32))
    with pytest.raises(ValueError, match="thought numbers 1..6"):
        FeedThoughts(np.zeros((2, 6, d), np.float32), thoughts=[0])
    with pytest.raises(ValueError, match="fed thoughts have size 3"):
        Runner(gpt2_model, max_new_tokens=1).run(QUESTIONS[:1], [FeedThoughts(np.zeros((1, 6, 3), np.float32))])


def test_blocked_thought_gets_exactly_zero_weight(any_model):
    """Trap 3: a blocked key receives exactly 0 from every later query; the rest of each row renormalises."""
    base = extract(any_model, QUESTIONS[:2], batch_size=2, max_new_tokens=2)
    blocked = extract(any_model, QUESTIONS[:2], batch_size=2, max_new_tokens=2, hooks=[BlockThoughts([2])])
    assert np.all(blocked.attention[..., 2:, 1] == 0.0)
    assert np.all(blocked.attention[..., 1, 1] > 0)  # its own step still sees itself
    np.testing.assert_allclose(blocked.mass.sum(-1), 1.0, atol=1e-3)
    np.testing.assert_array_equal(blocked.attention[..., :2, :], base.attention[..., :2, :])  # earlier rows untouched
    assert not np.allclose(blocked.attention[..., 2:, :], base.attention[..., 2:, :])


def test_blocked_runs_equal_the_full_sequence_forward_with_the_keys_hidden(any_model):
    """Blocking moves no position: thoughts blocked in a padded batch give the attention and mass split of one
    eager forward over [question, BOT, z1..z6] at the codi-spec positions with those keys hidden from later
    queries (a position counted from the visible keys would put every later thought one step early)."""
    for thoughts in ([2], [1, 4]):
        fed = RecordThoughts(3)
        blocked = extract(any_model, QUESTIONS[:3], batch_size=3, max_new_tokens=1,
                          hooks=[BlockThoughts(thoughts), fed])
        for k, question in enumerate(QUESTIONS[:3]):
            block, split = full_sequence_reference(any_model, question, fed.z[k], blocked=thoughts)
            np.testing.assert_allclose(blocked.attention[k], block, atol=1e-5, err_msg=f"{thoughts} problem {k}")
            np.testing.assert_allclose(blocked.mass[k], split, atol=1e-5, err_msg=f"{thoughts} problem {k}")


def test_blocked_thoughts_are_validated():
    with pytest.raises(ValueError, match="thought numbers 1..6"):
        BlockThoughts([7])
    with pytest.raises(ValueError, match="at least one"):
        BlockThoughts([])


def test_answer_token_steps_and_logits(gpt2_model):
    """Where the number starts (the first generated token whose decoded text has a digit or is a minus sign; -1
    with nan logits if none), checked against the decoded tokens; the logits kept there pick that token; the
    steps handed back in keep the logits at exactly those steps, and reproduce the detected ones bit for bit."""
    runner = Runner(gpt2_model, batch_size=2, max_new_tokens=6)
    found = AnswerLogits(len(QUESTIONS), numbers=number_tokens(gpt2_model))
    gen = runner.run(QUESTIONS, [found])
    assert gen.tokens.shape == (len(QUESTIONS), 6) and found.logits.shape[1] == gpt2_model.lm.config.vocab_size
    decoded = gpt2_model.tokenizer.decode
    n_found = 0
    for k in range(len(QUESTIONS)):
        generated = [t for t in gen.tokens[k].tolist() if t >= 0]
        starts = [i for i, t in enumerate(generated)
                  if any(c in "0123456789" for c in decoded([t])) or decoded([t]).strip() == "-"]
        if not starts:
            assert found.step[k] == -1 and np.isnan(found.logits[k]).all()
            continue
        n_found += 1
        assert found.step[k] == starts[0] and found.logits[k].argmax() == generated[starts[0]]
    assert n_found, "the fixture generates a digit for some question: the detection path runs"
    again = AnswerLogits(len(QUESTIONS), steps=found.step)
    runner.run(QUESTIONS, [again])
    np.testing.assert_array_equal(again.logits, found.logits)
    steps = np.array([0, 3, 5, -1])
    fixed = AnswerLogits(len(QUESTIONS), steps=steps)
    gen = runner.run(QUESTIONS, [fixed])
    for k, step in enumerate(steps):
        if step < 0 or gen.tokens[k, step] < 0:  # none asked, or decoding stopped before it
            assert fixed.step[k] == -1 and np.isnan(fixed.logits[k]).all()
        else:
            assert fixed.step[k] == step and fixed.logits[k].argmax() == gen.tokens[k, step]
    with pytest.raises(ValueError, match="one decode step per problem"):
        AnswerLogits(len(QUESTIONS), steps=steps[:2])
    with pytest.raises(ValueError, match="either numbers"):
        AnswerLogits(len(QUESTIONS))


def test_swap_partners_match_the_number_of_solution_steps():
    solutions = ["<<1+1=2>>\n#### 2", "<<2*3=6>> <<6-1=5>>\n#### 5", "<<4-1=3>>\n#### 3", "#### 7",
                 "<<1+2=3>> <<3+3=6>>\n#### 6", "<<5+5=10>>\n#### 10"]
    assert [solution_steps(s) for s in solutions] == [1, 2, 1, 0, 2, 1]
    partner = swap_partners(solutions)
    np.testing.assert_array_equal(partner, [2, 4, 5, 4, 1, 0])  # next with as many steps; 7 is alone: next one
    assert all(partner[i] != i for i in range(len(solutions)))
    np.testing.assert_array_equal(swap_partners(["#### 1", "#### 2"]), [1, 0])
    with pytest.raises(ValueError, match="two problems or more"):
        swap_partners(["#### 1"])


def test_swap_partners_pair_the_demo_tasks_problems_of_one_length():
    """On the demo task every group of one number of operations has one question length: the swap feeds
    thoughts computed on a question of the same shape."""
    from codi_attn.demo.task import synthetic_records

    records = synthetic_records("test", 60)
    partner = swap_partners([r["answer"] for r in records])
    for i, j in enumerate(partner):
        assert j != i and solution_steps(records[i]["answer"]) == solution_steps(records[j]["answer"])
        assert len(records[i]["question"].split()) == len(records[j]["question"].split())


class _Nudge(Hook):
    """Adds a fixed vector to the logits of decode step 1 (EOT stays at -inf)."""

    points = ("decode.1.logits",)

    def __init__(self, delta: np.ndarray):
        self.delta = torch.as_tensor(delta, dtype=torch.float32)

    def __call__(self, value, point, batch):
        return value + self.delta


class _SwapFirstToken(Hook):
    """Replaces decode token 0 of the given problems by another ordinary token (100, or 101 where it was 100)."""

    points = ("decode.0.token",)

    def __init__(self, problems):
        self.problems = set(problems)

    def __call__(self, value, point, batch):
        hit = torch.as_tensor([int(r) in self.problems for r in batch.rows])
        return torch.where(hit, torch.where(value == 100, 101, 100), value)


def _shift_baseline(model):
    """The baseline's tokens, its logits at decode step 1, and its top-2 tokens there (answer, runner-up)."""
    base = AnswerLogits(len(QUESTIONS), steps=np.full(len(QUESTIONS), 1))
    gen = Runner(model, batch_size=2, max_new_tokens=3).run(QUESTIONS, [base])
    assert (base.step == 1).all()  # every question decodes a step 1
    top2 = np.argsort(-base.logits, axis=1)[:, :2]
    return gen.tokens, base, top2[:, 0], top2[:, 1]


def test_answer_shift_kl_is_kl_of_baseline_from_condition(gpt2_model):
    """kl = sum p_base (log p_base - log p_cond) over the tokens the baseline can emit (EOT excluded), from the
    baseline's and the condition's recorded logits at the answer step; logit_diff = the condition's logit of the
    answer minus the runner-up's there."""
    tokens, base, answer, runner_up = _shift_baseline(gpt2_model)
    delta = np.random.default_rng(0).normal(size=base.logits.shape[1]) * 2.0
    cond = AnswerLogits(len(QUESTIONS), steps=base.step)
    shift = AnswerShift(base.logits, base.step, tokens, answer, runner_up)
    Runner(gpt2_model, batch_size=2, max_new_tokens=3).run(QUESTIONS, [_Nudge(delta), cond, shift])
    eot = gpt2_model.eot_id
    for k in range(len(QUESTIONS)):
        p_logits, q_logits = np.delete(base.logits[k], eot).astype(float), np.delete(cond.logits[k], eot).astype(float)
        log_p = p_logits - np.log(np.exp(p_logits - p_logits.max()).sum()) - p_logits.max()
        log_q = q_logits - np.log(np.exp(q_logits - q_logits.max()).sum()) - q_logits.max()
        expected = float(np.sum(np.exp(log_p) * (log_p - log_q)))
        reverse = float(np.sum(np.exp(log_q) * (log_q - log_p)))
        assert abs(expected - reverse) > 1e-3  # the nudge tells the two directions apart
        assert shift.kl[k] == pytest.approx(expected, rel=1e-4, abs=1e-7)
        assert shift.logit_diff[k] == pytest.approx(cond.logits[k, answer[k]] - cond.logits[k, runner_up[k]],
                                                    abs=1e-4)


def test_answer_shift_compares_only_where_the_context_is_the_baselines(gpt2_model):
    """A condition that changes decode token 0 of problems 0 and 2 leaves their kl and logit_diff nan (another
    context at the answer step); the other problems, and every problem of a condition that keeps the baseline's
    tokens, get values (kl 0 and the baseline's own logit difference where nothing is changed)."""
    tokens, base, answer, runner_up = _shift_baseline(gpt2_model)
    runner = Runner(gpt2_model, batch_size=2, max_new_tokens=3)
    changed = AnswerShift(base.logits, base.step, tokens, answer, runner_up)
    gen = runner.run(QUESTIONS, [_SwapFirstToken([0, 2]), changed])
    assert (gen.tokens[[0, 2], 0] != tokens[[0, 2], 0]).all()
    assert np.isnan(changed.kl[[0, 2]]).all() and np.isnan(changed.logit_diff[[0, 2]]).all()
    assert np.isfinite(changed.kl[[1, 3]]).all() and np.isfinite(changed.logit_diff[[1, 3]]).all()
    same = AnswerShift(base.logits, base.step, tokens, answer, runner_up)
    runner.run(QUESTIONS, [_SwapFirstToken([]), same])
    np.testing.assert_allclose(same.kl, 0.0, atol=1e-9)
    rows = np.arange(len(QUESTIONS))
    np.testing.assert_allclose(same.logit_diff, base.logits[rows, answer] - base.logits[rows, runner_up], atol=1e-5)


def test_answer_logits_ignore_what_a_row_computes_after_its_stop(gpt2_model):
    """A row that has stopped still runs in the batch, but what it 'decodes' afterwards is not its text: problem 0
    stops at token 0, then every row is steered to a digit at step 1; problem 0 gets no answer token (step -1,
    nan logits) from the number detection nor from a given step, the others get step 1 with the digit's logits."""
    stop = gpt2_model.stop_ids[0]
    word, digit = (gpt2_model.tokenizer(t, add_special_tokens=False)["input_ids"][0] for t in (" clips", "7"))
    numbers = number_tokens(gpt2_model)
    assert not numbers[word] and numbers[digit] and not numbers[stop]

    def steer(v, p, b):
        v = v.clone()
        if p.step == 0:
            v[:, word] = 1e9
            v[[list(b.rows).index(0)] if 0 in b.rows else [], stop] = 2e9
        else:
            v[:, digit] = 1e9
        return v

    found = AnswerLogits(len(QUESTIONS), numbers=numbers)
    given = AnswerLogits(len(QUESTIONS), steps=np.full(len(QUESTIONS), 1))
    gen = Runner(gpt2_model, batch_size=4, max_new_tokens=3).run(QUESTIONS, [("decode.*.logits", steer), found, given])
    assert gen.tokens[0].tolist() == [stop, -1, -1] and (gen.tokens[1:, :2] == [word, digit]).all()
    for hook in (found, given):
        assert hook.step.tolist() == [-1, 1, 1, 1]
        assert np.isnan(hook.logits[0]).all() and (hook.logits[1:].argmax(-1) == digit).all()
