"""Head ablation at the output projection's input (codi-spec trap 4): the exact effect, means per thought and
pooled, resample, positions, and every head of the demo model against two independent implementations."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from codi_attn.ablation import AblateHeads, HeadInputs, HeadMeans, head_means
from codi_attn.conventions import N_THOUGHTS
from codi_attn.extract import extract
from codi_attn.hooks import RecordThoughts
from codi_attn.runner import Runner, head_dim, layer_module, tokenize_questions
from reference import PADDED_GROUP, zeroed_heads

QUESTIONS = ["Natalia sold 48 clips in April. How many clips?", "Weng earns $12 an hour.",
             "A robe takes 2 bolts of blue fiber and half that much white fiber."]


def project(model, proj, x: torch.Tensor) -> torch.Tensor:
    """The projection computed by hand: x @ W (+ b); GPT-2's Conv1D stores W as [in, out], Linear as [out, in]."""
    weight = proj.weight if model.family == "gpt2" else proj.weight.T
    return x @ weight + (proj.bias if proj.bias is not None else 0.0)


@pytest.fixture(params=["gpt2", "llama"])
def readable_model(request, unpacked_models):
    """A tiny model whose weights the hand computation reads (tests/test_runner.py checks hooks on packed
    layers)."""
    return unpacked_models[request.param]


@pytest.mark.parametrize("kind", ["zero", "mean"])
def test_ablation_changes_exactly_that_heads_contribution(readable_model, kind):
    """Only head h's slice of the projection input changes; the module output is W @ x_with_slice_replaced (+ b)."""
    m = readable_model
    layer, head, d = 1, 2, head_dim(m)
    proj = layer_module(m, "head_in", layer)
    means = np.random.default_rng(0).normal(size=(N_THOUGHTS, m.n_layers, m.n_heads, d)).astype(np.float32)
    seen: dict[str, list] = {"in": [], "out": []}
    hooks = [proj.register_forward_pre_hook(lambda mod, args: seen["in"].append(args[0].clone())),
             proj.register_forward_hook(lambda mod, args, out: seen["out"].append(out.clone()))]
    try:
        ablate = AblateHeads(m, [(layer, head)], kind, means=means if kind == "mean" else None)
        after = {}  # what the next hook at the point sees: the replacement written back into the module's input
        Runner(m, max_new_tokens=1).run(QUESTIONS[:1], [ablate, (f"thought.3.head_in.{layer}",
                                                                 lambda v, p, b: after.update(x=v.reshape(1, 1, -1)))])
    finally:
        for h in hooks:
            h.remove()
    # calls: the prefill, thoughts 1 and 2, then thought 3; a pre-hook registered before the runner's sees the
    # input as the layer computed it, before the replacement
    clean, ablated, out = seen["in"][3], after["x"], seen["out"][3]
    assert clean.shape[-1] == m.n_heads * d
    others = torch.ones(clean.shape[-1], dtype=torch.bool)
    others[head * d:(head + 1) * d] = False
    torch.testing.assert_close(ablated[..., others], clean[..., others], rtol=0, atol=0)
    replacement = torch.zeros(d) if kind == "zero" else torch.tensor(means[2, layer, head])  # thought 3: slot 2
    torch.testing.assert_close(ablated[..., ~others], replacement.expand_as(ablated[..., ~others]), rtol=0, atol=0)
    with torch.no_grad():
        torch.testing.assert_close(out, project(m, proj, ablated), rtol=1e-5, atol=1e-5)
        w_h = (proj.weight if m.family == "gpt2" else proj.weight.T)[head * d:(head + 1) * d]
        change = (replacement - clean[..., ~others]) @ w_h
        torch.testing.assert_close(out - project(m, proj, clean), change, rtol=1e-4, atol=1e-5)


def test_thought_means_are_per_thought_and_batch_independent(gpt2_model):
    """Mean-ablating every head with one problem's own per-thought means reproduces that problem (slot k-1 at
    thought k); the same means in the wrong slots do not; the mean over two problems is the mean of their means."""
    one = head_means(gpt2_model, QUESTIONS[:1])
    assert one.shape == (N_THOUGHTS, gpt2_model.n_layers, gpt2_model.n_heads, head_dim(gpt2_model))
    every = [(layer, head) for layer in range(gpt2_model.n_layers) for head in range(gpt2_model.n_heads)]
    base, same, shifted = RecordThoughts(1), RecordThoughts(1), RecordThoughts(1)
    runner = Runner(gpt2_model, max_new_tokens=3)
    runner.run(QUESTIONS[:1], [base])
    runner.run(QUESTIONS[:1], [AblateHeads(gpt2_model, every, "mean", means=one), same])
    np.testing.assert_allclose(same.z, base.z, atol=1e-5)
    runner.run(QUESTIONS[:1], [AblateHeads(gpt2_model, every, "mean", means=one[::-1].copy()), shifted])
    assert not np.allclose(shifted.z[:, 1:], base.z[:, 1:], atol=1e-3)
    two = head_means(gpt2_model, QUESTIONS[:2], batch_size=2)
    np.testing.assert_allclose(two, (one + head_means(gpt2_model, QUESTIONS[1:2])) / 2, atol=1e-5)


def test_positions_thoughts_spare_the_question_all_does_not(gpt2_model):
    """Ablation at the thought steps leaves z1 (projection of the BOT state) alone; at all positions it changes it."""
    heads = [(0, h) for h in range(gpt2_model.n_heads)]
    runner = Runner(gpt2_model, max_new_tokens=2)
    base, thoughts, everywhere = RecordThoughts(3), RecordThoughts(3), RecordThoughts(3)
    runner.run(QUESTIONS, [base])
    runner.run(QUESTIONS, [AblateHeads(gpt2_model, heads, "zero", "thoughts"), thoughts])
    runner.run(QUESTIONS, [AblateHeads(gpt2_model, heads, "zero", "all"), everywhere])
    np.testing.assert_array_equal(thoughts.z[:, 0], base.z[:, 0])
    assert not np.allclose(thoughts.z[:, 1:], base.z[:, 1:])
    assert not np.allclose(everywhere.z[:, 0], base.z[:, 0])


@pytest.mark.parametrize("questions", [QUESTIONS, PADDED_GROUP], ids=["lengths apart", "one padded group"])
def test_all_position_means_cover_exactly_the_positions_inference_runs(gpt2_model, questions):
    """Pooled means over a batch (padding and tokens after a problem's stop excluded) equal the mean over one
    full-sequence forward per problem of [question, BOT, z1..z6, EOT, the generated tokens fed back]."""
    from codi_attn.runner import prefill_groups

    if questions is PADDED_GROUP:
        lengths = [len(t) for t in tokenize_questions(gpt2_model, questions)]
        assert len(set(lengths)) > 1 and len(prefill_groups(lengths)) == 1, "the padded group must be exercised"
    budget = 4
    stop = gpt2_model.tokenizer(" clips", add_special_tokens=False)["input_ids"][0]

    def stop_early(v, p, b):  # problem 0 stops at its second token: its later positions must not count
        if p.step == 1 and 0 in b.rows:
            v = v.clone()
            v[list(b.rows).index(0), stop] = 1e9
        return v

    means = HeadMeans(gpt2_model, "all")
    record = RecordThoughts(3)
    old_stop = gpt2_model.stop_ids
    gpt2_model.stop_ids = (stop,)
    try:
        gen = Runner(gpt2_model, 3, budget).run(questions, [means, record, ("decode.*.logits", stop_early)])
    finally:
        gpt2_model.stop_ids = old_stop
    assert gen.tokens[0, 1] == stop and (gen.tokens[0, 2:] == -1).all()
    proj = [layer_module(gpt2_model, "head_in", l) for l in range(gpt2_model.n_layers)]
    sums = [torch.zeros(proj[0].nx if hasattr(proj[0], "nx") else proj[0].in_features, dtype=torch.float64)
            for _ in proj]
    count = 0
    embed = gpt2_model.lm.get_input_embeddings()
    for k, question in enumerate(questions):
        ids = tokenize_questions(gpt2_model, [question])[0]
        generated = [t for t in gen.tokens[k].tolist() if t >= 0]
        fed_tokens = generated[:-1]  # the last chosen token is never fed back (stop or end of budget)
        with torch.no_grad():
            seq = torch.cat([embed(torch.tensor([ids])), torch.tensor(record.z[k][None]),
                             embed(torch.tensor([[gpt2_model.eot_id, *fed_tokens]]))], 1)
            def add(module, args, layer):
                sums[layer].add_(args[0][0].double().sum(0))

            handles = [p.register_forward_pre_hook(lambda mod, args, l=l: add(mod, args, l)) for l, p in enumerate(proj)]
            try:
                gpt2_model.lm.base_model(inputs_embeds=seq)
            finally:
                for h in handles:
                    h.remove()
        count += seq.shape[1]
    expected = torch.stack(sums).float().numpy() / count
    np.testing.assert_allclose(means.means[0].reshape(gpt2_model.n_layers, -1), expected, atol=1e-5)


def test_resample_with_its_own_input_is_a_no_op_bit_for_bit(gpt2_model):
    """Resampling every head from the problem itself changes nothing; from a partner, the ablated head's input
    is exactly the partner's."""
    n, runner = len(QUESTIONS), Runner(gpt2_model, batch_size=2, max_new_tokens=3)
    inputs, base = HeadInputs(gpt2_model, n), RecordThoughts(n)
    plain = runner.run(QUESTIONS, [inputs, base])
    every = [(l, h) for l in range(gpt2_model.n_layers) for h in range(gpt2_model.n_heads)]
    same = RecordThoughts(n)
    again = runner.run(QUESTIONS, [AblateHeads(gpt2_model, every, "resample", inputs=inputs.inputs,
                                               partners=np.arange(n)), same])
    np.testing.assert_array_equal(same.z, base.z)
    np.testing.assert_array_equal(again.tokens, plain.tokens)
    partners = np.array([1, 2, 0])
    seen = HeadInputs(gpt2_model, n)
    runner.run(QUESTIONS, [AblateHeads(gpt2_model, [(1, 2)], "resample", inputs=inputs.inputs, partners=partners),
                           seen])
    np.testing.assert_array_equal(seen.inputs[:, :, 1, 2], inputs.inputs[partners][:, :, 1, 2])
    assert not np.array_equal(seen.inputs[:, 1:, 1, 3], inputs.inputs[:, 1:, 1, 3])  # other heads see the change


def test_bad_heads_means_and_positions_are_rejected(gpt2_model):
    m = gpt2_model
    with pytest.raises(ValueError, match="outside"):
        AblateHeads(m, [(m.n_layers, 0)])
    with pytest.raises(ValueError, match="mean ablation needs means"):
        AblateHeads(m, [(0, 0)], "mean", means=np.zeros((2, 1, 1, 1), np.float32))
    with pytest.raises(ValueError, match="positions"):
        HeadMeans(m, positions="question")
    per_thought = np.zeros((N_THOUGHTS, m.n_layers, m.n_heads, head_dim(m)), np.float32)
    with pytest.raises(ValueError, match="position-specific means cover the six thoughts"):
        AblateHeads(m, [(0, 0)], "mean", "all", means=per_thought)
    with pytest.raises(ValueError, match="thought positions only"):
        AblateHeads(m, [(0, 0)], "resample", "all")
    with pytest.raises(ValueError, match="needs inputs"):
        AblateHeads(m, [(0, 0)], "resample")
    with pytest.raises(ValueError, match="ablation must be one of"):
        AblateHeads(m, [(0, 0)], "shuffle")


@pytest.fixture(scope="module")
def demo_unpacked():
    from codi_attn.model import load_codi

    return load_codi("demo", device="cpu", dtype="float32", prepack=False)


@pytest.fixture(scope="module")
def demo_questions():
    from codi_attn.data import load_records, sample_problems

    problems = sample_problems(load_records("synthetic", "test"), 24, seed=42, split="test")
    return [p.question for p in problems]


def test_zero_ablation_everywhere_equals_zeroing_the_heads_weight_rows(demo_unpacked, demo_questions):
    """Every head of the demo model: zero ablation at all positions through head_in gives, answer for answer and
    entry for entry, what zeroing that head's rows of the output projection's weight gives (an independent
    mechanism: no hook at all)."""
    m = demo_unpacked
    for layer in range(m.n_layers):
        for head in range(m.n_heads):
            hooked = extract(m, demo_questions, batch_size=8, max_new_tokens=8,
                             hooks=[AblateHeads(m, [(layer, head)], "zero", "all")])
            with zeroed_heads(m, [(layer, head)]):
                zeroed = extract(m, demo_questions, batch_size=8, max_new_tokens=8)
            assert hooked.text == zeroed.text, f"L{layer}H{head}"
            np.testing.assert_allclose(hooked.attention, zeroed.attention, atol=1e-5)


def test_mean_ablation_at_thoughts_equals_an_independent_pre_hook(demo_unpacked, demo_questions):
    """Every head of the demo model: mean ablation at the six thoughts equals a hand-written pre-hook on the output
    projection that counts the one-position calls of the six thought steps (the design's first implementation)."""
    m = demo_unpacked
    d = head_dim(m)
    means = head_means(m, demo_questions, batch_size=8)
    for layer in range(m.n_layers):
        proj = layer_module(m, "head_in", layer)
        for head in range(m.n_heads):
            hooked = extract(m, demo_questions, batch_size=8, max_new_tokens=8,
                             hooks=[AblateHeads(m, [(layer, head)], "mean", means=means)])
            calls = {"n": 0}

            def pre_hook(module, args):
                x = args[0]
                if x.shape[1] != 1:  # the prefill of a batch: a new batch starts
                    calls["n"] = 0
                    return None
                step, calls["n"] = calls["n"], calls["n"] + 1
                if step >= N_THOUGHTS:  # EOT and decoding
                    return None
                x = x.clone()
                x[..., head * d:(head + 1) * d] = torch.as_tensor(means[step, layer, head])
                return (x, *args[1:])

            handle = proj.register_forward_pre_hook(pre_hook)
            try:
                by_hand = extract(m, demo_questions, batch_size=8, max_new_tokens=8)
            finally:
                handle.remove()
            assert hooked.text == by_hand.text, f"L{layer}H{head}"
            np.testing.assert_array_equal(hooked.attention, by_hand.attention)


def test_heads_outside_the_model_and_mismatched_inputs_are_rejected(gpt2_model):
    """A negative index would silently ablate a head counted from the end, one past the last an IndexError mid-run;
    mean tables need 1 or 6 slots (any other count would be read as pooled); resample needs a partner per
    problem."""
    m = gpt2_model
    for head in ((0, -1), (-1, 0), (0, m.n_heads)):
        with pytest.raises(ValueError, match=r"outside the model's \d+ layers x \d+ heads"):
            AblateHeads(m, [head])
    shape = (m.n_layers, m.n_heads, head_dim(m))
    with pytest.raises(ValueError, match=r"mean ablation needs means \[1 or 6, "):
        AblateHeads(m, [(0, 0)], "mean", means=np.zeros((3, *shape), np.float32))
    with pytest.raises(ValueError, match="2 partners for the inputs of 3 problems"):
        AblateHeads(m, [(0, 0)], "resample", inputs=np.zeros((3, N_THOUGHTS, *shape), np.float32),
                    partners=[1, 0])


def test_head_inputs_of_some_layers_leave_the_others_zero(gpt2_model):
    """HeadInputs(layers=[1]) records layer 1 as the full recording does, and nothing of the other layers."""
    every, some = HeadInputs(gpt2_model, len(QUESTIONS)), HeadInputs(gpt2_model, len(QUESTIONS), layers=[1])
    Runner(gpt2_model, batch_size=2, max_new_tokens=1).run(QUESTIONS, [every, some])
    np.testing.assert_array_equal(some.inputs[:, :, 1], every.inputs[:, :, 1])
    others = [layer for layer in range(gpt2_model.n_layers) if layer != 1]
    assert not some.inputs[:, :, others].any() and every.inputs[:, :, others].any()
