"""Attention capture against an independent full-sequence computation, invariants, batching and codi-spec traps
1, 2 and 8."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from codi_attn import runner as runner_mod
from codi_attn.conventions import MASS_PARTS, N_THOUGHTS
from codi_attn.extract import CaptureAttention, extract
from codi_attn.hooks import RecordThoughts
from codi_attn.runner import Runner, prefill_groups, tokenize_questions
from reference import PADDED_GROUP, QUESTIONS, full_sequence_reference
from steering import forced_answer

def extract_with_thoughts(model, questions, **kwargs):
    """extract plus the thoughts it fed: (Extraction, RecordThoughts)."""
    thoughts = RecordThoughts(len(questions))
    return extract(model, questions, hooks=[thoughts], **kwargs), thoughts


def test_capture_equals_full_sequence_forward(any_model):
    ex, thoughts = extract_with_thoughts(any_model, QUESTIONS[:2], batch_size=2, max_new_tokens=2)
    for k, question in enumerate(QUESTIONS[:2]):
        block, split = full_sequence_reference(any_model, question, thoughts.z[k])
        np.testing.assert_allclose(ex.attention[k], block, atol=1e-5)
        np.testing.assert_allclose(ex.mass[k], split, atol=1e-5)


def test_first_thought_is_projection_of_bot_hidden_state(any_model):
    """Trap 1: z1 = prj(last hidden state at BOT); BOT is part of the question forward, not a 'step 0'."""
    _, thoughts = extract_with_thoughts(any_model, QUESTIONS[:1], max_new_tokens=1)
    ids = tokenize_questions(any_model, QUESTIONS[:1])[0]
    assert ids[-1] == any_model.bot_id
    with torch.no_grad():
        hidden = any_model.lm.base_model(input_ids=torch.tensor([ids])).last_hidden_state[0, -1]
        z1 = any_model.prj(hidden).numpy()
    np.testing.assert_allclose(thoughts.z[0, 0], z1, atol=1e-5)
    assert thoughts.z.shape[1] == N_THOUGHTS


def test_invariants_causal_diagonal_mass(any_model):
    """Shapes, dtypes and what the extraction must never give: an empty diagonal (trap 1) or row 0, a mass split
    that does not sum to 1, a 6x6 block holding a whole row. (Causality and the block's values are checked against
    one full forward by the full_sequence_reference tests above.)"""
    ex = extract(any_model, QUESTIONS, batch_size=3, max_new_tokens=2)
    n, layers, heads = len(QUESTIONS), any_model.n_layers, any_model.n_heads
    assert ex.attention.shape == (n, layers, heads, 6, 6) and ex.attention.dtype == np.float32
    assert ex.mass.shape == (n, layers, heads, 6, len(MASS_PARTS))
    diagonal = np.diagonal(ex.attention, axis1=-2, axis2=-1)
    assert np.all(diagonal > 0), "self-attention of each thought must not be zero (trap 1 signature)"
    assert np.all(ex.attention[..., 0, 0] > 0), "row 0 (z1 attending itself) must not be empty"
    np.testing.assert_allclose(ex.mass.sum(-1), 1.0, atol=1e-3)
    assert np.all(ex.attention.sum(-1) < 1.0)  # rows of the 6x6 block are fractions of the whole row


def test_llama_has_bos_sink_and_32_style_query_heads(llama_model):
    """LLaMA: BOS is the first token (the sink); attention comes per query head, not per KV head."""
    ids = tokenize_questions(llama_model, QUESTIONS[:1])[0]
    assert ids[0] == llama_model.tokenizer.bos_token_id
    assert llama_model.n_kv_heads < llama_model.n_heads
    ex = extract(llama_model, QUESTIONS[:1], max_new_tokens=1)
    assert ex.attention.shape[2] == llama_model.n_heads
    # heads sharing a KV head still differ (their queries differ)
    assert not np.allclose(ex.attention[0, :, 0], ex.attention[0, :, 1])


@pytest.mark.parametrize("questions, batch_size", [(QUESTIONS, 2), (QUESTIONS, 4), (PADDED_GROUP, 3)],
                         ids=["pairs", "groups joined", "one padded group"])
def test_batch_equals_batch_of_one(any_model, questions, batch_size):
    """Trap 8: left padding with masks and positions gives every problem its batch-of-one result: in the thought
    and decode steps, across prefill groups whose caches are joined, and inside one left-padded prefill forward."""
    lengths = [len(t) for t in tokenize_questions(any_model, questions)]
    assert len(set(lengths)) > 1, "questions must have uneven lengths"
    if batch_size == 4:
        assert len(prefill_groups(lengths)) > 1, "the grouped prefill (caches joined) must be exercised"
    if questions is PADDED_GROUP:
        assert len(prefill_groups(lengths)) == 1, "the padded prefill forward must be exercised"
    batched = extract(any_model, questions, batch_size=batch_size, max_new_tokens=6)
    for k, question in enumerate(questions):
        single = extract(any_model, [question], max_new_tokens=6)
        np.testing.assert_allclose(batched.attention[k], single.attention[0], atol=1e-4)
        np.testing.assert_allclose(batched.mass[k], single.mass[0], atol=1e-4)
        assert batched.text[k] == single.text[0]


def test_capture_works_in_a_run_with_gradients(unpacked_models):
    """Under Runner(gradients=True) (attribution patching) the capture records what inference records."""
    model = unpacked_models["gpt2"]
    capture = CaptureAttention(model, len(QUESTIONS))
    Runner(model, batch_size=2, max_new_tokens=2, gradients=True).run(QUESTIONS, [capture])
    plain = extract(model, QUESTIONS, batch_size=2, max_new_tokens=2)
    np.testing.assert_allclose(capture.attention, plain.attention, rtol=0, atol=1e-6)
    np.testing.assert_allclose(capture.mass, plain.mass, rtol=0, atol=1e-6)


def test_results_come_back_in_input_order(gpt2_model):
    forward = extract(gpt2_model, QUESTIONS, batch_size=2, max_new_tokens=2)
    backward = extract(gpt2_model, QUESTIONS[::-1], batch_size=2, max_new_tokens=2)
    np.testing.assert_allclose(forward.attention, backward.attention[::-1], atol=1e-5)


def test_missing_attention_weights_fail_loudly(gpt2_model, monkeypatch):
    """Trap 2: under sdpa, transformers 5 returns no weights; the extractor must refuse, not store zeros."""
    real = runner_mod.attention_implementation
    monkeypatch.setattr(runner_mod, "attention_implementation", lambda lm, name: real(lm, "sdpa"))
    with pytest.raises(RuntimeError, match="trap 2"):
        extract(gpt2_model, QUESTIONS[:1], max_new_tokens=1)


def test_progress_reports_every_problem(gpt2_model):
    seen = []
    extract(gpt2_model, QUESTIONS, batch_size=3, max_new_tokens=1, progress=seen.append)
    assert seen == [3, 1]


def test_correctness_uses_parsed_answers(gpt2_model):
    """Decoding forced to 'The answer is: 7': parsed to 7 for both problems, right against gold 7 ("#### 7" or
    "7"), wrong against 5."""
    with forced_answer(gpt2_model, "The answer is: 7"):
        ex = extract(gpt2_model, QUESTIONS[:3], golds=["#### 5", "#### 7", "7"], max_new_tokens=8)
    assert ex.text == ["The answer is: 7"] * 3
    np.testing.assert_array_equal(ex.prediction, [7.0] * 3)
    assert ex.correct.tolist() == [False, True, True]
    with pytest.raises(ValueError, match="3 gold answers for 2 problems"):
        extract(gpt2_model, QUESTIONS[:2], golds=["1", "2", "3"], max_new_tokens=1)


def test_generated_tokens_are_kept(gpt2_model):
    ex = extract(gpt2_model, QUESTIONS, batch_size=2, max_new_tokens=3)
    assert ex.tokens.shape == (len(QUESTIONS), 3) and ex.tokens.dtype == np.int64
    assert [runner_mod.decode_answer(gpt2_model, row) for row in ex.tokens] == ex.text
