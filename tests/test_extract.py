"""Extraction against an independent full-sequence computation, invariants, batching and codi-spec traps 1, 2, 8."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from codi_attn import extract as extract_mod
from codi_attn.extract import (MASS_PARTS, N_LATENTS, PREFILL_EFFICIENCY, PreallocatedLayer, extract, prefill_groups,
                                tokenize_questions)

QUESTIONS = [
    "Natalia sold 48 clips in April. How many clips?",
    "A robe takes 2 bolts of blue fiber and half that much white fiber.  How many bolts in total does it take?",
    "Weng earns $12 an hour.",
    "James writes a 3-page letter to 2 different friends twice a week. How many pages does he write a year?",
]


def full_sequence_reference(model, question: str, latents: np.ndarray):
    """6x6 block and mass split from ONE eager forward over [question, BOT, z1..z6] (no cache, no batching).

    Independent of the extractor's cache, padding and row bookkeeping: positions are read straight off
    the codi-spec layout (question 0..Q-1, BOT at Q, z_i at Q+1+i).
    """
    ids = tokenize_questions(model, [question])[0]
    q = len(ids) - 1
    embed = model.lm.get_input_embeddings()
    with torch.no_grad():
        seq = torch.cat([embed(torch.tensor([ids])), torch.tensor(latents[None], dtype=model.dtype)], dim=1)
        model.lm.set_attn_implementation("eager")
        try:
            out = model.lm.base_model(inputs_embeds=seq, output_attentions=True)
        finally:
            model.lm.set_attn_implementation("sdpa")
    full = torch.stack(out.attentions, dim=1)[0].float().numpy()  # [L, H, S, S]
    rows = full[:, :, q + 1: q + 1 + N_LATENTS, :]  # [L, H, 6, S]
    block = rows[..., q + 1: q + 1 + N_LATENTS]
    split = np.stack([rows[..., 0], rows[..., 1:q].sum(-1), rows[..., q], block.sum(-1)], axis=-1)
    return block, split


def test_capture_equals_full_sequence_forward(any_model):
    ex = extract(any_model, QUESTIONS[:2], batch_size=2, max_new_tokens=2, keep_latents=True)
    for k, question in enumerate(QUESTIONS[:2]):
        block, split = full_sequence_reference(any_model, question, ex.latents[k])
        np.testing.assert_allclose(ex.attention[k], block, atol=1e-5)
        np.testing.assert_allclose(ex.mass[k], split, atol=1e-5)


def test_first_latent_is_projection_of_bot_hidden_state(any_model):
    """Trap 1: z1 = prj(last hidden state at BOT); BOT is part of the question forward, not a 'step 0'."""
    ex = extract(any_model, QUESTIONS[:1], max_new_tokens=1, keep_latents=True)
    ids = tokenize_questions(any_model, QUESTIONS[:1])[0]
    assert ids[-1] == any_model.bot_id
    with torch.no_grad():
        hidden = any_model.lm.base_model(input_ids=torch.tensor([ids])).last_hidden_state[0, -1]
        z1 = any_model.prj(hidden).numpy()
    np.testing.assert_allclose(ex.latents[0, 0], z1, atol=1e-5)
    assert ex.latents.shape[1] == N_LATENTS


def test_invariants_causal_diagonal_mass(any_model):
    ex = extract(any_model, QUESTIONS, batch_size=3, max_new_tokens=2)
    n, layers, heads = len(QUESTIONS), any_model.n_layers, any_model.n_heads
    assert ex.attention.shape == (n, layers, heads, 6, 6) and ex.attention.dtype == np.float32
    assert ex.mass.shape == (n, layers, heads, 6, len(MASS_PARTS))
    upper = np.triu_indices(6, k=1)
    assert np.all(ex.attention[..., upper[0], upper[1]] == 0.0)  # exactly zero: j > i is never attended
    diagonal = np.diagonal(ex.attention, axis1=-2, axis2=-1)
    assert np.all(diagonal > 0), "self-attention of each thought must not be zero (trap 1 signature)"
    assert np.all(ex.attention[..., 0, 0] > 0), "row 0 (z1 attending itself) must not be empty"
    np.testing.assert_allclose(ex.mass.sum(-1), 1.0, atol=1e-3)
    np.testing.assert_allclose(ex.mass[..., 3], ex.attention.sum(-1), atol=1e-6)
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


@pytest.mark.parametrize("batch_size", [2, 4])
def test_batch_equals_batch_of_one(any_model, batch_size):
    """Trap 8: left padding with masks and positions gives every problem its batch-of-one result."""
    lengths = [len(t) for t in tokenize_questions(any_model, QUESTIONS)]
    assert len(set(lengths)) == len(QUESTIONS), "questions must have uneven lengths"
    if batch_size == len(QUESTIONS):
        assert len(prefill_groups(lengths)) > 1, "the grouped prefill (caches joined) must be exercised"
    batched = extract(any_model, QUESTIONS, batch_size=batch_size, max_new_tokens=6, keep_latents=True)
    for k, question in enumerate(QUESTIONS):
        single = extract(any_model, [question], max_new_tokens=6, keep_latents=True)
        np.testing.assert_allclose(batched.attention[k], single.attention[0], atol=1e-4)
        np.testing.assert_allclose(batched.mass[k], single.mass[0], atol=1e-4)
        np.testing.assert_allclose(batched.latents[k], single.latents[0], atol=1e-4)
        assert batched.text[k] == single.text[0]


def test_results_come_back_in_input_order(gpt2_model):
    forward = extract(gpt2_model, QUESTIONS, batch_size=2, max_new_tokens=2)
    backward = extract(gpt2_model, QUESTIONS[::-1], batch_size=2, max_new_tokens=2)
    np.testing.assert_allclose(forward.attention, backward.attention[::-1], atol=1e-5)


def test_missing_attention_weights_fail_loudly(gpt2_model, monkeypatch):
    """Trap 2: under sdpa, transformers 5 returns no weights; the extractor must refuse, not store zeros."""
    real = extract_mod.attention_implementation
    monkeypatch.setattr(extract_mod, "attention_implementation", lambda lm, name: real(lm, "sdpa"))
    with pytest.raises(RuntimeError, match="trap 2"):
        extract(gpt2_model, QUESTIONS[:1], max_new_tokens=1)


def test_progress_reports_every_problem(gpt2_model):
    seen = []
    extract(gpt2_model, QUESTIONS, batch_size=3, max_new_tokens=1, progress=seen.append)
    assert seen == [3, 1]


def test_decoding_stops_at_stop_token(gpt2_model, monkeypatch):
    """Greedy decoding ends at the stop token: making the argmax's first pick a stop token yields no text."""
    first = extract(gpt2_model, QUESTIONS[:1], max_new_tokens=3)
    ids = gpt2_model.tokenizer(first.text[0])["input_ids"]
    assert ids, "random fixture decodes something before the budget runs out"
    monkeypatch.setattr(gpt2_model, "stop_ids", tuple(range(len(gpt2_model.tokenizer) + 3)))
    assert extract(gpt2_model, QUESTIONS[:1], max_new_tokens=3).text == [""]


def test_correctness_uses_parsed_answers(gpt2_model):
    ex = extract(gpt2_model, QUESTIONS[:2], golds=["#### 5", "#### 7"], max_new_tokens=4)
    for text, pred, ok, gold in zip(ex.text, ex.prediction, ex.correct, [5.0, 7.0]):
        assert ok == (not np.isnan(pred) and pred == gold)


@pytest.mark.parametrize("question", ["", "   "])
def test_empty_question_is_rejected(gpt2_model, question):
    with pytest.raises(ValueError, match="question 1 is empty"):
        extract(gpt2_model, ["How many?", question])


def test_question_longer_than_context_is_rejected(gpt2_model):
    long = "one two three " * 400
    with pytest.raises(ValueError, match=r"question 0 has \d+ tokens.*context of 512"):
        extract(gpt2_model, [long])


def test_bad_batch_size(gpt2_model):
    with pytest.raises(ValueError, match="batch_size"):
        extract(gpt2_model, QUESTIONS, batch_size=0)


def test_blocked_latent_gets_exactly_zero_weight(any_model):
    """Trap 3: a blocked key receives exactly 0 from every later query; the rest of each row renormalises."""
    base = extract(any_model, QUESTIONS[:2], batch_size=2, max_new_tokens=2)
    blocked = extract(any_model, QUESTIONS[:2], batch_size=2, max_new_tokens=2, blocked_latents=[1])
    assert np.all(blocked.attention[..., 2:, 1] == 0.0)
    assert np.all(blocked.attention[..., 1, 1] > 0)  # its own step still sees itself
    np.testing.assert_allclose(blocked.mass.sum(-1), 1.0, atol=1e-3)
    np.testing.assert_array_equal(blocked.attention[..., :2, :], base.attention[..., :2, :])  # earlier rows untouched
    assert not np.allclose(blocked.attention[..., 2:, :], base.attention[..., 2:, :])


def test_no_op_intervention_reproduces_baseline_bit_for_bit(gpt2_model):
    """Trap 6: the same code path with nothing blocked must equal the baseline exactly."""
    base = extract(gpt2_model, QUESTIONS, batch_size=2, max_new_tokens=3, keep_logits=True)
    noop = extract(gpt2_model, QUESTIONS, batch_size=2, max_new_tokens=3, keep_logits=True, blocked_latents=[])
    np.testing.assert_array_equal(base.attention, noop.attention)
    np.testing.assert_array_equal(base.first_logits, noop.first_logits)
    assert base.text == noop.text


def test_blocked_latents_are_validated(gpt2_model):
    with pytest.raises(ValueError, match="thoughts 0..5"):
        extract(gpt2_model, QUESTIONS[:1], blocked_latents=[6])


def test_logit_lens_inputs(gpt2_model):
    """thought_hidden is the final-norm hidden state at each thought; prj of thought k is latent k+1."""
    ex = extract(gpt2_model, QUESTIONS[:1], max_new_tokens=1, keep_latents=True, keep_logits=True)
    with torch.no_grad():
        nxt = gpt2_model.prj(torch.tensor(ex.thought_hidden[0, :5])).numpy()
    np.testing.assert_allclose(nxt, ex.latents[0, 1:], atol=1e-5)
    assert ex.first_logits.shape == (1, gpt2_model.lm.config.vocab_size)


@pytest.mark.parametrize("lengths", [[5], [30, 10, 11, 29, 12, 31, 100], [7, 7, 7], list(range(1, 40))])
def test_prefill_groups_cover_every_row_once_with_little_padding(lengths):
    groups = prefill_groups(lengths)
    assert sorted(k for group in groups for k in group) == list(range(len(lengths)))
    for group in groups:
        real, padded = sum(lengths[k] for k in group), len(group) * max(lengths[k] for k in group)
        assert real >= PREFILL_EFFICIENCY * padded


def test_prefill_groups_by_hand():
    assert prefill_groups([7, 7, 7]) == [[0, 1, 2]]
    # sorted 10 11 12 29 30 31 100; at 0.9: 33 real of 36 padded keeps 10-12 together, at 0.95 it does not
    assert prefill_groups([30, 10, 11, 29, 12, 31, 100], efficiency=0.9) == [[1, 2, 4], [3, 0, 5], [6]]
    assert prefill_groups([30, 10, 11, 29, 12, 31, 100], efficiency=0.95) == [[1, 2], [4], [3, 0, 5], [6]]


def test_preallocated_layer_equals_concatenation_and_grows():
    """Writing into reserved room (and growing past it) gives exactly what DynamicLayer's torch.cat gives."""
    from transformers.cache_utils import DynamicLayer

    torch.manual_seed(0)
    room, plain = PreallocatedLayer(capacity=6), DynamicLayer()
    for n in (4, 1, 1, 3, 1):  # prefill, then one-position steps; 4 + 1 + 1 exactly fills, 3 more must grow
        k, v = torch.randn(2, 3, n, 5), torch.randn(2, 3, n, 5)
        got, want = room.update(k, v), plain.update(k, v)
        for a, b in zip(got, want):
            assert torch.equal(a, b)
        assert room.get_seq_length() == plain.get_seq_length()
    assert room.buffers[0].shape[-2] >= 10


def test_extractor_cache_is_preallocated(gpt2_model, monkeypatch):
    """The extractor's cache layers are PreallocatedLayers with room for latents, EOT and the decode budget
    (no regrowth in a normal run)."""
    seen = []
    original = extract_mod.preallocated_cache

    def spy(config, capacity):
        seen.append(original(config, capacity))
        return seen[-1]

    monkeypatch.setattr(extract_mod, "preallocated_cache", spy)
    extract(gpt2_model, QUESTIONS[:2], batch_size=2, max_new_tokens=4)
    layers = seen[0].layers
    assert all(isinstance(layer, PreallocatedLayer) for layer in layers)
    width = max(len(t) for t in tokenize_questions(gpt2_model, QUESTIONS[:2]))
    assert {layer.buffers[0].shape[-2] for layer in layers} == {width + N_LATENTS + 4}  # last token not fed


def test_fed_latents_replace_the_projection(any_model):
    """Fed its own latents, a problem reproduces its run; fed another problem's, its thoughts and their
    attention change, and the capture still equals the independent full-sequence forward over the fed z."""
    base = extract(any_model, QUESTIONS[:3], batch_size=3, max_new_tokens=3, keep_latents=True)
    again = extract(any_model, QUESTIONS[:3], batch_size=3, max_new_tokens=3, keep_latents=True,
                    fed_latents=base.latents)
    np.testing.assert_allclose(again.attention, base.attention, atol=1e-6)
    np.testing.assert_array_equal(again.latents, base.latents)
    assert again.text == base.text
    swapped = np.roll(base.latents, 1, axis=0)  # problem k gets the thoughts of problem k-1
    other = extract(any_model, QUESTIONS[:3], batch_size=3, max_new_tokens=3, keep_latents=True, fed_latents=swapped)
    np.testing.assert_array_equal(other.latents, swapped)
    assert np.abs(other.attention - base.attention).max() > 1e-3
    for k, question in enumerate(QUESTIONS[:3]):
        block, split = full_sequence_reference(any_model, question, swapped[k])
        np.testing.assert_allclose(other.attention[k], block, atol=1e-5)
        np.testing.assert_allclose(other.mass[k], split, atol=1e-5)


def test_fed_latents_must_match_problems_and_shape(gpt2_model):
    d = gpt2_model.lm.config.hidden_size
    with pytest.raises(ValueError, match=r"fed_latents must have shape \(2, 6, %d\)" % d):
        extract(gpt2_model, QUESTIONS[:2], fed_latents=np.zeros((3, N_LATENTS, d), np.float32))


@pytest.mark.parametrize("order", ["one group", "several groups"])
def test_padded_batch_prefill_gives_every_row_its_own_result(gpt2_model, order):
    """PaddedBatch.prefill, rows NOT sorted by length: each row's last hidden state and its cached keys and
    values (at its own positions) equal a batch-of-one prefill; cache positions left of its group hold zeros."""
    from codi_attn.extract import PaddedBatch

    ids = tokenize_questions(gpt2_model, QUESTIONS)
    rows = [ids[1], ids[1][1:]] if order == "one group" else [ids[1], ids[2], ids[3], ids[1][1:], ids[0]]
    groups = prefill_groups([len(r) for r in rows])
    assert len(groups) == 1 if order == "one group" else len(groups) > 1 and max(map(len, groups)) > 1
    with torch.no_grad():
        batch = PaddedBatch(gpt2_model, rows, max_new_tokens=3)
        hidden = batch.prefill()
        for b, row in enumerate(rows):
            single = PaddedBatch(gpt2_model, [row], max_new_tokens=3)
            torch.testing.assert_close(hidden[b], single.prefill()[0], atol=1e-5, rtol=1e-5)
            for joined, alone in zip(batch.cache.layers, single.cache.layers):
                pad = batch.width - len(row)
                torch.testing.assert_close(joined.keys[b, :, pad:], alone.keys[0], atol=1e-5, rtol=1e-5)
                torch.testing.assert_close(joined.values[b, :, pad:], alone.values[0], atol=1e-5, rtol=1e-5)
                # left of its group's width: zeros joined in (inside it: the pad token's masked keys)
                group = next(g for g in groups if b in g)
                outside = batch.width - max(len(rows[k]) for k in group)
                assert not joined.keys[b, :, :outside].any() and not joined.values[b, :, :outside].any()


def test_preallocated_layer_refuses_what_would_leave_it_stale():
    layer = PreallocatedLayer(capacity=4)
    layer.update(torch.zeros(1, 1, 2, 3), torch.zeros(1, 1, 2, 3))
    for call in (lambda: layer.crop(-1), layer.reset, lambda: layer.batch_select_indices(torch.tensor([0]))):
        with pytest.raises(NotImplementedError, match="only appends"):
            call()


def test_sliding_window_models_are_refused():
    from transformers import MistralConfig

    with pytest.raises(NotImplementedError, match="full-attention models"):
        extract_mod.preallocated_cache(MistralConfig(sliding_window=4, num_hidden_layers=2), 8)


def test_answer_token_steps_and_logits(gpt2_model):
    """keep_logits: answer_step is where the number starts (the first generated token whose decoded text has a
    digit or is a minus sign; -1 with nan logits if none), checked against the decoded tokens; the logits kept
    there pick that token; steps handed back in (`answer_steps`) keep the logits at exactly those steps, and
    the detected steps reproduce them bit for bit."""
    ex = extract(gpt2_model, QUESTIONS, batch_size=2, max_new_tokens=6, keep_logits=True)
    assert ex.tokens.shape == (len(QUESTIONS), 6) and ex.answer_logits.shape == ex.first_logits.shape
    decoded = gpt2_model.tokenizer.decode
    found = 0
    for k in range(len(QUESTIONS)):
        generated = [t for t in ex.tokens[k].tolist() if t >= 0]
        starts = [i for i, t in enumerate(generated)
                  if any(c in "0123456789" for c in decoded([t])) or decoded([t]).strip() == "-"]
        if not starts:
            assert ex.answer_step[k] == -1 and np.isnan(ex.answer_logits[k]).all()
            continue
        found += 1
        assert ex.answer_step[k] == starts[0]
        assert ex.answer_logits[k].argmax() == generated[starts[0]]
        if starts[0] == 0:
            np.testing.assert_array_equal(ex.answer_logits[k], ex.first_logits[k])
    assert found, "the fixture generates a digit for some question: the detection path runs"
    again = extract(gpt2_model, QUESTIONS, batch_size=2, max_new_tokens=6, keep_logits=True,
                    answer_steps=ex.answer_step)
    np.testing.assert_array_equal(again.answer_logits, ex.answer_logits)
    steps = np.array([0, 3, 5, -1])
    fixed = extract(gpt2_model, QUESTIONS, batch_size=2, max_new_tokens=6, keep_logits=True, answer_steps=steps)
    for k, step in enumerate(steps):
        if step < 0 or fixed.tokens[k, step] < 0:  # none asked, or decoding stopped before it
            assert fixed.answer_step[k] == -1 and np.isnan(fixed.answer_logits[k]).all()
        else:
            assert fixed.answer_step[k] == step and fixed.answer_logits[k].argmax() == fixed.tokens[k, step]
    with pytest.raises(ValueError, match="answer_steps must have one step per question"):
        extract(gpt2_model, QUESTIONS, keep_logits=True, answer_steps=steps[:2])
    with pytest.raises(ValueError, match="answer_steps needs keep_logits"):
        extract(gpt2_model, QUESTIONS, answer_steps=steps)


def test_number_tokens_are_digits_or_a_minus_sign_never_special_tokens(gpt2_model):
    """Where an answer's number starts: decoded text with a digit or a bare minus; special tokens whose names
    hold digits (LLaMA-3's reserved tokens) and CODI's pad/BOT/EOT are not."""
    import copy
    from types import SimpleNamespace

    from codi_attn.extract import number_tokens

    tokenizer = copy.deepcopy(gpt2_model.tokenizer)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|reserved_special_token_7|>"]})
    fake = SimpleNamespace(tokenizer=tokenizer, lm=gpt2_model.lm, device=gpt2_model.device)
    mask = number_tokens(fake)
    reserved = tokenizer.convert_tokens_to_ids("<|reserved_special_token_7|>")
    assert not mask[reserved] and not mask[[gpt2_model.pad_id, gpt2_model.bot_id, gpt2_model.eot_id]].any()
    for text in ("7", "48", "-"):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert len(ids) == 1 and mask[ids[0]], text
    for text in (" clips", "The", ":"):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert not mask[ids].any(), text
