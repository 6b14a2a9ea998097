"""Causal validation (codi_attn.validate, and its runs on the model in codi_attn.validate_run): controls, measures,
logit lens and the card, on the tiny fixtures (codi-spec traps 3-6)."""
from __future__ import annotations

import pickle
from collections import Counter

import numpy as np
import pandas as pd
import pytest

from codi_attn.conventions import N_THOUGHTS
from codi_attn.data import gold_answer
from codi_attn.extract import extract
from codi_attn.hooks import AnswerLogits, FeedThoughts, RecordThoughts, swap_partners
from codi_attn.runner import Generation, Runner, number_tokens
from codi_attn.validate import (COLUMNS, GROUPS, answers_changed, bootstrap_interval, intermediate_results,
                                plan_validation, random_head_sets, resample_indices, token_number)
from codi_attn.validate_run import Outcome, answer_token_kl, logit_lens, run_validation, token_kl
from steering import forced_answer, steered

QUESTIONS = ["Natalia sold 48 clips in April. How many clips?", "Weng earns $12 an hour.",
             "A robe takes 2 bolts of blue fiber and half that much white fiber."]
SOLUTIONS = ["12*4=<<12*4=48>>48 clips\n48+24=<<48+24=72>>72\n#### 72", "12*6=<<12*6=72>>72\n#### 72", "#### 5"]
GOLDS = [gold_answer(s) for s in SOLUTIONS]


def validate(model, **kwargs):
    """run_validation on the three problems."""
    return run_validation(model, QUESTIONS, GOLDS, SOLUTIONS, ranked(model), **kwargs)


def ranked(model, seed: int = 0) -> pd.DataFrame:
    """A ranking of every head by a random composite, best first (as codi_attn.metrics.head_scores gives)."""
    layer, head = (x.ravel() for x in np.indices((model.n_layers, model.n_heads)))
    df = pd.DataFrame({"layer": layer, "head": head, "composite": np.random.default_rng(seed).random(layer.size)})
    return df.sort_values("composite", ascending=False).reset_index(drop=True)


def fixed_prefix_then_number(model, prefix: str):
    """Make greedy decoding spell `prefix` (as CODI's 'The answer is:'), then pick a number token: every number
    token gets the same large boost, so which one wins, and the distribution among them, stay the model's."""
    script = model.tokenizer(prefix, add_special_tokens=False)["input_ids"]
    after = dict(zip([model.eot_id, *script[:-1]], script))
    numbers = number_tokens(model)

    def steer(logits, last_id):
        if last_id in after:
            logits[after[last_id]] += 1e4
        elif last_id == script[-1]:
            logits[numbers] += 1e4

    return steered(model, steer)


def test_answer_token_kl_sees_interventions_behind_a_fixed_prefix(gpt2_model):
    """CODI answers start with a fixed 'The answer is:'; the KL is taken where the number starts, on every
    problem (same prefix everywhere), and is 0 for the no-op and positive for blocking and the swap."""
    with fixed_prefix_then_number(gpt2_model, "The answer is:"):
        answer = AnswerLogits(len(QUESTIONS), numbers=number_tokens(gpt2_model))
        base = Runner(gpt2_model, max_new_tokens=8).run(QUESTIONS, [answer])
        result = validate(gpt2_model, k=1, n_random=1, batch_size=3, max_new_tokens=8, n_boot=50)
    assert all(text.startswith("The answer is:") for text in base.text)
    prefix = len(gpt2_model.tokenizer("The answer is:", add_special_tokens=False)["input_ids"])
    assert (answer.step == prefix).all()
    df = result.validation.set_index("condition")
    assert (df["kl_compared"] == 1.0).all(), "the same prefix everywhere: every problem is compared"
    assert df.loc["no-op", "kl_answer_token"] == 0.0
    assert (result.group("blocking")["kl_answer_token"] > 0).all()
    assert df.loc["swap thoughts", "kl_answer_token"] > 0


def test_plan_draws_distinct_controls_and_says_where_they_come_from():
    """The validation's controls are the held-out test's random sets (`random_head_sets`): distinct, outside the
    top-k, layer-matched where the top-k's layers leave enough heads; the demo's top-4 (three of layer 0's four
    heads) gets five distinct sets from all layers, noted, and the verdict says "from all layers"."""
    first = [(0, 0), (0, 1), (0, 2), (1, 1)]
    order = first + [(l, h) for l in range(4) for h in range(4) if (l, h) not in first]
    ranked = pd.DataFrame({"layer": [l for l, _ in order], "head": [h for _, h in order],
                           "composite": np.linspace(1, 0, 16)})
    plan = plan_validation(ranked, n_layers=4, n_heads=4, n_problems=10, k=4, n_random=5)
    top = next(c for c in plan.conditions if c.group == "top-k").heads
    assert sorted(top) == sorted(first)
    controls = [c.heads for c in plan.conditions if c.group == "random control"]
    assert len(controls) == 5 == len(set(controls)) and not any(set(c) & set(top) for c in controls)
    assert not plan.settings["controls_matched"] and any("from all layers" in n for n in plan.notes)
    wide = pd.DataFrame({"layer": [l for l in range(3) for _ in range(8)], "head": list(range(8)) * 3,
                         "composite": np.linspace(1, 0, 24)})
    plan = plan_validation(wide, n_layers=3, n_heads=8, n_problems=10, k=3, n_random=5)
    top = next(c for c in plan.conditions if c.group == "top-k").heads
    for c in (c.heads for c in plan.conditions if c.group == "random control"):
        assert Counter(layer for layer, _ in c) == Counter(layer for layer, _ in top)
    assert plan.settings["controls_matched"] and not plan.notes


def test_one_problem_has_no_interval():
    """Every resample of one problem is that problem: a zero-width interval would look certain, so none is given,
    here and in a head scan's effects (delta and logit difference); the sign test's p-value stays (0.5)."""
    assert np.isnan(bootstrap_interval(np.array([-1.0]), resample_indices(1, 100, seed=0))).all()
    from codi_attn.heads import HeadScan

    scan = HeadScan([(0, 0)], ["mean"], ["thoughts"], np.array([True]), np.array([1.0]), np.array([2.0]),
                    np.array([[False]]), np.array([[3.0]]), np.array([[0.5]], np.float32), np.array([[-1.0]],
                                                                                                  np.float32))
    row = scan.effects(n_boot=100).iloc[0]
    assert row["delta_accuracy"] == -1.0 and row["p_value"] == 0.5 and not row["critical"]
    assert np.isnan(row[["delta_ci_low", "delta_ci_high", "logit_diff_ci_low", "logit_diff_ci_high"]].astype(float)).all()


@pytest.mark.parametrize("values", [np.r_[np.ones(3), np.zeros(97)], np.ones(10), np.zeros(10), np.ones(2),
                                    np.random.default_rng(1).integers(0, 2, 50).astype(float),
                                    np.random.default_rng(2).integers(-1, 2, 40).astype(float)])
def test_intervals_contain_the_point_estimate(values):
    lo, hi = bootstrap_interval(values, resample_indices(len(values), 500, seed=0))
    assert lo <= values.mean() <= hi


def test_interval_is_of_the_mean_by_an_independent_bootstrap():
    """The interval is the 2.5/97.5 percentiles of the resampled means (a loop over resamples, here), and its width
    shrinks as the normal approximation says (2 x 1.96 x sqrt(p (1 - p) / N) for 0/1 values), not the spread of
    single problems."""
    values = np.r_[np.ones(30), np.zeros(70)]
    idx = resample_indices(len(values), 2000, seed=3)
    means = np.array([sum(values[i] for i in row) / len(row) for row in idx])
    lo, hi = bootstrap_interval(values, idx)
    np.testing.assert_allclose((lo, hi), np.percentile(means, [2.5, 97.5]), rtol=0, atol=1e-12)
    assert abs((hi - lo) - 2 * 1.96 * np.sqrt(0.3 * 0.7 / 100)) < 0.02


def test_token_kl():
    base = np.log([[0.5, 0.25, 0.25], [0.1, 0.2, 0.7]])
    other = np.log([[0.25, 0.25, 0.5], [0.1, 0.2, 0.7]])
    base, other = (np.c_[x, np.full(2, -np.inf)] for x in (base, other))  # EOT's -inf column, as in decoding
    kl = token_kl(base, other)
    np.testing.assert_allclose(kl, [0.5 * np.log(2) + 0.25 * np.log(0.5), 0.0], atol=1e-12)
    assert np.all(token_kl(base, base) == 0.0)
    assert np.isnan(token_kl(base, np.full_like(base, np.nan))).all()  # a step the condition never reached


def test_answer_token_kl_compares_only_the_same_context():
    """KL at the baseline's answer step where the condition generated the same tokens before it; nan where
    its prefix differs, it stopped earlier, or the baseline has no answer step."""
    log = np.log
    base_logits = log([[0.5, 0.5], [0.9, 0.1], [0.5, 0.5], [0.5, 0.5]])
    cond_logits = log([[0.25, 0.75], [0.9, 0.1], [0.5, 0.5], [0.5, 0.5]])
    tokens = np.array([[7, 8, 1], [7, 8, 1], [7, 8, 1], [7, -1, -1]])
    base = Outcome(Generation(tokens, [""] * 4, np.zeros(4)), np.zeros(4, bool), base_logits, np.array([2, 2, 2, -1]))
    cond_tokens = np.array([[7, 8, 3], [7, 9, 1], [7, 8, 1], [7, -1, -1]])
    cond = Outcome(Generation(cond_tokens, [""] * 4, np.zeros(4)), np.zeros(4, bool), cond_logits,
                   np.array([2, 2, -1, -1]))
    kl = answer_token_kl(base, cond)
    np.testing.assert_allclose(kl[0], 0.5 * log(0.5 / 0.25) + 0.5 * log(0.5 / 0.75), atol=1e-12)
    assert np.isnan(kl[1:]).all()  # other prefix (8 vs 9); stopped before step 2; baseline without a step


def test_intermediate_results_and_number_tokens():
    assert intermediate_results(SOLUTIONS[0]) == {48.0, 72.0}
    assert intermediate_results("<<1,200*2=2,400>> and <<5*.25=1.25>> <<x=oops>>\n#### 2400") == {2400.0, 1.25}
    assert intermediate_results("#### 5") == set()
    assert token_number(" 72") == 72.0 and token_number("1,200") == 1200.0 and token_number(" clips") is None
    assert token_number("0") == 0.0 and token_number(" 0.5") == 0.5 and token_number("-3") == -3.0
    assert [token_number(t) for t in ("012", "00", "005", "12.0", "12.", ".5", "1.50")] == [None] * 7


def test_logit_lens_counts_thoughts_that_decode_to_intermediate_results(gpt2_model):
    """Thought hidden states aimed at a number token's embedding decode to it; shares count per thought."""
    numbers = {s: gpt2_model.tokenizer(s, add_special_tokens=False)["input_ids"] for s in ("48", "72", "5")}
    assert all(len(ids) == 1 for ids in numbers.values()), "fixture tokenizer spells these numbers in one token"
    embedding = gpt2_model.lm.get_output_embeddings().weight.detach()
    aim = {s: (8 * embedding[ids[0]] / embedding[ids[0]].norm() ** 2).numpy() for s, ids in numbers.items()}
    hidden = np.stack([np.stack([aim["48"], aim["72"], aim["5"], aim["48"], aim["72"], aim["5"]])] * 3)
    lens = logit_lens(gpt2_model, hidden, SOLUTIONS)
    assert list(lens["thought"]) == [f"z{j + 1}" for j in range(N_THOUGHTS)]
    assert lens.loc[0, "top_tokens"] == "'48' 100%"  # the aim really hits the token
    assert lens["number"].tolist() == [1.0] * N_THOUGHTS
    # 48 is a step of problem 0 only; 72 a step and the answer of problems 0 and 1; 5 only problem 2's answer
    np.testing.assert_allclose(lens["intermediate"], [1 / 3, 2 / 3, 0, 1 / 3, 2 / 3, 0])
    np.testing.assert_allclose(lens["final_answer"], [0, 2 / 3, 1 / 3, 0, 2 / 3, 1 / 3])
    assert (lens["intermediate_top_n"] >= lens["intermediate"]).all()


def check_result(result, model, k: int, n_random: int) -> None:
    """Shared checks of a ValidationResult (table shape, controls, intervals, no-op)."""
    df = result.validation
    assert list(df.columns) == list(COLUMNS) and set(df["group"]) == set(GROUPS)
    assert Counter(df["group"]) == Counter({"baseline": 1, "no-op": 1, "top-k": 1, "top-k single": k,
                                            "random control": n_random, "blocking": N_THOUGHTS + 1,
                                            "latent swap": 1})
    assert result.noop_identical
    noop = result.group("no-op").iloc[0]
    assert noop["delta_accuracy"] == 0 and noop["answers_changed"] == 0 and noop["kl_answer_token"] == 0
    baseline = result.group("baseline").iloc[0]  # compared with itself: on every problem whose answer has a number
    assert noop["kl_compared"] == baseline["kl_compared"] > 0 and baseline["kl_answer_token"] == 0
    assert (df["ci_low"] <= df["accuracy"]).all() and (df["accuracy"] <= df["ci_high"]).all()
    assert (df["delta_ci_low"] <= df["delta_accuracy"]).all() and (df["delta_accuracy"] <= df["delta_ci_high"]).all()
    top = result.group("top-k").iloc[0]["heads"].split()
    assert top == list(result.group("top-k single")["heads"]) and len(top) == k
    for heads in result.group("random control")["heads"]:
        assert not set(heads.split()) & set(top)
    assert list(result.group("blocking")["blocked"])[:2] == ["z1", "z2"]
    assert len(result.logit_lens) == N_THOUGHTS
    assert pickle.loads(pickle.dumps(result)).validation.equals(df)


def test_run_validation_end_to_end_gpt2_mean_thoughts(gpt2_model):
    ranking = ranked(gpt2_model)
    result = validate(gpt2_model, k=2, n_random=2, batch_size=3, max_new_tokens=3, n_boot=200)
    check_result(result, gpt2_model, k=2, n_random=2)
    assert result.settings["ablation"] == "mean" and result.settings["positions"] == "thoughts"
    top = result.group("top-k").iloc[0]["heads"].split()
    assert top == [f"L{r.layer}H{r.head}" for r in ranking.head(2).itertuples()]
    own = RecordThoughts(len(QUESTIONS))
    base = extract(gpt2_model, QUESTIONS, GOLDS, max_new_tokens=3, hooks=[own])
    assert result.group("baseline").iloc[0]["accuracy"] == base.correct.mean()
    partners = swap_partners(SOLUTIONS)  # solutions of 2, 1 and 0 steps: each alone, so the next problem
    np.testing.assert_array_equal(partners, [1, 2, 0])
    swapped = extract(gpt2_model, QUESTIONS, GOLDS, max_new_tokens=3, hooks=[FeedThoughts(own.z[partners])])
    swap = result.group("latent swap").iloc[0]
    assert swap["accuracy"] == swapped.correct.mean()
    assert swap["answers_changed"] == answers_changed(base.prediction, swapped.prediction).mean()

    from cards.validate_card import validate_card, verdict

    lines = verdict(result)
    assert lines[0].startswith("**Warning: only 3 problems: percentile-bootstrap 95% intervals over so few")
    assert "bit for bit" in lines[1] and any("Ablating the top-2 heads by composite score" in line for line in lines)
    rendered = [c.render() for c in validate_card(result)]
    images = [r for r in rendered if r["type"] == "image"]
    assert len(images) == 3 and all(r["src"] and r["src"].startswith("data:image/png") for r in images)


def test_run_validation_llama_zero_all_positions_on_real_decoded_answers(llama_model):
    """Trap 5: the fixture's decoded text (forced to 'The answer is: 72') parses, so accuracy is 2/3 (golds 72, 72,
    5) under every condition instead of 0 by fiat; k above a quarter of the heads is capped."""
    with forced_answer(llama_model, "The answer is: 72"):
        ex = extract(llama_model, QUESTIONS, GOLDS, max_new_tokens=10)
        result = validate(llama_model, k=20, n_random=1, ablation="zero", positions="all", batch_size=3,
                          max_new_tokens=10, n_boot=100)
    assert ex.text == ["The answer is: 72"] * 3
    np.testing.assert_array_equal(ex.prediction, [72.0] * 3)
    k = llama_model.n_layers * llama_model.n_heads // 4
    check_result(result, llama_model, k=k, n_random=1)
    assert result.settings["k"] == k and any("capped" in note for note in result.notes)
    np.testing.assert_allclose(result.validation["accuracy"], 2 / 3)
    assert (result.validation["answers_changed"] == 0).all()


def test_bad_settings_are_rejected(gpt2_model):
    with pytest.raises(ValueError, match="ablation"):
        validate(gpt2_model, ablation="shuffle")
    with pytest.raises(ValueError, match="positions"):
        validate(gpt2_model, positions="latent")
    with pytest.raises(ValueError, match="one gold answer and solution per question"):
        run_validation(gpt2_model, QUESTIONS, GOLDS[:1], SOLUTIONS, ranked(gpt2_model))
    with pytest.raises(ValueError, match="lacks columns"):
        run_validation(gpt2_model, QUESTIONS, GOLDS, SOLUTIONS, ranked(gpt2_model).drop(columns="composite"))
    with pytest.raises(ValueError, match="two problems or more"):
        run_validation(gpt2_model, QUESTIONS[:1], GOLDS[:1], SOLUTIONS[:1], ranked(gpt2_model), ablation="resample")


def test_one_problem_runs_without_the_latent_swap(gpt2_model):
    result = run_validation(gpt2_model, QUESTIONS[:1], GOLDS[:1], SOLUTIONS[:1], ranked(gpt2_model), k=1, n_random=1,
                            batch_size=1, max_new_tokens=2, n_boot=50)
    assert result.group("latent swap").empty and "latent swap" not in set(result.validation["group"])
    assert any("no latent swap" in note for note in result.notes)

    from cards.validate_card import verdict

    assert not any("thoughts of another problem" in line for line in verdict(result))


def test_verdict_says_when_random_draws_repeat(gpt2_model):
    """Identical random draws (e.g. the only heads left outside the top-k) must not read as a tight control."""
    from cards.validate_card import verdict

    result = validate(gpt2_model, k=2, n_random=3, batch_size=3, max_new_tokens=2, n_boot=50)
    rand = result.validation["group"] == "random control"
    def control_line() -> str:
        return next(line for line in verdict(result) if "random heads" in line)

    result.validation.loc[rand, "heads"] = ["L0H1 L1H1", "L0H1 L1H2", "L0H3 L1H2"]
    assert "distinct" not in control_line()
    result.validation.loc[rand, "heads"] = result.validation.loc[rand, "heads"].iloc[0]
    assert "over 3 draws, only 1 distinct head set" in control_line()
    from codi_attn.figures.validation import ablation_figure

    for matched, where in ((True, "from the same layers"), (False, "from all layers")):
        result.settings["controls_matched"] = matched
        assert f"random heads {where}" in control_line()
        assert f"random other heads {where}" in ablation_figure(result)._suptitle.get_text()


def test_card_reads_a_kl_that_no_problem_could_give(gpt2_model):
    """A condition whose runs all left the baseline's tokens before the number has no KL: the verdict, the
    table and the bar chart say n/a instead of a number or a silent zero."""
    from cards.validate_card import validate_card, verdict
    from codi_attn.figures.validation import ablation_figure

    result = validate(gpt2_model, k=1, n_random=1, batch_size=3, max_new_tokens=2, n_boot=50)
    top = result.validation["group"] == "top-k"
    result.validation.loc[top, ["kl_answer_token", "kl_compared"]] = [np.nan, 0.0]
    assert any("its answer-token KL is n/a" in line for line in verdict(result))
    table = next(c for c in validate_card(result) if type(c).__name__ == "Table").render()
    assert ["n/a", "0%"] in [row[-2:] for row in table["data"]]
    figure = ablation_figure(result)
    assert "n/a" in [t.get_text() for t in figure.axes[2].texts]


def test_run_validation_resample_ablation(gpt2_model):
    """Resample ablation runs end to end: the full table, the controls and the bit-for-bit no-op; every ablated
    row and the swap took other problems' inputs (a head's own input would change nothing, bit for bit:
    test_ablation), so each changed an answer."""
    result = validate(gpt2_model, k=2, n_random=1, ablation="resample", batch_size=2, max_new_tokens=3, n_boot=50)
    check_result(result, gpt2_model, k=2, n_random=1)
    assert result.settings["ablation"] == "resample"
    df = result.validation
    moved = df[df["group"].isin(["top-k", "top-k single", "random control", "latent swap"])]
    assert len(moved) == 5 and (moved["answers_changed"] > 0).all()


def test_validation_in_groups_equals_one_run_of_every_condition(gpt2_model):
    """The flow's way: the plan's conditions in groups, each group on its own baseline run, joined: the same table,
    lens, no-op check and settings as run_validation (both stacking conditions); parts that do not make the plan are
    refused."""
    from dataclasses import replace

    from codi_attn.validate import join_validation, plan_validation
    from codi_attn.validate_run import validate_group

    options = {"batch_size": 3, "max_new_tokens": 2, "n_boot": 50, "seed": 3, "stack": 4}
    whole = validate(gpt2_model, k=1, n_random=1, **options)
    plan = plan_validation(ranked(gpt2_model), gpt2_model.n_layers, gpt2_model.n_heads, len(QUESTIONS), k=1,
                           n_random=1, seed=3)
    groups = plan.groups(6)
    assert [len(g) for g in groups] == [6, 6] and sum(groups, []) == plan.conditions
    parts = [validate_group(gpt2_model, QUESTIONS, GOLDS, SOLUTIONS, g, **options) for g in groups]
    assert [p.noop_identical for p in parts] == [True, None]
    joined = join_validation(plan, parts)
    pd.testing.assert_frame_equal(joined.validation, whole.validation)
    pd.testing.assert_frame_equal(joined.logit_lens, whole.logit_lens)
    assert joined.noop_identical and joined.settings == whole.settings and joined.notes == whole.notes
    with pytest.raises(ValueError, match="the validation parts hold conditions"):
        join_validation(plan, parts[:1])
    other = replace(parts[1], baseline={**parts[1].baseline, "accuracy": 0.5})  # as another model's baseline
    with pytest.raises(ValueError, match="different baselines"):
        join_validation(plan, [parts[0], other])


def test_random_sets_are_distinct_and_layer_matched_or_say_they_are_not():
    rng = np.random.default_rng(0)
    top = [(0, 1), (2, 3), (2, 4)]
    sets, matched = random_head_sets(top, n_layers=4, n_heads=12, n_sets=50, rng=rng)
    assert matched and len(sets) == 50 == len(set(sets))
    for s in sets:
        assert sorted(l for l, _ in s) == [0, 2, 2] and not set(s) & set(top)
    # two of layer 1's three other heads: only 3 layer-matched sets exist, fewer than 50: drawn from all layers
    sets, matched = random_head_sets([(1, 0), (1, 1), (1, 2)], n_layers=3, n_heads=5, n_sets=50, rng=rng)
    assert not matched and len(sets) == 50 == len(set(sets))
    assert any(len({l for l, _ in s}) > 1 for s in sets)
    sets, _ = random_head_sets([(0, 0)], n_layers=1, n_heads=4, n_sets=50, rng=rng)
    assert sorted(sets) == [((0, 1),), ((0, 2),), ((0, 3),)]  # all there are
