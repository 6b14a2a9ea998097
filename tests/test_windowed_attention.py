"""Windowed attention of the one-query steps: the runs of rows and their windows, the mask contract, the twins
against the full-width kernels (eager weights, sdpa, grouped KV heads), the runner's results with and without
windows (extraction, stacked conditions with mask hooks, gradients), where it applies."""
from __future__ import annotations

import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from codi_attn import runner as runner_mod
from codi_attn import windowed_attention as wa
from codi_attn.extract import extract
from codi_attn.hooks import BlockThoughts, RecordThoughts
from codi_attn.runner import Runner, layer_module, tokenize_questions
from reference import QUESTIONS

# prompts from a few tokens to several windows long, so that rows start in different blocks of KEY_QUANTUM keys
UNEVEN = QUESTIONS + [" ".join(QUESTIONS * 3), "How many?"]


def visible_from(starts: list[int], width: int) -> torch.Tensor:
    """[B, width] bool: row b sees the keys from starts[b] on."""
    return torch.arange(width)[None] >= torch.tensor(starts)[:, None]


def test_key_windows_are_runs_of_rows_whose_first_key_is_in_one_block():
    visible = visible_from([0, 5, 33, 40, 70, 3, 3], 100)
    assert wa.key_windows(visible, quantum=32) == [(slice(0, 2), 0), (slice(2, 4), 32), (slice(4, 5), 64),
                                                   (slice(5, 7), 0)]
    assert wa.key_windows(visible, quantum=1) == [(slice(0, 1), 0), (slice(1, 2), 5), (slice(2, 3), 33),
                                                  (slice(3, 4), 40), (slice(4, 5), 70), (slice(5, 7), 3)]
    blocked = visible.clone()
    blocked[1, 5:40] = False  # a row's first visible key is what counts, whatever it sees later
    assert wa.key_windows(blocked, quantum=32)[:2] == [(slice(0, 1), 0), (slice(1, 4), 32)]


def random_step(module, model, starts: list[int], width: int, seed: int = 0):
    """One-query inputs for `module`'s attention: query [B, H, 1, dh], key/value [B, H_kv, S, dh], visible [B, S]."""
    g = torch.Generator().manual_seed(seed)
    dh = runner_mod.head_dim(model)
    b = len(starts)
    query = torch.randn(b, model.n_heads, 1, dh, generator=g)
    key, value = (torch.randn(b, model.n_kv_heads, width, dh, generator=g) for _ in range(2))
    return query, key, value, visible_from(starts, width)


@pytest.mark.parametrize("kernel", ["eager", "sdpa"])
def test_twin_equals_the_full_width_kernel(any_model, kernel):
    """Outputs and eager's weights equal the full-width kernel's, for grouped KV heads too (the tiny LLaMA has
    2 KV heads for 4 query heads); weights left of each window are exactly 0 and every row sums to 1."""
    module = layer_module(any_model, "attn", 0)
    starts, width = [0, 3, 40, 41, 90, 7], 120
    query, key, value, visible = random_step(module, any_model, starts, width)
    if kernel == "eager":
        mask = torch.zeros(visible.shape).masked_fill(~visible, torch.finfo(torch.float32).min)[:, None, None]
        full = wa.eager_function(module)
    else:
        mask, full = visible[:, None, None], sdpa_attention_forward
    assert len(wa.key_windows(visible)) > 1
    out, weights = wa.windowed(kernel)(module, query, key, value, mask, scaling=0.125, dropout=0.0)
    ref_out, ref_weights = full(module, query, key, value, mask, scaling=0.125, dropout=0.0)
    torch.testing.assert_close(out, ref_out, rtol=0, atol=1e-6)
    if kernel == "sdpa":
        assert weights is None and ref_weights is None
        return
    assert weights.shape == ref_weights.shape == (len(starts), any_model.n_heads, 1, width)
    torch.testing.assert_close(weights, ref_weights, rtol=0, atol=1e-7)
    assert (weights[~visible[:, None, None].expand_as(weights)] == 0).all()
    torch.testing.assert_close(weights.sum(-1), torch.ones(weights.shape[:-1]), rtol=0, atol=1e-6)


def test_prefill_shaped_calls_go_to_the_full_kernel(gpt2_model, monkeypatch):
    """More than one query per row (a prefill, even with a mask broadcast over its queries) or a mask broadcast
    over the batch: no windows are looked for, and the output is the full kernel's."""
    module = layer_module(gpt2_model, "attn", 0)
    query, key, value, visible = random_step(module, gpt2_model, [0, 50], 80)
    cut = []
    monkeypatch.setattr(wa, "key_windows", lambda v, *a, **k: cut.append(v) or [(slice(0, len(v)), 32)])
    many = query.expand(-1, -1, 3, -1).contiguous()
    for q, mask in ((many, visible[:, None, None].expand(-1, -1, 3, -1)), (many, visible[:, None, None]),
                    (query, visible[:1, None, None])):
        out, _ = wa.windowed("sdpa")(gpt2_model.lm, q, key, value, mask)
        ref, _ = sdpa_attention_forward(gpt2_model.lm, q, key, value, mask)
        assert torch.equal(out, ref) and not cut


def block_prompt_start(mask, point, batch):
    """A mask hook that hides the first 40 prompt columns from later queries: windows start where rows see."""
    mask = mask.clone()
    mask[:, :40] = 0
    return mask


def test_runner_results_with_windows_equal_full_width(any_model, unpacked_models, monkeypatch):
    """Prompts of very different lengths: windows are cut (some start past column 0), and the extraction's
    attention and mass split, stacked conditions with mask hooks (blocking a thought, hiding prompt columns)
    and a run with gradients equal the full-width runs' to rounding, with the same answers."""
    lengths = [len(t) for t in tokenize_questions(any_model, UNEVEN)]
    assert max(lengths) - min(lengths) > 2 * wa.KEY_QUANTUM, "the prompts must span several windows"
    unpacked = unpacked_models[any_model.family]

    def runs() -> dict:
        out = {"extraction": extract(any_model, UNEVEN, batch_size=len(UNEVEN), max_new_tokens=4)}
        conditions = [[RecordThoughts(len(UNEVEN))], [BlockThoughts([2]), RecordThoughts(len(UNEVEN))],
                      [("thought.1.mask", block_prompt_start), RecordThoughts(len(UNEVEN))]]
        out["stacked"] = Runner(any_model, batch_size=3, max_new_tokens=4, stack=3).run_conditions(UNEVEN, conditions)
        out["hidden"] = [c[-1].hidden for c in conditions]
        grad = RecordThoughts(len(UNEVEN))
        out["gradients"] = Runner(unpacked, batch_size=3, max_new_tokens=2, gradients=True).run(UNEVEN, [grad])
        out["hidden"].append(grad.hidden)
        return out

    seen: list[wa.Windows] = []
    real = wa.key_windows
    monkeypatch.setattr(wa, "key_windows", lambda visible, quantum=wa.KEY_QUANTUM:
                        seen.append(real(visible)) or seen[-1])
    windowed = runs()
    assert seen and any(start > 0 for windows in seen for _, start in windows)
    monkeypatch.setattr(runner_mod, "windowed_implementation", lambda lm, name, padding: name)  # full width
    full = runs()
    for name in ("attention", "mass"):
        np.testing.assert_allclose(getattr(windowed["extraction"], name), getattr(full["extraction"], name),
                                   rtol=0, atol=1e-6, err_msg=name)
    assert windowed["extraction"].text == full["extraction"].text
    for a, b in zip(windowed["stacked"] + [windowed["gradients"]], full["stacked"] + [full["gradients"]], strict=True):
        np.testing.assert_array_equal(a.tokens, b.tokens)
    for a, b in zip(windowed["hidden"], full["hidden"], strict=True):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)


def test_windows_run_the_function_a_user_registered_for_the_kernel(gpt2_model, monkeypatch):
    """A function registered as "sdpa" with transformers' AttentionInterface (what the model's own forward would
    call) is what the windowed decode steps call too, on the cut keys; the tokens are those of the stock kernel."""
    from transformers import AttentionInterface

    key_widths = []

    def counted(module, query, key, value, attention_mask, **kwargs):
        key_widths.append((query.shape[-2], key.shape[-2]))
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    stock = extract(gpt2_model, UNEVEN, batch_size=len(UNEVEN), max_new_tokens=3)
    monkeypatch.setitem(AttentionInterface._global_mapping, "sdpa", counted)
    ran = extract(gpt2_model, UNEVEN, batch_size=len(UNEVEN), max_new_tokens=3)
    width = max(query for query, _ in key_widths)  # the prefill's widest group: one query per prompt token
    assert any(query == 1 and keys < width for query, keys in key_widths), "no windowed call reached the function"
    assert ran.text == stock.text


def test_batch_equals_batch_of_one_with_windows_cut(any_model):
    """Trap 8 where windows are cut: every problem's attention, mass split and answer in a batch of prompts
    several windows apart equal its batch-of-one result (which has no padding)."""
    batched = extract(any_model, UNEVEN, batch_size=len(UNEVEN), max_new_tokens=4)
    for k, question in enumerate(UNEVEN):
        single = extract(any_model, [question], max_new_tokens=4)
        np.testing.assert_allclose(batched.attention[k], single.attention[0], atol=1e-4)
        np.testing.assert_allclose(batched.mass[k], single.mass[0], atol=1e-4)
        assert batched.text[k] == single.text[0]


def test_visible_keys_follow_the_mask_contract_or_decline():
    visible = visible_from([0, 3, 40], 50)
    additive = torch.zeros(visible.shape).masked_fill(~visible, torch.finfo(torch.float32).min)
    assert torch.equal(wa.visible_keys(visible[:, None, None], 3), visible)
    assert torch.equal(wa.visible_keys(additive[:, None, None], 3), visible)
    assert wa.visible_keys(visible[:, None, None].expand(-1, 2, -1, -1), 3) is None  # a mask per head
    assert wa.visible_keys(visible[:1, None, None], 3) is None  # broadcast over the batch
    assert wa.visible_keys((additive - 1.0)[:, None, None], 3) is None  # a bias on visible keys
    assert wa.visible_keys(None, 3) is None


def test_windows_apply_on_cpu_to_eager_and_sdpa_where_padding_fills_a_block():
    def lm(device: str = "cpu", **config):
        return SimpleNamespace(device=torch.device(device), config=SimpleNamespace(**config))

    pad = wa.KEY_QUANTUM
    assert wa.windowed_implementation(lm(), "eager", pad) == "codi_windowed_eager"
    assert wa.windowed_implementation(lm(), "sdpa", pad) == "codi_windowed_sdpa"
    assert wa.windowed_implementation(lm(), "sdpa", pad - 1) == "sdpa"  # no window could start past column 0
    assert wa.windowed_implementation(lm(), "flash_attention_2", pad) == "flash_attention_2"
    assert wa.windowed_implementation(lm("cuda"), "sdpa", pad) == "sdpa"
    assert wa.windowed_implementation(lm(reorder_and_upcast_attn=True), "eager", pad) == "eager"
    assert wa.windowed_implementation(lm(reorder_and_upcast_attn=True), "sdpa", pad) == "codi_windowed_sdpa"


def test_batches_without_enough_padding_run_the_plain_kernels(gpt2_model, monkeypatch):
    """Prompts within a block of one another never reach the twins: no per-layer look at the mask."""
    calls = []
    real = wa.key_windows
    monkeypatch.setattr(wa, "key_windows", lambda visible, quantum=wa.KEY_QUANTUM: calls.append(1) or real(visible))
    lengths = [len(t) for t in tokenize_questions(gpt2_model, QUESTIONS)]
    assert max(lengths) - min(lengths) < wa.KEY_QUANTUM
    extract(gpt2_model, QUESTIONS, batch_size=len(QUESTIONS), max_new_tokens=3)
    assert not calls
    extract(gpt2_model, UNEVEN, batch_size=len(UNEVEN), max_new_tokens=3)
    assert calls


def test_importing_the_runner_does_not_load_transformers_modeling_code():
    """The twins register at first use: the flow's steps that never run a model (plans, joins) import the runner
    without transformers' modeling code (1.8 s per task)."""
    code = "import sys, codi_attn.heads, codi_attn.runner; print('transformers.modeling_utils' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"
