"""codi_attn.runs: what two runs' comparison rests on (the compare card's account of it is in
tests/test_cards_metrics.py, the run lookups themselves run in tests/test_flow.py)."""
from __future__ import annotations

from types import SimpleNamespace

from codi_attn.runs import comparison_basis, sample_difference, setting_differences

SETTINGS = {"model": "gpt2", "ckpt": "/a", "base": "/b", "dataset": "train.jsonl", "split": "train", "n": 6,
            "n_problems": "6", "seed": 42, "max_new_tokens": 4, "compare_with": ""}


def _run(fingerprint: str, **settings) -> SimpleNamespace:
    return SimpleNamespace(pathspec="AttentionFlow/7", data=SimpleNamespace(
        dataset_fingerprint=fingerprint, settings={**SETTINGS, **settings}))


def test_setting_differences_leave_the_models_own_settings_out():
    there = {**SETTINGS, "model": "llama", "ckpt": "/c", "max_new_tokens": 8, "n": None}
    assert setting_differences(SETTINGS, there) == ["--n_problems 6 here, all there",
                                                     "--max_new_tokens 4 here, 8 there"]


def test_sample_difference_names_the_settings_that_differ():
    assert sample_difference(_run("a" * 64), "a" * 64, SETTINGS) is None
    assert sample_difference(_run("b" * 64, n=8, seed=1), "a" * 64, SETTINGS) == (
        "run AttentionFlow/7 has another sample (dataset fingerprint bbbbbbbbbbbb there, aaaaaaaaaaaa here): "
        "--n_problems 6 here, 8 there; --seed 42 here, 1 there")
    assert sample_difference(_run("b" * 64), "a" * 64, SETTINGS).endswith(
        "the same --dataset, --split, --n_problems and --seed, so the dataset's records differ")


def test_comparison_basis_counts_what_each_run_extracted():
    def data(extracted, layers, heads, fingerprint="f" * 64, **settings):
        return SimpleNamespace(dataset_fingerprint=fingerprint, sampled_ids=["a", "b", "c"], problem_ids=extracted,
                               model_info={"n_layers": layers, "n_heads": heads}, settings={**SETTINGS, **settings})

    basis = comparison_basis(data(["a", "c"], 2, 4), data(["a", "b"], 3, 8, model="llama", max_new_tokens=8))
    assert basis == {"same_sample": True, "fingerprints": ("f" * 64, "f" * 64), "sampled": (3, 3),
                     "extracted": (2, 2), "in_both": 1, "shapes": ((2, 4), (3, 8)),
                     "differences": ["--max_new_tokens 4 here, 8 there"]}
    assert not comparison_basis(data(["a"], 2, 4), data(["a"], 2, 4, fingerprint="e" * 64))["same_sample"]
