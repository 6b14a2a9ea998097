"""Which heads carry the thoughts (codi_attn.heads, and its runs on the model in codi_attn.heads_run): the exact scan
against independent computations, attribution patching against the exact first-order change, random sets, the held-out
split, shards, correlations, the card."""
from __future__ import annotations

import dataclasses
import math

import numpy as np
import pandas as pd
import pytest
import torch
from scipy.stats import false_discovery_control

from codi_attn import heads as H
from codi_attn import heads_run as HR
from codi_attn.extract import extract
from codi_attn.runner import Runner, head_dim
from reference import zeroed_heads

QUESTIONS = ["Natalia sold 48 clips in April. How many clips?", "Weng earns $12 an hour.",
             "A robe takes 2 bolts of blue fiber and half that much white fiber.", "Tom has 3 apples. How many?"]
SOLUTIONS = ["<<12*4=48>>\n#### 48", "<<12*6=72>>\n#### 72", "<<2/2=1>>\n#### 3", "#### 3"]
GOLDS = ["48", "72", "3", "3"]


@pytest.fixture(scope="module")
def demo():
    """The demo model with PyTorch's linear layers, and 24 of its held-out problems."""
    from codi_attn.data import load_records, sample_problems
    from codi_attn.model import load_codi

    problems = sample_problems(load_records("synthetic", "test"), 24, seed=42, split="test")
    model = load_codi("demo", device="cpu", dtype="float32", prepack=False)
    return model, [p.question for p in problems], [p.answer for p in problems], [p.solution for p in problems]


def test_scan_zero_everywhere_equals_zeroing_the_weight_rows(demo):
    """The scan's per-problem answers for zero ablation at all positions equal runs with the head's rows of the
    output projection's weight zeroed (no hook at all), for heads of every layer."""
    model, questions, golds, solutions = demo
    chosen = [(0, 1), (1, 2), (2, 0), (3, 3)]
    scan = HR.scan_heads(model, questions, golds, solutions, chosen, ("zero",), ("all",), batch_size=8,
                        max_new_tokens=8)
    for c, head in enumerate(scan.heads):
        with zeroed_heads(model, [head]):
            zeroed = extract(model, questions, golds, batch_size=8, max_new_tokens=8)
        np.testing.assert_array_equal(scan.correct[c], zeroed.correct)
        np.testing.assert_array_equal(scan.prediction[c], zeroed.prediction)


def test_scan_effects_are_the_per_problem_changes(demo):
    """The baseline is a plain run on the same problems. Effects: accuracy and its change are the means of the
    per-problem outcomes, the interval contains the point, answers changed counts changed predictions, the sign
    test's p-value is the binomial tail by hand; a subset gives the subset's numbers."""
    model, questions, golds, solutions = demo
    scan = HR.scan_heads(model, questions, golds, solutions, [(2, 0), (0, 1)], ("mean", "resample"), batch_size=8,
                        max_new_tokens=8)
    plain = extract(model, questions, golds, batch_size=8, max_new_tokens=8)  # trap 6: the same problems' baseline
    assert 0 < plain.correct.mean() < 1, "a baseline on other problems could not be told apart"
    np.testing.assert_array_equal(scan.base_correct, plain.correct)
    np.testing.assert_array_equal(scan.base_prediction, plain.prediction)
    eff = scan.effects(n_boot=200)
    assert len(eff) == 4 and list(eff.columns) == list(H.EFFECT_COLUMNS)
    for c, row in eff.iterrows():
        assert row["accuracy"] == scan.correct[c].mean()
        assert row["delta_accuracy"] == pytest.approx(scan.correct[c].mean() - scan.base_correct.mean())
        assert row["delta_ci_low"] <= row["delta_accuracy"] <= row["delta_ci_high"]
        changed = ~((scan.prediction[c] == scan.base_prediction)
                    | (np.isnan(scan.prediction[c]) & np.isnan(scan.base_prediction)))
        assert row["answers_changed"] == changed.mean()
    half = scan.effects(np.arange(12), n_boot=0)
    assert (half["n_problems"] == 12).all()
    assert half.loc[0, "accuracy"] == scan.correct[0, :12].mean()
    for c, row in eff.iterrows():  # the sign test by hand: P(at least `lost` of the flips are losses | fair coin)
        lost = int((scan.base_correct & ~scan.correct[c]).sum())
        flips = lost + int((~scan.base_correct & scan.correct[c]).sum())
        by_hand = sum(math.comb(flips, i) for i in range(lost, flips + 1)) / 2 ** flips
        assert row["p_value"] == pytest.approx(by_hand, rel=1e-9)
    assert (eff["critical"] == ((eff["q_value"] < H.FDR) & (eff["delta_accuracy"] <= -H.CRITICAL_DROP))).all()


def flipped(rng: np.random.Generator, base: np.ndarray, lost: int, gained: int) -> np.ndarray:
    """The baseline's correctness [N] with `lost` right answers made wrong and `gained` wrong ones made right."""
    flips = np.r_[rng.choice(np.flatnonzero(base), lost, replace=False),
                  rng.choice(np.flatnonzero(~base), gained, replace=False)]
    return np.where(np.isin(np.arange(len(base)), flips), ~base, base)


def scan_of(base: np.ndarray, correct: np.ndarray, **settings) -> H.HeadScan:
    """A mean-ablation scan at the thoughts of len(correct) heads with these outcomes [C, N] (no logits)."""
    c, n = correct.shape
    return H.HeadScan([(i // 10, i % 10) for i in range(c)], ["mean"] * c, ["thoughts"] * c, base,
                      base.astype(float), np.zeros(n), correct, correct.astype(float), np.zeros((c, n), np.float32),
                      np.zeros((c, n), np.float32), settings)


def bh_by_hand(p: np.ndarray, m: int) -> np.ndarray:
    """q_i = min over j >= i of p_(j) m / j, the ranks j among the given p-values (those left out have p = 1)."""
    order = np.argsort(p)
    q = np.empty(len(p))
    q[order] = np.minimum.accumulate((p[order] * m / np.arange(1, len(p) + 1))[::-1])[::-1].clip(max=1)
    return q


def test_critical_heads_control_the_false_discovery_rate():
    """Benjamini-Hochberg by hand (per kind and positions). 300 heads with no effect (each flips 10 answers, each
    flip a loss or a gain with probability 1/2) give no critical head where the per-head interval calls some; 10
    heads planted to lose 20 of 100 answers among them are all found."""
    rng = np.random.default_rng(0)
    n, null, planted = 100, 300, 10
    base = rng.random(n) < 0.76
    correct = np.array([flipped(rng, base, lost, 10 - lost) for lost in rng.binomial(10, 0.5, null)]
                       + [flipped(rng, base, 20, 0) for _ in range(planted)])
    assert abs(correct[:null].mean() - base.mean()) < 0.005  # no effect on average
    scan = scan_of(base, correct)
    eff = scan.effects(n_boot=200)
    p = eff["p_value"].to_numpy()
    np.testing.assert_allclose(eff["q_value"], bh_by_hand(p, len(p)), rtol=1e-12)
    assert eff["critical"][null:].all()
    alone = scan_of(base, correct[:null]).effects(n_boot=200)
    per_head = (alone["delta_ci_high"] < 0) & (alone["delta_accuracy"] <= -H.CRITICAL_DROP)
    assert not alone["critical"].any() and per_head.sum() >= 2
    other = dataclasses.replace(scan, kinds=["mean"] * null + ["zero"] * planted)  # adjusted within a kind
    np.testing.assert_allclose(other.effects(n_boot=0)["q_value"][null:],
                               false_discovery_control(p[null:], method="bh"), rtol=1e-12)


def test_a_partial_scan_adjusts_over_all_the_models_heads():
    """--head_scan top:M scans the M heads an estimate on the same problems found most harmful; the heads left out
    count with p = 1, so the family is the model's heads. Worst case of that choice: of 300 heads with no effect,
    the 20 that lose most (a perfect estimate). BH over the 20 calls some critical; over the model's 300, none, as
    with the whole scan."""
    rng = np.random.default_rng(0)
    n = 100
    base = rng.random(n) < 0.76
    correct = np.array([flipped(rng, base, lost, 14 - lost) for lost in rng.binomial(14, 0.5, 300)])
    whole = scan_of(base, correct, n_layers=30, n_heads=10).effects(n_boot=0)
    top = np.argsort(correct.sum(1), kind="stable")[:20]  # the 20 heads that lose most
    chosen = scan_of(base, correct[top], n_layers=30, n_heads=10).effects(n_boot=0)
    np.testing.assert_allclose(chosen["q_value"], bh_by_hand(chosen["p_value"].to_numpy(), 300), rtol=1e-12)
    assert not whole["critical"].any() and not chosen["critical"].any()
    among_chosen = scan_of(base, correct[top]).effects(n_boot=0)  # no model size given: BH over the 20
    assert among_chosen["critical"].any()


def test_shards_merge_into_the_unsharded_scan(gpt2_model):
    """Scanning head groups and merging them gives the scan of all heads, array for array."""
    every = HR.all_heads(gpt2_model)
    kwargs = dict(kinds=("mean", "zero"), batch_size=2, max_new_tokens=3)
    whole = HR.scan_heads(gpt2_model, QUESTIONS, GOLDS, SOLUTIONS, every, **kwargs)
    parts = [HR.scan_heads(gpt2_model, QUESTIONS, GOLDS, SOLUTIONS, every[i: i + 3], **kwargs)
             for i in range(0, len(every), 3)]
    merged = H.merge_scans(parts)
    assert merged.heads == whole.heads and merged.kinds == whole.kinds
    for name in ("correct", "prediction", "kl", "logit_diff"):
        np.testing.assert_array_equal(getattr(merged, name), getattr(whole, name))
    pd.testing.assert_frame_equal(merged.effects(n_boot=50), whole.effects(n_boot=50))
    with pytest.raises(ValueError, match="overlap"):
        H.merge_scans([parts[0], parts[0]])
    other = HR.scan_heads(gpt2_model, QUESTIONS[::-1], GOLDS[::-1], SOLUTIONS[::-1], every[:1], **kwargs)
    with pytest.raises(ValueError, match="different baselines"):
        H.merge_scans([parts[0], other])


def test_attribution_equals_the_exact_first_order_change(demo, monkeypatch):
    """In the linear regime the estimate is exact: replacing a head's input a by a + eps * d at every thought
    changes the answer's logit difference by sum_k eps * d . gradient_k, as the estimate says (to O(eps^2))."""
    model, questions, golds, solutions = demo
    layer, head, eps = 2, 0, 1e-2
    d = head_dim(model)
    direction = torch.randn(d, generator=torch.Generator().manual_seed(0))
    base = HR.run_baseline(Runner(model, 8, 8), questions, golds, solutions, ("zero",), ("thoughts",))
    monkeypatch.setattr(HR.HeadGradients, "_replacement", lambda self, kind, k, l, batch, a: a + eps * direction)
    estimate = HR.attribution(model, questions, base, ("zero",), batch_size=8)
    shifted = base.shift_hook()

    def nudge(value, point, batch):
        value = value.clone()
        value[:, head] += eps * direction
        return value

    Runner(model, 8, 8).run(questions, [(f"thought.*.head_in.{layer}", nudge), shifted])
    exact = np.nanmean(shifted.logit_diff - base.logit_diff)
    got = estimate.set_index("label").loc[f"L{layer}H{head}", "estimate"]
    assert abs(exact) > 1e-4, "the nudge must move the logit difference measurably"
    assert got == pytest.approx(exact, rel=0.05)


def test_gradients_refuse_a_prepacked_model(gpt2_model):
    if "prepacked" not in gpt2_model.source["linear"]:
        pytest.skip("this PyTorch build has no oneDNN prepacking")
    with pytest.raises(ValueError, match="prepack=False"):
        Runner(gpt2_model, gradients=True)


@pytest.mark.parametrize("n", [2, 7, 100])
def test_held_out_halves_never_share_a_problem(n):
    a, b = H.split_halves(n, seed=3)
    assert not set(a) & set(b) and sorted([*a, *b]) == list(range(n)) and len(a) == n // 2
    assert np.array_equal(a, H.split_halves(n, seed=3)[0])


def test_held_out_selects_on_a_and_measures_on_b(gpt2_model):
    scan = HR.scan_heads(gpt2_model, QUESTIONS, GOLDS, SOLUTIONS, kinds=("mean",), batch_size=2, max_new_tokens=3)
    attention = extract(gpt2_model, QUESTIONS, GOLDS, max_new_tokens=1).attention
    held = HR.held_out(gpt2_model, QUESTIONS, GOLDS, SOLUTIONS, scan, attention, k=2, n_random=5, n_boot=50,
                      batch_size=2, max_new_tokens=3)
    a = H.split_halves(len(QUESTIONS))[0]
    chosen = H.causal_order(scan.effects(a, n_boot=0)).head(2)["label"].tolist()
    assert held.summary.set_index("selection").loc["causal", "heads"] == " ".join(chosen)
    assert set(held.sets["group"]) == {"causal", "composite", "random (causal)", "random (composite)"}
    assert (held.summary["n_random"] == 5).all()


def test_held_out_composite_selection_reads_half_a_only():
    """The composite top-k is chosen on half A's attention: half B's, which ranks the heads the other way round
    (and moves the ranking over all problems), does not move it."""
    from codi_attn.metrics import head_scores

    scan, attention = _planted_scan()
    a, b = H.split_halves(len(attention), seed=0)
    attention[b] = _planted_scan(seed=1)[1][b][:, ::-1, ::-1]  # B: the heads in reverse order
    def top(att: np.ndarray) -> list[tuple[int, int]]:
        return [(r.layer, r.head) for r in head_scores(att).sort_values("composite", ascending=False,
                                                                          kind="stable").head(2).itertuples()]

    assert top(attention[a]) != top(attention), "half B must move the all-problem ranking for the test to bite"
    plan = H.plan_held_out(scan, attention, k=2, n_random=3, seed=0)
    assert dict((name, list(heads)) for name, _, heads, _ in plan.sets)["composite top-k"] == top(attention[a])


def test_held_out_measures_every_set_on_half_b_alone(demo):
    """Each held-out set's numbers are those of half B's problems with the set's heads' rows of the output
    projection's weight zeroed (zero ablation at all positions: no hook at all), against a plain run on B; the
    causal set is the top k on half A's scan alone."""
    model, questions, golds, solutions = demo
    scan = HR.scan_heads(model, questions, golds, solutions, kinds=("zero",), positions=("all",), batch_size=8,
                         max_new_tokens=8)
    attention = extract(model, questions, golds, batch_size=8, max_new_tokens=1).attention
    held = HR.held_out(model, questions, golds, solutions, scan, attention, "zero", "all", k=2, n_random=3,
                       n_boot=50, batch_size=8, max_new_tokens=8)
    a, b = held.problems_a, held.problems_b
    assert not set(a) & set(b) and len(a) + len(b) == len(questions)
    on_a = H.causal_order(scan.effects(a, n_boot=0)).head(2)
    assert held.sets.loc[0, "heads"] == " ".join(on_a["label"])
    qs, gs = [questions[i] for i in b], [golds[i] for i in b]
    plain = extract(model, qs, gs, batch_size=8, max_new_tokens=8)
    for row in held.sets.itertuples():
        with zeroed_heads(model, [tuple(int(x) for x in label[1:].split("H")) for label in row.heads.split()]):
            zeroed = extract(model, qs, gs, batch_size=8, max_new_tokens=8)
        assert row.accuracy == zeroed.correct.mean(), row.name
        assert row.delta_accuracy == pytest.approx(zeroed.correct.mean() - plain.correct.mean()), row.name
        same = (zeroed.prediction == plain.prediction) | (np.isnan(zeroed.prediction) & np.isnan(plain.prediction))
        assert row.answers_changed == pytest.approx((~same).mean()), row.name
    assert held.sets["delta_accuracy"].ne(0).any(), "no set changed B's accuracy: the check could not tell"
    for row in held.summary.itertuples():  # percentile: the share of random sets whose drop is smaller (ties half)
        top = held.sets[held.sets["group"] == row.selection]["delta_accuracy"].iloc[0]
        rand = held.sets[held.sets["group"] == f"random ({row.selection})"]["delta_accuracy"]
        smaller = sum(1.0 if d > top else 0.5 if d == top else 0.0 for d in rand) / len(rand)
        assert row.percentile == pytest.approx(100 * smaller) and row.random_mean == pytest.approx(rand.mean())


def test_held_out_groups_joined_in_any_order_equal_one_process(gpt2_model):
    """The flow's held-out tasks: sets ablated in groups (each group with its own half-B baseline; one condition
    per forward), joined in any order, give the one-process test exactly; the join refuses missing, repeated and
    mismatched parts."""
    scan = HR.scan_heads(gpt2_model, QUESTIONS, GOLDS, SOLUTIONS, kinds=("mean",), batch_size=2, max_new_tokens=3)
    attention = extract(gpt2_model, QUESTIONS, GOLDS, max_new_tokens=1).attention
    options = {"batch_size": 2, "max_new_tokens": 3}
    whole = HR.held_out(gpt2_model, QUESTIONS, GOLDS, SOLUTIONS, scan, attention, k=2, n_random=5, n_boot=50,
                       **options)
    plan = H.plan_held_out(scan, attention, k=2, n_random=5)
    groups = plan.groups(3)
    assert len(groups) == 4 and sorted(i for g in groups for i in g) == list(range(len(plan.sets)))
    parts = [HR.held_out_part(gpt2_model, QUESTIONS, GOLDS, SOLUTIONS, plan, g, **options) for g in groups]
    joined = H.join_held_out(plan, parts[::-1], GOLDS, n_boot=50)
    pd.testing.assert_frame_equal(joined.sets, whole.sets, check_exact=True)
    pd.testing.assert_frame_equal(joined.summary, whole.summary, check_exact=True)
    with pytest.raises(ValueError, match="do not cover"):
        H.join_held_out(plan, parts[1:], GOLDS)
    with pytest.raises(ValueError, match="do not cover"):
        H.join_held_out(plan, [*parts, parts[0]], GOLDS)
    for change in ({"base_correct": ~parts[1].base_correct}, {"base_logit_diff": parts[1].base_logit_diff + 1e-6}):
        other = dataclasses.replace(parts[1], **change)
        with pytest.raises(ValueError, match="different baselines"):
            H.join_held_out(plan, [parts[0], other, *parts[2:]], GOLDS)
    foreign = dataclasses.replace(parts[2], heads=parts[1].heads)
    with pytest.raises(ValueError, match="another plan"):
        H.join_held_out(plan, [parts[0], parts[1], foreign, parts[3]], GOLDS)


def _planted_scan(gap: float = 0.8, n: int = 40, layers: int = 2, n_heads: int = 3, seed: int = 0):
    """Attention [n, L, H, 6, 6] whose heads attend more to the previous thought the later they are (`gap` between
    the first and the last, per-problem noise 0.03), and a scan whose heads cost more the higher their composite."""
    from codi_attn.metrics import head_scores

    rng = np.random.default_rng(seed)
    attention = np.zeros((n, layers, n_heads, 6, 6), np.float32)
    for l in range(layers):
        for h in range(n_heads):
            strength = 0.1 + gap * (l * n_heads + h) / (layers * n_heads)  # later heads: more to the previous one
            for i, s in enumerate(strength + rng.normal(0, 0.03, n)):  # each problem's own strength
                m = np.tril(np.full((6, 6), (1 - s) / 6))
                m[np.arange(1, 6), np.arange(5)] += s
                attention[i, l, h] = m
    order = head_scores(attention).sort_values(["layer", "head"])["composite"].rank().to_numpy()
    heads = [(l, h) for l in range(layers) for h in range(n_heads)]
    correct = np.array([rng.random(n) > 0.1 * r for r in order])  # higher composite, more answers lost
    logit_diff = np.array([rng.normal(-0.1 * r, 0.01, n) for r in order], np.float32)
    scan = H.HeadScan(heads, ["mean"] * len(heads), ["thoughts"] * len(heads), np.ones(n, bool), np.zeros(n),
                      np.zeros(n), correct, np.zeros((len(heads), n)), np.zeros((len(heads), n), np.float32),
                      logit_diff)
    return scan, attention


def test_correlation_intervals_resample_metrics_and_effects_together():
    """Each resample recomputes both the heads' attention metrics and their effects on the same problems: the
    interval equals a by-hand loop doing so (scipy's Spearman), not one with the metrics held at their point (heads
    close enough that resamples reorder them)."""
    from scipy.stats import spearmanr

    scan, attention = _planted_scan(gap=0.05)
    n = len(attention)
    corr = H.metric_correlations(scan, attention, None, n_boot=40, seed=5).set_index(["metric", "effect"])
    rng, draws = np.random.default_rng(5), []
    for _ in range(40):
        idx = rng.integers(0, n, n)
        flow = H.head_metrics(attention[idx], None)["flow"].to_numpy()
        drop = -np.nanmean(scan.logit_diff[:, idx] - scan.base_logit_diff[idx], axis=1)
        draws.append(spearmanr(flow, drop).statistic)
    np.testing.assert_allclose(corr.loc[("flow", "logit-diff drop"), ["ci_low", "ci_high"]].astype(float),
                               np.percentile(draws, [2.5, 97.5]), atol=1e-12)


def test_correlations_find_a_planted_relation():
    """Heads whose ablation costs more have a higher composite by construction: Spearman 1 on both effects."""
    scan, attention = _planted_scan()
    n, heads, base, correct, logit_diff = len(attention), scan.heads, scan.base_correct, scan.correct, scan.logit_diff
    corr = H.metric_correlations(scan, attention, None, n_boot=30).set_index(["metric", "effect"])
    assert corr.loc[("composite", "logit-diff drop"), "spearman"] == pytest.approx(1.0)
    assert corr.loc[("composite", "accuracy drop"), "spearman"] > 0.8
    assert set(corr.index.get_level_values(0)) == set(H.METRICS)
    # a scan of some heads only (--head_scan top:M), in any order: the correlations are over those heads
    from scipy.stats import spearmanr

    some = [4, 0, 5, 1]
    part = H.HeadScan([heads[c] for c in some], ["mean"] * 4, ["thoughts"] * 4, base, np.zeros(n), np.zeros(n),
                      correct[some], np.zeros((4, n)), np.zeros((4, n), np.float32), logit_diff[some])
    corr = H.metric_correlations(part, attention, None, n_boot=30).set_index(["metric", "effect"])
    metrics = H.head_metrics(attention, None).set_index(["layer", "head"]).loc[[heads[c] for c in some]]
    for m in H.METRICS:
        expected = spearmanr(metrics[m], 1 - correct[some].mean(1)).statistic
        assert corr.loc[(m, "accuracy drop"), "spearman"] == pytest.approx(expected), m
        assert corr.loc[(m, "accuracy drop"), "n_heads"] == 4
    unseen = dataclasses.replace(scan, logit_diff=np.where(np.arange(6)[:, None] == 2, np.nan, logit_diff))
    corr = H.metric_correlations(unseen, attention, None, n_boot=30).set_index(["metric", "effect"])
    seen = [0, 1, 3, 4, 5]  # head 2 compared on no problem: the logit-diff correlations are over the other five
    metrics = H.head_metrics(attention, None)
    for m in H.METRICS:
        expected = spearmanr(metrics[m].to_numpy()[seen], -logit_diff[seen].mean(1)).statistic
        assert corr.loc[(m, "logit-diff drop"), "spearman"] == pytest.approx(expected, nan_ok=True), m
        assert corr.loc[(m, "logit-diff drop"), "n_heads"] == 5 and corr.loc[(m, "accuracy drop"), "n_heads"] == 6
    assert corr.loc[("composite", "logit-diff drop"), "spearman"] == pytest.approx(1.0)
    assert not corr[["ci_low", "ci_high"]].isna().any().any()
    report = H.causal_report(part, attention, None, None, None, n_boot=20, seed=3)
    assert len(report.correlations) == 2 * len(H.METRICS) and len(report.head_effects) == 4
    pd.testing.assert_frame_equal(report.correlations, H.metric_correlations(part, attention, None, n_boot=20,
                                                                             seed=3))  # the report's n_boot


def causal(model, problems, scan, ex, kind, positions, n_random, n_boot, batch_size, max_new_tokens):
    """The flow's plan_held_out -> test_held_out groups -> join_heads, in one process: (scan, report)."""
    plan = H.plan_held_out(scan, ex.attention, kind, positions, n_random=n_random)
    parts = [HR.held_out_part(model, QUESTIONS, GOLDS, SOLUTIONS, plan, group, batch_size, max_new_tokens)
             for group in plan.groups(4)]
    return scan, H.causal_analysis(scan, plan, parts, problems, ex.attention, ex.mass, None, kind, positions, n_boot)


def test_report_card_and_figures(gpt2_model):
    from cards.heads_card import heads_card, verdict
    from codi_attn.metrics import head_scores

    problems = [{"question": q, "answer": g, "solution": s} for q, g, s in zip(QUESTIONS, GOLDS, SOLUTIONS)]
    ex = extract(gpt2_model, QUESTIONS, GOLDS, max_new_tokens=3)
    scan = HR.scan_heads(gpt2_model, QUESTIONS, GOLDS, SOLUTIONS, kinds=("mean", "zero"), batch_size=2,
                        max_new_tokens=3)
    scan, report = causal(gpt2_model, problems, scan, ex, "mean", "thoughts", n_random=4, n_boot=50, batch_size=2,
                          max_new_tokens=3)
    assert len(report.head_effects) == 2 * 8 and {"composite", "incoming", "thought_share"} <= set(
        report.head_effects.columns)
    ranked = head_scores(ex.attention)
    lines = verdict(report, ranked)
    assert any("causally critical" in line for line in lines) and any("Spearman" in line for line in lines)
    rendered = [c.render() for c in heads_card(report, ranked)]
    images = [r for r in rendered if r["type"] == "image"]
    assert len(images) == 3 and all(r["src"].startswith("data:image/png") for r in images)
    held_out = next(r["source"] for r in rendered if r["type"] == "markdown" and "## Held out" in r["source"])
    assert "means over all the problems" in held_out and "heads scanned" not in held_out  # every head scanned
    from cards.heads_card import _held_out_selection

    report.settings["kind"] = "zero"
    assert _held_out_selection(report).endswith("B does not enter it.")


def test_causal_comparison_across_models(gpt2_model, llama_model):
    """compare_causal: one row per model with its critical heads, their depth thirds and the held-out result;
    the compare card shows them."""
    from cards.compare_card import causal_comparison_card

    reports = []
    for model in (gpt2_model, llama_model):
        problems = [{"question": q, "answer": g, "solution": s} for q, g, s in zip(QUESTIONS, GOLDS, SOLUTIONS)]
        ex = extract(model, QUESTIONS, GOLDS, max_new_tokens=2)
        scan = HR.scan_heads(model, QUESTIONS, GOLDS, SOLUTIONS, kinds=("zero",), positions=("all",), batch_size=4,
                            max_new_tokens=2)
        reports.append(causal(model, problems, scan, ex, "zero", "all", n_random=3, n_boot=20, batch_size=4,
                              max_new_tokens=2)[1])
    df = H.compare_causal(reports, ("gpt2", "llama"))
    assert list(df["model"]) == ["gpt2", "llama"]
    for report, row in zip(reports, df.itertuples()):
        critical = report.critical()
        assert row.critical == len(critical) and row.critical_heads == " ".join(critical["label"])
        assert row.critical_early + row.critical_middle + row.critical_late == row.critical
    assert causal_comparison_card(df)[1].render()["type"] == "table"


def test_a_top_m_scan_reports_on_its_heads(unpacked_models):
    """--head_scan top:3: attribution picks three heads, the exact scan ablates those, and the held-out test, the
    correlations (over the three heads) and the card are made from them."""
    from cards.heads_card import heads_card
    from codi_attn.metrics import head_scores

    model = unpacked_models["gpt2"]
    problems = [{"question": q, "answer": g, "solution": s} for q, g, s in zip(QUESTIONS, GOLDS, SOLUTIONS)]
    estimates, groups = HR.plan_scan(model, problems, ("mean",), ("thoughts",), ("top", 3), 2, 2, 3)
    heads = [h for g in groups for h in g]
    first = estimates.sort_values(["estimate", "label"], kind="stable").head(3)
    assert heads == [(int(r.layer), int(r.head)) for r in first.itertuples()] and [len(g) for g in groups] == [2, 1]
    scan = H.merge_scans([HR.scan_heads(model, QUESTIONS, GOLDS, SOLUTIONS, g, batch_size=2, max_new_tokens=3)
                          for g in groups])
    ex = extract(model, QUESTIONS, GOLDS, max_new_tokens=3)
    _, report = causal(model, problems, scan, ex, "mean", "thoughts", n_random=3, n_boot=20, batch_size=2,
                       max_new_tokens=3)
    assert sorted(zip(report.head_effects["layer"], report.head_effects["head"])) == sorted(heads)
    corr = report.correlations
    compared = int((~np.isnan(scan.logit_diff)).any(1).sum())  # heads with a logit-difference drop
    assert (corr.loc[corr["effect"] == "accuracy drop", "n_heads"] == 3).all() and len(corr) == 2 * len(H.METRICS)
    assert (corr.loc[corr["effect"] == "logit-diff drop", "n_heads"] == compared).all()
    assert set(report.held_out.summary["selection"]) == {"causal", "composite"}
    rendered = [c.render() for c in heads_card(report, head_scores(ex.attention))]
    assert any(r["type"] == "image" for r in rendered)
    held_out = next(r["source"] for r in rendered if r["type"] == "markdown" and "## Held out" in r["source"])
    assert "attribution patching on all the problems chose the heads scanned" in held_out  # B's way into it
    assert "means over all the problems" in held_out
    n = model.n_layers * model.n_heads
    verdict_md = next(r["source"] for r in rendered if r["type"] == "markdown" and "causally critical" in r["source"])
    assert f"rate over the model's {n} heads, {n - 3} of them not scanned and counted with p = 1" in verdict_md
    p = report.head_effects["p_value"].to_numpy()
    np.testing.assert_allclose(report.head_effects["q_value"], bh_by_hand(p, n), rtol=1e-12)


def test_attribution_estimates_sit_on_the_thought_rows_only():
    """Attribution is made at the six thoughts: its estimate stands beside the scan's thought-position effects and
    is missing (nan) beside the all-position ones."""
    rng = np.random.default_rng(1)
    n, heads = 20, [(0, 0), (0, 1)]
    attention = rng.dirichlet(np.ones(6), (n, 1, 2, 6)).astype(np.float32)
    scan = H.HeadScan(heads * 2, ["mean"] * 4, ["thoughts", "thoughts", "all", "all"], np.ones(n, bool), np.zeros(n),
                      np.zeros(n), rng.random((4, n)) > 0.3, np.zeros((4, n)), np.zeros((4, n), np.float32),
                      np.zeros((4, n), np.float32))
    estimates = pd.DataFrame({"layer": [0, 0], "head": [0, 1], "label": ["L0H0", "L0H1"], "kind": ["mean"] * 2,
                              "estimate": [-0.5, 0.25]})
    effects = H.causal_report(scan, attention, None, estimates, None, n_boot=10).head_effects
    by = effects.set_index(["positions", "label"])["estimate"]
    assert by[("thoughts", "L0H0")] == -0.5 and by[("thoughts", "L0H1")] == 0.25
    assert by.loc["all"].isna().all() and len(effects) == 4
