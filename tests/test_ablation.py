"""Head ablation at the output projection's input (codi-spec trap 4): exact effect, means, positions."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from codi_attn.ablation import ablate_heads, extract_ablated, head_dim, head_means, out_proj
from codi_attn.extract import N_LATENTS, extract, tokenize_questions

QUESTIONS = ["Natalia sold 48 clips in April. How many clips?", "Weng earns $12 an hour."]


def project(model, proj, x: torch.Tensor) -> torch.Tensor:
    """The projection computed by hand: x @ W (+ b); GPT-2's Conv1D stores W as [in, out], Linear as [out, in]."""
    weight = proj.weight if model.family == "gpt2" else proj.weight.T
    return x @ weight + (proj.bias if proj.bias is not None else 0.0)


@pytest.fixture(params=["gpt2", "llama"])
def readable_model(request, unpacked_models):
    """A tiny model whose weights the hand computation reads (tests/test_prepack.py checks ablation on packed
    layers)."""
    return unpacked_models[request.param]


@pytest.mark.parametrize("mode", ["zero", "mean"])
def test_ablation_changes_exactly_that_heads_contribution(readable_model, mode):
    """Only head h's slice of the projection input changes; the module output is W @ x_with_slice_replaced (+ b)."""
    any_model = readable_model
    layer, head, d = 1, 2, head_dim(any_model)
    proj = out_proj(any_model, layer)
    means = np.random.default_rng(0).normal(size=(1, any_model.n_layers, any_model.n_heads, d)).astype(np.float32)
    means = means if mode == "mean" else None
    seen = {}
    ids = torch.tensor([tokenize_questions(any_model, QUESTIONS[:1])[0]])
    before = proj.register_forward_pre_hook(lambda m, args: seen.__setitem__("clean", args[0].clone()))
    output = proj.register_forward_hook(lambda m, args, out: seen.__setitem__("out", out.clone()))
    try:
        with torch.no_grad(), ablate_heads(any_model, [(layer, head)], means):
            after = proj.register_forward_pre_hook(lambda m, args: seen.__setitem__("ablated", args[0].clone()))
            any_model.lm.base_model(input_ids=ids)
            after.remove()
    finally:
        before.remove()
        output.remove()
    clean, ablated = seen["clean"], seen["ablated"]
    assert clean.shape[-1] == any_model.n_heads * d
    others = torch.ones(clean.shape[-1], dtype=torch.bool)
    others[head * d:(head + 1) * d] = False
    torch.testing.assert_close(ablated[..., others], clean[..., others], rtol=0, atol=0)
    replacement = torch.zeros(d) if means is None else torch.tensor(means[0, layer, head])
    torch.testing.assert_close(ablated[..., ~others], replacement.expand_as(ablated[..., ~others]), rtol=0, atol=0)
    expected = clean.clone()
    expected[..., ~others] = replacement
    with torch.no_grad():
        torch.testing.assert_close(seen["out"], project(any_model, proj, expected), rtol=1e-5, atol=1e-5)
        # the change is exactly the head's own term: (replacement - x_h) through W's rows for head h
        w_h = (proj.weight if any_model.family == "gpt2" else proj.weight.T)[head * d:(head + 1) * d]
        change = (replacement - clean[..., ~others]) @ w_h
        torch.testing.assert_close(seen["out"] - project(any_model, proj, clean), change, rtol=1e-4, atol=1e-5)


def test_latent_means_are_per_thought_and_batch_independent(gpt2_model):
    """Mean-ablating every head with one problem's own per-thought means reproduces that problem (slot k = step k);
    the same means in the wrong slots do not; the mean over two problems is the mean of their means."""
    one = head_means(gpt2_model, QUESTIONS[:1])
    assert one.shape == (N_LATENTS, gpt2_model.n_layers, gpt2_model.n_heads, head_dim(gpt2_model))
    every = [(layer, head) for layer in range(gpt2_model.n_layers) for head in range(gpt2_model.n_heads)]
    kwargs = dict(max_new_tokens=3, keep_latents=True, keep_logits=True)
    base = extract(gpt2_model, QUESTIONS[:1], **kwargs)
    same = extract_ablated(gpt2_model, QUESTIONS[:1], every, one, "latent", **kwargs)
    np.testing.assert_allclose(same.latents, base.latents, atol=1e-5)
    np.testing.assert_allclose(same.first_logits, base.first_logits, atol=1e-4)
    shifted = extract_ablated(gpt2_model, QUESTIONS[:1], every, one[::-1].copy(), "latent", **kwargs)
    assert not np.allclose(shifted.latents[:, 1:], base.latents[:, 1:], atol=1e-3)
    two = head_means(gpt2_model, QUESTIONS, batch_size=2)
    np.testing.assert_allclose(two, (one + head_means(gpt2_model, QUESTIONS[1:])) / 2, atol=1e-5)


def test_positions_latent_spares_the_question_all_does_not(gpt2_model):
    """Ablation at the latent steps leaves z1 (projection of the BOT state) alone; at all positions it changes it."""
    heads = [(0, h) for h in range(gpt2_model.n_heads)]
    kwargs = dict(max_new_tokens=2, keep_latents=True)
    base = extract(gpt2_model, QUESTIONS, **kwargs)
    latent = extract_ablated(gpt2_model, QUESTIONS, heads, None, "latent", **kwargs)
    everywhere = extract_ablated(gpt2_model, QUESTIONS, heads, None, "all", **kwargs)
    np.testing.assert_array_equal(latent.latents[:, 0], base.latents[:, 0])
    assert not np.allclose(latent.latents[:, 1:], base.latents[:, 1:])
    assert not np.allclose(everywhere.latents[:, 0], base.latents[:, 0])


def test_all_position_means_are_pooled(gpt2_model):
    pooled = head_means(gpt2_model, QUESTIONS, positions="all", max_new_tokens=2)
    assert pooled.shape == (1, gpt2_model.n_layers, gpt2_model.n_heads, head_dim(gpt2_model))
    ex = extract_ablated(gpt2_model, QUESTIONS, [(1, 0)], pooled, "all", max_new_tokens=2)
    assert len(ex.text) == 2
    per_thought = head_means(gpt2_model, QUESTIONS[:1])
    with pytest.raises(RuntimeError, match="position-specific means"):
        extract_ablated(gpt2_model, QUESTIONS[:1], [(1, 0)], per_thought, "all", max_new_tokens=2)


def test_bad_heads_means_and_positions_are_rejected(gpt2_model):
    with pytest.raises(ValueError, match="outside"):
        with ablate_heads(gpt2_model, [(gpt2_model.n_layers, 0)]):
            pass
    with pytest.raises(ValueError, match="means must be"):
        with ablate_heads(gpt2_model, [(0, 0)], np.zeros((2, 1, 1, 1), np.float32)):
            pass
    with pytest.raises(ValueError, match="positions"):
        head_means(gpt2_model, QUESTIONS, positions="question")
