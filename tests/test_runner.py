"""The latent runner: hook points (names, shapes, each fired once for its k, l, t), no-op and reused-prefill
invariants bit for bit, batching (codi-spec trap 8), the cache, decoding, and hooks on a prepacked model."""
from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch

from codi_attn import runner as runner_mod
from codi_attn.conventions import N_THOUGHTS, THOUGHTS
from codi_attn.kv_cache import PreallocatedLayer
from codi_attn.runner import (PREFILL_EFFICIENCY, PaddedBatch, Runner, consecutive_runs, decode_answer, head_dim,
                              layer_module, number_tokens, point, point_names, prefill_groups, tokenize_questions)
from reference import QUESTIONS, latent_loop
from steering import steered

class Spy:
    """Records (name, shape, batch rows) of every call at the points it is attached to; replaces nothing."""

    def __init__(self, *points: str):
        self.points = points
        self.calls: list[tuple[str, tuple, tuple]] = []

    def __call__(self, value, point, batch):
        self.calls.append((point.name, tuple(value.shape), tuple(int(r) for r in batch.rows)))


def test_point_names_parse_into_k_l_t():
    assert point("thought.3.head_in.2") == runner_mod.Point("thought.3.head_in.2", "thought", "head_in", 3, 2)
    assert point("decode.7.logits").step == 7 and point("decode.7.logits").kind == "logits"
    assert point("prefill").kind == "hidden" and point("prefill.resid.1").layer == 1
    for bad in ("thought.0.z", "thought.7.z", "decode.x.logits", "thought.1.attn", "prefill.attn.0", "z"):
        with pytest.raises(ValueError):
            point(bad)
    names = point_names(2, 3)
    assert len(names) == len(set(names)) and "decode.2.token" in names and "decode.3.token" not in names


def test_layer_points_hook_the_modules_named_in_transformers(any_model):
    """Trap 4: head_in is the input of the attention's output projection (GPT-2's attn.c_proj, LLaMA's
    self_attn.o_proj), not of the MLP's; attn is the attention module, resid the block (module names written
    out here from transformers' modeling files, not read from the presets)."""
    lm = any_model.lm
    for layer in range(any_model.n_layers):
        if any_model.family == "gpt2":
            block = lm.transformer.h[layer]
            attention, projection = block.attn, block.attn.c_proj
        else:
            block = lm.model.layers[layer]
            attention, projection = block.self_attn, block.self_attn.o_proj
        assert layer_module(any_model, "resid", layer) is block
        assert layer_module(any_model, "attn", layer) is attention
        assert layer_module(any_model, "head_in", layer) is projection


def test_every_point_fires_once_per_batch_with_its_shape(gpt2_model):
    """Each point fires exactly once per batch for its (k, l, t) with the documented shape; prefill layer points
    fire once per prefill group, the groups covering the batch's rows once."""
    m = gpt2_model
    spy = Spy("*")
    budget, h, d, dh = 3, m.n_heads, m.lm.config.hidden_size, head_dim(m)
    gen = Runner(m, batch_size=4, max_new_tokens=budget).run(QUESTIONS, [spy])
    steps = gen.tokens.shape[1]
    ids = tokenize_questions(m, QUESTIONS)
    width = max(map(len, ids))
    counts = Counter(name for name, _, _ in spy.calls)
    shapes = {name: shape for name, shape, _ in spy.calls}
    b = len(QUESTIONS)
    assert counts["prefill"] == 1 and shapes["prefill"] == (b, d)
    groups = prefill_groups([len(t) for t in ids])
    for layer in range(m.n_layers):
        calls = [(shape, rows) for name, shape, rows in spy.calls if name == f"prefill.head_in.{layer}"]
        assert len(calls) == len(groups) > 1
        assert sorted(r for _, rows in calls for r in rows) == list(range(b))
        assert all(shape[0] == len(rows) and shape[2:] == (h, dh) for shape, rows in calls)
    for k in THOUGHTS:
        assert shapes[f"thought.{k}.z"] == shapes[f"thought.{k}.hidden"] == (b, d)
        assert shapes[f"thought.{k}.mask"] == (b, width + k)
        for layer in range(m.n_layers):
            assert shapes[f"thought.{k}.attn.{layer}"] == (b, h, width + k)
            assert shapes[f"thought.{k}.head_in.{layer}"] == (b, h, dh)
            assert shapes[f"thought.{k}.resid.{layer}"] == (b, d)
    for t in range(steps):
        assert shapes[f"decode.{t}.logits"] == (b, m.lm.get_output_embeddings().weight.shape[0])
        assert shapes[f"decode.{t}.token"] == (b,)
        assert all(counts[f"decode.{t}.{kind}.{layer}"] == 1 for kind in ("head_in", "resid")
                   for layer in range(m.n_layers))
    assert all(c == 1 for name, c in counts.items() if not name.startswith("prefill."))
    assert not any(name.startswith(f"decode.{steps}.") for name in counts)  # the last token is never fed


def test_points_fire_in_the_order_the_model_computes_them(gpt2_model):
    spy = Spy("thought.1.*", "thought.2.z")
    Runner(gpt2_model, max_new_tokens=1).run(QUESTIONS[:1], [spy])
    order = [name for name, _, _ in spy.calls]
    layers = [f"thought.1.{kind}.{l}" for l in range(gpt2_model.n_layers) for kind in ("head_in", "attn", "resid")]
    assert order == ["thought.1.z", *layers, "thought.1.mask", "thought.1.hidden", "thought.2.z"]


def test_no_op_hooks_reproduce_the_plain_run_bit_for_bit(any_model):
    """Hooks that return their input unchanged, or a copy of it written back, at every point change nothing."""
    plain = Runner(any_model, batch_size=3, max_new_tokens=4).run(QUESTIONS)
    copy_back = [("*.head_in.*", lambda v, p, b: v.clone()), ("*.resid.*", lambda v, p, b: v.clone()),
                 ("thought.*.z", lambda v, p, b: v.clone()), ("decode.*.logits", lambda v, p, b: v.clone()),
                 ("thought.*.mask", lambda v, p, b: v.clone()), ("prefill", lambda v, p, b: v.clone())]
    for hooks in ([Spy("*")], copy_back):
        again = Runner(any_model, batch_size=3, max_new_tokens=4).run(QUESTIONS, hooks)
        np.testing.assert_array_equal(again.tokens, plain.tokens)
        assert again.text == plain.text


def test_reused_prefill_equals_a_fresh_one_bit_for_bit(gpt2_model):
    """run_conditions shares each batch's prefill (rewinding the cache) between conditions without prefill hooks;
    every condition's results equal its own run, bit for bit, whatever ran before it on the same prefill."""
    from codi_attn.hooks import BlockThoughts, RecordThoughts

    def stop_at_once(v, p, b):
        return torch.full_like(v, gpt2_model.stop_ids[0])

    def hooks():  # the first stops every row at its first token: `done` must not outlive the rewind
        return [[("decode.0.token", stop_at_once)], [RecordThoughts(4)], [BlockThoughts([2]), RecordThoughts(4)],
                [RecordThoughts(4)]]

    runner = Runner(gpt2_model, batch_size=3, max_new_tokens=4)
    shared = hooks()
    together = runner.run_conditions(QUESTIONS, shared)
    for c, (condition, generation) in enumerate(zip(hooks(), together)):
        alone = runner.run(QUESTIONS, condition)
        np.testing.assert_array_equal(generation.tokens, alone.tokens)
        if c == 0:
            assert (generation.tokens[:, 0] == gpt2_model.stop_ids[0]).all() and (generation.tokens[:, 1:] == -1).all()
            continue
        theirs = next(h for h in condition if isinstance(h, RecordThoughts))
        ours = next(h for h in shared[c] if isinstance(h, RecordThoughts))
        np.testing.assert_array_equal(ours.z, theirs.z)
        np.testing.assert_array_equal(ours.hidden, theirs.hidden)
    assert not np.array_equal(shared[2][1].hidden, shared[1][0].hidden)  # the blocking did act in between
    assert (together[1].tokens[:, 1:] >= 0).all()  # the random fixture never stops on its own


@pytest.fixture
def prefill_calls(monkeypatch) -> list[int]:
    """The batch size of every PaddedBatch.prefill call made while the test runs."""
    calls = []
    original = PaddedBatch.prefill

    def counting(self, *args):
        calls.append(len(self))
        return original(self, *args)

    monkeypatch.setattr(PaddedBatch, "prefill", counting)
    return calls


def test_prefill_is_computed_once_per_batch_for_conditions_that_share_it(gpt2_model, prefill_calls):
    calls = prefill_calls
    runner = Runner(gpt2_model, batch_size=2, max_new_tokens=2)
    runner.run_conditions(QUESTIONS, [[], [Spy("thought.*.z")], [Spy("decode.*.logits")]])
    assert calls == [2, 2]  # two batches, one prefill each
    calls.clear()
    runner.run_conditions(QUESTIONS, [[], [Spy("prefill.resid.0")]])  # prefill hooks need a prefill of their own
    assert calls == [2, 2, 2, 2]


def test_replacements_are_checked_and_read_only_points_refuse(gpt2_model):
    runner = Runner(gpt2_model, max_new_tokens=1)
    with pytest.raises(ValueError, match=r"must have the shape \(1, "):
        runner.run(QUESTIONS[:1], [("thought.2.z", lambda v, p, b: v[:, :3])])
    with pytest.raises(ValueError, match="read-only"):
        runner.run(QUESTIONS[:1], [("thought.2.attn.0", lambda v, p, b: v * 0)])
    with pytest.raises(ValueError, match="matches no hook point"):
        runner.run(QUESTIONS[:1], [("thought.0.z", lambda v, p, b: None)])
    with pytest.raises(ValueError, match="matches no hook point"):
        runner.run(QUESTIONS[:1], [("decode.5.logits", lambda v, p, b: None)])  # beyond max_new_tokens
    with pytest.raises(TypeError, match="a hook is"):
        runner.run(QUESTIONS[:1], [lambda v, p, b: None])


def test_thoughts_and_tokens_equal_codi_specs_loop_by_full_forwards(any_model):
    """z1..z6, the hidden state at each thought and the decoded ids of a batch of uneven questions equal
    codi-spec section 3 run by full forwards, one question at a time (reference.latent_loop: no cache, no
    padding, no batch)."""
    from codi_attn.hooks import RecordThoughts

    thoughts = RecordThoughts(len(QUESTIONS))
    run = Runner(any_model, batch_size=4, max_new_tokens=6).run(QUESTIONS, [thoughts])
    for k, question in enumerate(QUESTIONS):
        z, hidden, tokens = latent_loop(any_model, question, 6)
        np.testing.assert_allclose(thoughts.z[k], z, atol=2e-5, rtol=1e-4)
        np.testing.assert_allclose(thoughts.hidden[k], hidden, atol=2e-5, rtol=1e-4)
        assert run.tokens[k].tolist() == tokens + [-1] * (6 - len(tokens))


def test_a_replaced_thought_is_what_gets_fed(gpt2_model):
    """thought.{k}.z replacement: the next point sees it, and replacing z1 by itself changes nothing."""
    seen = {}

    def double(v, p, b):
        return 2 * v

    runner = Runner(gpt2_model, max_new_tokens=1)
    runner.run(QUESTIONS[:1], [("thought.1.z", double), ("thought.1.z", lambda v, p, b: seen.update(z=v)),
                               ("thought.1.hidden", lambda v, p, b: seen.update(h=v))])
    plain, itself = {}, {}
    base = runner.run(QUESTIONS[:1], [("thought.1.z", lambda v, p, b: plain.update(z=v)),
                                      ("thought.6.z", lambda v, p, b: plain.update(z6=v))])
    torch.testing.assert_close(seen["z"], 2 * plain["z"], rtol=0, atol=0)
    # what the model read at z1's position is the doubled vector: one full forward over [question, BOT, 2 z1]
    embed = gpt2_model.lm.get_input_embeddings()
    prompt = embed(torch.tensor([tokenize_questions(gpt2_model, QUESTIONS[:1])[0]]))
    seq = torch.cat([prompt, 2 * plain["z"][:, None]], 1)
    with torch.no_grad():
        fed = gpt2_model.lm.base_model(inputs_embeds=seq).last_hidden_state[:, -1]
    torch.testing.assert_close(seen["h"], fed, atol=1e-5, rtol=1e-5)
    again = runner.run(QUESTIONS[:1], [("thought.1.z", lambda v, p, b: v.clone()),
                                       ("thought.6.z", lambda v, p, b: itself.update(z6=v))])
    assert torch.equal(itself["z6"], plain["z6"]) and np.array_equal(again.tokens, base.tokens)


def test_replaced_residual_and_logits_steer_the_run(gpt2_model):
    """resid replacement changes what follows; logits replacement decides the token."""
    runner = Runner(gpt2_model, max_new_tokens=3)
    hidden = {}
    for name, hooks in (("base", []), ("zeroed", [("thought.2.resid.0", lambda v, p, b: torch.zeros_like(v))])):
        runner.run(QUESTIONS[:2], [*hooks, ("thought.2.hidden", lambda v, p, b, n=name: hidden.update({n: v}))])
    assert not torch.equal(hidden["base"], hidden["zeroed"])
    target = gpt2_model.tokenizer("7", add_special_tokens=False)["input_ids"][0]

    def force(v, p, b):
        v = v.clone()
        v[:, target] = 1e9
        return v

    forced = runner.run(QUESTIONS[:2], [("decode.*.logits", force)])
    assert (forced.tokens == target).all() and forced.text == ["777"] * 2


@pytest.mark.parametrize("batch_size", [2, 4])
def test_batch_equals_batch_of_one(any_model, batch_size):
    """Trap 8: left padding with masks and positions gives every problem its batch-of-one result (thoughts,
    hidden states, answers), with the grouped prefill exercised."""
    from codi_attn.hooks import RecordThoughts

    lengths = [len(t) for t in tokenize_questions(any_model, QUESTIONS)]
    assert len(set(lengths)) == len(QUESTIONS), "questions must have uneven lengths"
    if batch_size == len(QUESTIONS):
        assert len(prefill_groups(lengths)) > 1, "the grouped prefill (caches joined) must be exercised"
    batched = RecordThoughts(len(QUESTIONS))
    gen = Runner(any_model, batch_size, 6).run(QUESTIONS, [batched])
    for k, question in enumerate(QUESTIONS):
        single = RecordThoughts(1)
        alone = Runner(any_model, 1, 6).run([question], [single])
        np.testing.assert_allclose(batched.z[k], single.z[0], atol=1e-4)
        np.testing.assert_allclose(batched.hidden[k], single.hidden[0], atol=1e-4)
        assert gen.text[k] == alone.text[0]


def test_hooks_see_the_callers_rows(gpt2_model):
    """Batches are sorted by length; batch.rows maps each row back to the caller's list."""
    seen = {}

    def remember(v, p, b):
        for row, value in zip(b.rows, v):
            seen[int(row)] = value.clone()

    Runner(gpt2_model, batch_size=2, max_new_tokens=1).run(QUESTIONS, [("thought.1.z", remember)])
    for k, question in enumerate(QUESTIONS):
        alone = {}
        Runner(gpt2_model, 1, 1).run([question], [("thought.1.z", lambda v, p, b: alone.update(z=v[0]))])
        torch.testing.assert_close(seen[k], alone["z"], atol=1e-5, rtol=1e-5)


def test_hooks_on_a_prepacked_model_behave_as_on_the_unpacked_one(gpt2_model, unpacked_models):
    """head_in replacement and resid reads on oneDNN-prepacked layers equal those on PyTorch's layers."""
    from codi_attn.ablation import AblateHeads
    from codi_attn.hooks import RecordThoughts

    assert "oneDNN" in gpt2_model.source["linear"] or not torch.backends.mkldnn.is_available()
    results = []
    for m in (gpt2_model, unpacked_models["gpt2"]):
        record, resid = RecordThoughts(3), {}
        gen = Runner(m, 3, 3).run(QUESTIONS[:3], [AblateHeads(m, [(0, 1), (1, 2)], "zero", "all"), record,
                                                  ("thought.3.resid.1", lambda v, p, b: resid.update(r=v))])
        results.append((gen, record, resid["r"]))
    (a, ra, xa), (b, rb, xb) = results
    np.testing.assert_allclose(ra.hidden, rb.hidden, atol=1e-4)
    torch.testing.assert_close(xa, xb, atol=1e-4, rtol=1e-4)
    assert a.text == b.text


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


def test_runner_cache_is_preallocated_and_its_memory_reused(gpt2_model, monkeypatch):
    """The cache layers are PreallocatedLayers with room for the thoughts, EOT and the decode budget; the next
    batch (and the next run) writes into the same memory instead of fresh pages."""
    seen = []
    original = runner_mod.preallocated_cache

    def spy(config, capacity, storage=None, role="batch"):
        seen.append(original(config, capacity, storage, role))
        return seen[-1]

    monkeypatch.setattr(runner_mod, "preallocated_cache", spy)
    Runner(gpt2_model, batch_size=2, max_new_tokens=4).run(QUESTIONS[:2])
    layers = seen[0].layers
    assert all(isinstance(layer, PreallocatedLayer) for layer in layers)
    width = max(len(t) for t in tokenize_questions(gpt2_model, QUESTIONS[:2]))
    assert {layer.buffers[0].shape[-2] for layer in layers} == {width + N_THOUGHTS + 4}  # last token not fed
    first = [(layer.buffers[0].data_ptr(), layer.buffers[1].data_ptr()) for layer in layers]
    Runner(gpt2_model, batch_size=1, max_new_tokens=4).run(QUESTIONS[:1])  # another runner, a smaller batch
    assert [(layer.buffers[0].data_ptr(), layer.buffers[1].data_ptr()) for layer in seen[-1].layers] == first
    assert len({p for pair in first for p in pair}) == 2 * len(layers)  # one buffer per layer and kind


def test_a_run_inside_a_hook_gets_buffers_of_its_own(gpt2_model):
    """A run started from a hook while another runs on the same model writes into other memory: the outer run's
    tokens and thoughts equal a plain run's bit for bit."""
    inner = []

    def nested(value, point, batch):
        inner.append(Runner(gpt2_model, batch_size=4, max_new_tokens=3).run(QUESTIONS[:1]).tokens)  # fits in ours

    record = [("thought.*.z", lambda value, point, batch: seen.append(value.clone()))]
    seen: list[torch.Tensor] = []
    plain = Runner(gpt2_model, batch_size=2, max_new_tokens=3).run(QUESTIONS[1::2], record).tokens
    want, seen = seen, []
    got = Runner(gpt2_model, batch_size=2, max_new_tokens=3).run(QUESTIONS[1::2], [("thought.3.z", nested), *record])
    assert inner and np.array_equal(got.tokens, plain)
    assert all(torch.equal(a, b) for a, b in zip(seen, want, strict=True))


def test_a_run_inside_a_hook_is_untouched_by_the_outer_runs_layer_hooks(gpt2_model):
    """An outer run's layer hooks (heads ablated at every head_in) act on its own forwards only: a run started
    from one of its hooks gives a plain run's tokens, and the outer run the tokens it gives without the nested
    run."""
    from codi_attn.ablation import AblateHeads

    qs = QUESTIONS[:2]
    alone = Runner(gpt2_model, batch_size=2, max_new_tokens=3).run(qs).tokens
    inner = []

    def nested(value, point, batch):
        inner.append(Runner(gpt2_model, batch_size=2, max_new_tokens=3).run(qs).tokens)

    def outer(*extra):
        ablate = AblateHeads(gpt2_model, [(0, 0), (1, 1)], "zero", positions="all")
        return Runner(gpt2_model, batch_size=2, max_new_tokens=3).run(qs, [ablate, *extra]).tokens

    with_nested = outer(("thought.2.z", nested))
    assert len(inner) == 1 and np.array_equal(inner[0], alone)
    assert np.array_equal(with_nested, outer()) and not np.array_equal(with_nested, alone)


def test_a_run_inside_a_hook_runs_like_one_on_its_own(gpt2_model):
    """A run started from a thought hook (where the outer run has switched to eager attention) uses the model's
    own kernels for its prefill and decoding: its thoughts, capture and answers equal a top-level run's bit for
    bit, and the outer run's kernel is back afterwards."""
    def record(into: list):
        return ("thought.*.hidden", lambda value, point, batch: into.append(value.clone()))

    alone: list[torch.Tensor] = []
    want = Runner(gpt2_model, batch_size=4, max_new_tokens=3).run(QUESTIONS, [record(alone)]).tokens
    inner: list[torch.Tensor] = []
    kernels: list[str] = []

    def nested(value, point, batch):
        inner.append(Runner(gpt2_model, batch_size=4, max_new_tokens=3).run(QUESTIONS, [record(nested_seen)]).tokens)
        kernels.append(gpt2_model.lm.config._attn_implementation)

    nested_seen: list[torch.Tensor] = []
    Runner(gpt2_model, batch_size=2, max_new_tokens=2).run(QUESTIONS[:2], [("thought.2.z", nested)])
    assert len(inner) == 1 and np.array_equal(inner[0], want)
    assert all(torch.equal(a, b) for a, b in zip(nested_seen, alone, strict=True))
    assert "eager" in kernels[0]  # the outer run's thought kernel, restored after the inner run
    assert gpt2_model.lm.config._attn_implementation == gpt2_model.attention


def test_consecutive_runs():
    assert consecutive_runs([5, 0, 1, 2, 6]) == [slice(0, 3), slice(5, 7)]
    assert consecutive_runs([3]) == [slice(3, 4)] and consecutive_runs([]) == []


@pytest.mark.parametrize("order", ["one group", "several groups"])
def test_padded_batch_prefill_gives_every_row_its_own_result(gpt2_model, order):
    """PaddedBatch.prefill, rows NOT sorted by length: each row's last hidden state and its cached keys and
    values (at its own positions) equal a batch-of-one prefill; cache positions left of its group hold zeros."""
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
                group = next(g for g in groups if b in g)
                outside = batch.width - max(len(rows[k]) for k in group)
                assert not joined.keys[b, :, :outside].any() and not joined.values[b, :, :outside].any()


def test_decoding_stops_at_stop_token(gpt2_model, monkeypatch):
    """Greedy decoding ends at the stop token: making every token a stop token yields no text."""
    first = Runner(gpt2_model, max_new_tokens=3).run(QUESTIONS[:1])
    assert gpt2_model.tokenizer(first.text[0])["input_ids"], "random fixture decodes something first"
    monkeypatch.setattr(gpt2_model, "stop_ids", tuple(range(len(gpt2_model.tokenizer) + 3)))
    stopped = Runner(gpt2_model, max_new_tokens=3).run(QUESTIONS[:1])
    assert stopped.text == [""] and (stopped.tokens[0, 1:] == -1).all() and stopped.tokens[0, 0] >= 0


def test_eot_is_never_decoded(gpt2_model):
    """The original decoder excludes EOT from the argmax, even where the model would pick it: with EOT's logit
    raised far above every other at the LM head, no step decodes it, and the logits hooks see it at -inf."""
    raised = []

    def prefer_eot(logits, last_id):
        logits[gpt2_model.eot_id] = 1e9
        raised.append(int(logits.argmax()) == gpt2_model.eot_id)

    seen = []
    with steered(gpt2_model, prefer_eot):
        run = Runner(gpt2_model, batch_size=2, max_new_tokens=3).run(
            QUESTIONS[:2], [("decode.*.logits", lambda v, p, b: seen.append(v))])
    assert raised and all(raised)  # the model's own argmax was EOT at every decoded position
    assert (run.tokens >= 0).all() and not (run.tokens == gpt2_model.eot_id).any()
    assert len(seen) == 3 and all(torch.isinf(v[:, gpt2_model.eot_id]).all() for v in seen)


def test_only_eot_is_excluded_from_the_argmax(gpt2_model):
    """codi-spec 3.4: the decoder excludes EOT alone; pad and BOT, CODI's other extra ids, can be decoded. With EOT
    raised above everything at every step, then pad after EOT, BOT after pad and the stop token after BOT, the
    runner decodes pad, BOT, stop."""
    m = gpt2_model
    after = {m.eot_id: m.pad_id, m.pad_id: m.bot_id, m.bot_id: m.stop_ids[0]}

    def steer(logits, last_id):
        logits[m.eot_id] += 1e9
        if last_id in after:
            logits[after[last_id]] += 1e4

    with steered(m, steer):
        run = Runner(m, batch_size=2, max_new_tokens=4).run(QUESTIONS[:2])
    assert run.tokens[:, :3].tolist() == [[m.pad_id, m.bot_id, m.stop_ids[0]]] * 2
    assert (run.tokens[:, 3:] == -1).all()


def test_rows_near_the_context_end_decode_as_far_as_alone(gpt2_model):
    """Each row decodes as far as its own prompt leaves room for, in a batch with longer or shorter ones: a short
    question beside two that fill the context decodes what it decodes alone, and at the very end the last token
    is read at the model's last position (no position error, no token lost): a prompt leaving room for 3 decodes
    3, one with only its six thoughts and EOT left to place decodes 1."""
    def question(n_tokens: int) -> str:  # a question of exactly n_tokens tokens with BOT
        text = "a" + " a" * (n_tokens - len(runner_mod.question_tokens(gpt2_model, "a")))
        assert len(runner_mod.question_tokens(gpt2_model, text)) == n_tokens
        return text

    room = gpt2_model.max_positions - N_THOUGHTS  # prompt_len + decoded tokens at most
    qs = [QUESTIONS[0], question(room - 3), question(room - 1)]
    batched = Runner(gpt2_model, batch_size=3, max_new_tokens=8).run(qs)
    assert len(Runner(gpt2_model, batch_size=3, max_new_tokens=8).batches(qs)) == 1  # one batch, not one per budget
    for k, q in enumerate(qs):
        alone = Runner(gpt2_model, batch_size=1, max_new_tokens=8).run([q])
        np.testing.assert_array_equal(batched.tokens[k, :alone.tokens.shape[1]], alone.tokens[0])
        assert (batched.tokens[k, alone.tokens.shape[1]:] == -1).all()
    assert [int((row >= 0).sum()) for row in batched.tokens] == [8, 3, 1]  # the random fixture emits no stop


@pytest.mark.parametrize("question", ["", "   "])
def test_empty_question_is_rejected(gpt2_model, question):
    with pytest.raises(ValueError, match="question 1 is empty"):
        Runner(gpt2_model).run(["How many?", question])


def test_question_longer_than_context_is_rejected(gpt2_model):
    with pytest.raises(ValueError, match=r"question 0 has \d+ tokens.*context of 512"):
        Runner(gpt2_model).run(["one two three " * 400])


def test_bad_batch_size(gpt2_model):
    with pytest.raises(ValueError, match="batch_size"):
        Runner(gpt2_model, batch_size=0)


def test_decode_answer_stops_at_stop_and_skips_extra_ids(gpt2_model):
    ids = gpt2_model.tokenizer("7 clips", add_special_tokens=False)["input_ids"]
    row = [gpt2_model.bot_id, *ids, gpt2_model.stop_ids[0], *ids, -1]
    assert decode_answer(gpt2_model, np.array(row)) == gpt2_model.tokenizer.decode(ids)


def test_number_tokens_are_digits_or_a_minus_sign_never_special_tokens(gpt2_model):
    """Where an answer's number starts: decoded text with a digit or a bare minus; special tokens whose names
    hold digits (LLaMA-3's reserved tokens) and CODI's pad/BOT/EOT are not."""
    import copy
    from types import SimpleNamespace

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


def test_stacked_conditions_equal_one_at_a_time(any_model):
    """stack=S runs S conditions in one forward over copies of the batch: each condition's thoughts and tokens
    equal its own run (to float rounding: a kernel may pick another path for another number of rows), a blocking
    hook changes only its own condition, and decoding past the stacked cache's first room (32) grows it."""
    from codi_attn.hooks import BlockThoughts, RecordThoughts

    def conditions():
        return [[RecordThoughts(4)], [BlockThoughts([2]), RecordThoughts(4)], [RecordThoughts(4)],
                [("thought.3.z", lambda v, p, b: torch.zeros_like(v)), RecordThoughts(4)]]

    alone, together = conditions(), conditions()
    one = Runner(any_model, 3, 40).run_conditions(QUESTIONS, alone)
    stacked = Runner(any_model, 3, 40, stack=3).run_conditions(QUESTIONS, together)
    for a, b, ha, hb in zip(one, stacked, alone, together):
        np.testing.assert_array_equal(a.tokens, b.tokens)
        np.testing.assert_allclose(ha[-1].hidden, hb[-1].hidden, atol=1e-5)
    assert one[0].tokens.shape[1] == 40
    np.testing.assert_allclose(together[0][0].hidden, together[2][0].hidden, atol=1e-5)  # one condition twice
    assert not np.allclose(together[1][1].hidden, together[0][0].hidden)  # the blocking acted on its rows only
    with pytest.raises(ValueError, match="stack"):
        Runner(any_model, stack=0)


def test_greedy_steps_feed_every_token_but_the_last():
    """greedy_steps without per-row limits (the demo model's evaluation calls it so): `budget` tokens take
    budget - 1 feeds, the EOT id never wins the argmax, a row is -1 after its stop token (kept) and the loop ends
    when every row has stopped. The logits are a script: step t prefers token t % 3, EOT highest of all."""
    from codi_attn.runner import greedy_steps

    eot, stop = 4, 2

    def script(t: int) -> torch.Tensor:
        logits = torch.zeros(2, 5)
        logits[:, eot] = 10.0
        logits[0, t % 3] = logits[1, (t + 1) % 2] = 1.0  # row 0: 0 1 2(stop); row 1: 1 0 1 0
        return logits

    fed = []

    def feed(token, t):
        fed.append((t, token.tolist()))
        return script(t)

    out = greedy_steps(script(0), feed, 4, stop_ids=[9], eot_id=eot)
    assert out.tolist() == [[0, 1, 2, 0], [1, 0, 1, 0]] and [t for t, _ in fed] == [1, 2, 3]
    fed.clear()
    out = greedy_steps(script(0), feed, 4, stop_ids=[stop], eot_id=eot)
    assert out.tolist() == [[0, 1, 2, -1], [1, 0, 1, 0]] and [t for t, _ in fed] == [1, 2, 3]
    fed.clear()
    out = greedy_steps(script(2), feed, 4, stop_ids=[stop, 1], eot_id=eot)  # both rows stop at step 0
    assert out.tolist() == [[2, -1, -1, -1], [1, -1, -1, -1]] and fed == []


def test_a_replacement_is_cast_to_the_points_dtype(gpt2_model):
    """A hook may return another dtype: the next hook and the model get the point's dtype (float32 thoughts,
    int64 tokens), and the run equals one whose hooks returned that dtype in the first place."""
    seen = []
    runner = Runner(gpt2_model, batch_size=2, max_new_tokens=3)
    plain = runner.run(QUESTIONS[:2])
    cast = runner.run(QUESTIONS[:2], [("thought.2.z", lambda v, p, b: v.double()),
                                      ("thought.2.z", lambda v, p, b: seen.append(v.dtype)),
                                      ("decode.1.token", lambda v, p, b: v.int()),
                                      ("decode.1.token", lambda v, p, b: seen.append(v.dtype))])
    assert seen == [torch.float32, torch.int64]
    np.testing.assert_array_equal(cast.tokens, plain.tokens)


def test_a_bot_state_hook_shares_the_prefill_and_stays_in_its_condition(gpt2_model, prefill_calls):
    """The `prefill` point (the final hidden state at BOT) is read after the prefill: a condition hooking only it
    shares the batch's prefill, and its replacement reaches neither the shared cache nor the next condition."""
    calls = prefill_calls
    runner = Runner(gpt2_model, batch_size=2, max_new_tokens=2)
    plain = runner.run(QUESTIONS)
    calls.clear()
    zeroed, after = runner.run_conditions(QUESTIONS, [[("prefill", lambda v, p, b: torch.zeros_like(v))], []])
    assert calls == [2, 2]  # two batches, one prefill each
    np.testing.assert_array_equal(after.tokens, plain.tokens)
    assert not np.array_equal(zeroed.tokens, plain.tokens)


def test_batches_hold_problems_sorted_by_length(gpt2_model):
    """Batches take the problems in order of their prompt length (least padding), batch_size at a time, each
    problem once."""
    questions = [QUESTIONS[k] for k in (3, 0, 2, 1)] + ["How many?"]
    lengths = [len(t) for t in tokenize_questions(gpt2_model, questions)]
    batches = Runner(gpt2_model, batch_size=2, max_new_tokens=1).batches(questions)
    rows = [k for batch_rows, _ in batches for k in batch_rows]
    assert [len(r) for r, _ in batches] == [2, 2, 1] and sorted(rows) == list(range(len(questions)))
    assert [lengths[k] for k in rows] == sorted(lengths)
    assert all(ids == [tokenize_questions(gpt2_model, [questions[k]])[0] for k in r] for r, ids in batches)


def test_stacked_conditions_keep_their_own_layer_hooks(gpt2_model):
    """Stacked with conditions that have none, a condition's layer hooks (head ablation at the thoughts' head_in:
    no prefill hook, so it shares the stacked forward) act on its own rows: each condition's tokens and thoughts
    equal its run on its own."""
    from codi_attn.ablation import AblateHeads
    from codi_attn.hooks import RecordThoughts

    def conditions():
        return [[RecordThoughts(4)], [AblateHeads(gpt2_model, [(0, 0), (1, 1)], "zero"), RecordThoughts(4)],
                [RecordThoughts(4)]]

    alone, together = conditions(), conditions()
    one = Runner(gpt2_model, 4, 3).run_conditions(QUESTIONS, alone)
    stacked = Runner(gpt2_model, 4, 3, stack=3).run_conditions(QUESTIONS, together)
    for a, b, ha, hb in zip(one, stacked, alone, together, strict=True):
        np.testing.assert_array_equal(a.tokens, b.tokens)
        np.testing.assert_allclose(ha[-1].z, hb[-1].z, atol=1e-5)
    assert not np.allclose(alone[1][-1].z[:, 1:], alone[0][-1].z[:, 1:], atol=1e-3)  # the ablation acts


def test_logits_points_are_float32_on_a_bfloat16_model(tiny_gpt2):
    """decode.{t}.logits are float32 whatever the model's dtype (documented shape and dtype), EOT at -inf."""
    from codi_attn.model import load_codi

    model = load_codi("gpt2", base=str(tiny_gpt2[0]), ckpt=str(tiny_gpt2[1]), device="cpu", dtype="bfloat16")
    seen = []
    Runner(model, batch_size=2, max_new_tokens=2).run(QUESTIONS[:2], [("decode.*.logits",
                                                                      lambda v, p, b: seen.append(v))])
    assert len(seen) == 2 and all(v.dtype == torch.float32 for v in seen)
    assert all(torch.isneginf(v[:, model.eot_id]).all() for v in seen)


def test_stack_for_fills_about_the_rows_asked():
    assert runner_mod.stack_for(16) == runner_mod.CONDITION_ROWS // 16
    assert runner_mod.stack_for(24, 256) == 10  # 240 rows: the most copies that do not pass 256
    assert runner_mod.stack_for(300, 256) == 1 and runner_mod.stack_for(8, 0) == 1


def test_prefill_groups_join_at_exactly_the_efficiency():
    """'At least `efficiency`': a group whose real tokens are exactly that share of its padded ones is joined."""
    assert prefill_groups([2, 4], efficiency=0.75) == [[0, 1]]  # 6 real of 8 padded
    assert prefill_groups([2, 4], efficiency=0.76) == [[0], [1]]


def test_a_replaced_hidden_state_is_what_the_next_thought_projects(gpt2_model):
    """thought.{k}.hidden replacement: z_{k+1} = prj(the replacement), the thoughts before it untouched."""
    from codi_attn.hooks import RecordThoughts

    d = gpt2_model.lm.config.hidden_size
    h = torch.linspace(-1.0, 1.0, d)
    base, replaced = RecordThoughts(2), RecordThoughts(2)
    runner = Runner(gpt2_model, batch_size=2, max_new_tokens=1)
    runner.run(QUESTIONS[:2], [base])
    runner.run(QUESTIONS[:2], [("thought.2.hidden", lambda v, p, b: h.expand_as(v)), replaced])
    with torch.no_grad():
        z3 = gpt2_model.prj(h).numpy()
    np.testing.assert_allclose(replaced.z[:, 2], np.stack([z3, z3]), atol=1e-6)
    np.testing.assert_array_equal(replaced.z[:, :2], base.z[:, :2])
    np.testing.assert_allclose(replaced.hidden[:, 1], np.stack([h.numpy()] * 2), atol=0)
    assert not np.allclose(base.z[:, 2], z3, atol=1e-3)
