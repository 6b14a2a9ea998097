"""Patching (codi_attn.patching, run by codi_attn.patching_run): pairs change exactly one number with the gold
recomputed; patching nothing recovers 0 and patching everything 1; mean patching's bookkeeping."""
from __future__ import annotations

import re
from dataclasses import asdict

import numpy as np
import pytest

from codi_attn import patching as P
from codi_attn import patching_run as PR
from codi_attn.hooks import RecordThoughts
from codi_attn.runner import Runner
from codi_attn.solutions import numbers_in


@pytest.fixture(scope="module")
def demo():
    from codi_attn.data import load_records, sample_problems
    from codi_attn.model import load_codi

    problems = [asdict(p) for p in sample_problems(load_records("synthetic", "test"), 20, seed=42, split="test")]
    return load_codi("demo", device="cpu", dtype="float32"), problems


def test_pairs_change_one_number_and_recompute_the_gold(demo):
    from codi_attn.demo.task import apply_op, chain_of

    model, problems = demo
    pairs = PR.make_pairs(model, problems, synthetic=True)
    assert len(pairs) >= 15
    for pair in pairs:
        clean = problems[pair.index]
        a, b = [v for *_, v in numbers_in(clean["question"])], [v for *_, v in numbers_in(pair.question)]
        assert len(a) == len(b) and sum(x != y for x, y in zip(a, b)) == 1
        start, ops = chain_of({"answer": pair.solution})
        v = start
        for op, operand in ops:
            v = apply_op(v, op, operand)
        assert pair.answer == v != float(clean["answer"])


def test_gsm8k_pairs_recompute_the_chain(gpt2_model, real_gsm8k):
    from codi_attn.data import load_records, sample_problems

    problems = [asdict(p) for p in sample_problems(load_records(str(real_gsm8k), "train"), 30)]
    pairs = PR.make_pairs(gpt2_model, problems, synthetic=False)
    assert pairs
    for pair in pairs:
        clean = problems[pair.index]
        a, b = [v for *_, v in numbers_in(clean["question"])], [v for *_, v in numbers_in(pair.question)]
        assert sum(x != y for x, y in zip(a, b)) == 1 and pair.answer != float(clean["answer"].replace(",", ""))
        # the corrupted solution is a consistent chain: every calculator annotation recomputed by Python's own
        # arithmetic (to the 6 significant digits it is written with), and its final answer is the pair's
        steps = re.findall(r"<<([^=<>]+)=([^<>]+)>>", pair.solution)
        assert steps
        for expression, result in steps:
            assert eval(expression.replace(",", ""), {}) == pytest.approx(float(result.replace(",", "")), rel=1e-5)
        assert float(pair.solution.split("####")[-1].strip().replace(",", "")) == pytest.approx(pair.answer, rel=1e-5)


def test_patching_nothing_gives_0_and_everything_gives_1(demo):
    model, problems = demo
    pairs = PR.make_pairs(model, problems, synthetic=True)

    def extra(corrupted):
        clean = [problems[p.index]["question"] for p in pairs]
        return [("nothing", []), ("everything", [PR.PatchEmbeddings(model, clean)])]

    table, facts = PR.pair_patching(model, problems, pairs, batch_size=8, max_new_tokens=8, n_boot=50, extra=extra)
    rows = table.set_index("thought")
    assert facts["valid"] > 6
    assert rows.loc["nothing", "recovery"] == 0.0 and rows.loc["nothing", "answers_clean"] < 0.5
    assert rows.loc["everything", "recovery"] == pytest.approx(1.0, abs=1e-4)
    assert rows.loc["everything", "answers_clean"] == 1.0
    assert len(table) == 6 * model.n_layers + 6 + 2


def _demo_step_values(problems: list[dict], step: int) -> list[int | None]:
    """Step `step`'s value per problem, from the demo task's chain (not from codi_attn.solutions)."""
    from codi_attn.demo.task import apply_op, chain_of

    out = []
    for p in problems:
        v, ops = chain_of({"answer": p["solution"]})
        for op, b in ops[:step]:
            v = apply_op(v, op, b)
        out.append(v if len(ops) >= step else None)
    return out


def test_mean_patching_bookkeeping(demo, monkeypatch):
    """Every patched run feeds thought k (and no earlier one) the mean thought k of the donors that the demo chain
    gives (same value; or the most frequent other value, ties by first occurrence), at least MIN_PATCHED problems
    each; the table's accuracy, same-problem baseline and counterfactual share are those of the runs' answers on
    those problems, the counterfactual the chain's later operations applied to the donors' value."""
    from collections import Counter

    from codi_attn.answers import correctness
    from codi_attn.demo.task import apply_op, chain_of

    model, problems = demo
    thoughts = RecordThoughts(len(problems))
    gen = Runner(model, 8, 8).run([p["question"] for p in problems], [thoughts])
    golds = [p["answer"] for p in problems]
    baseline = correctness(gen.prediction, golds)
    fed, runs, original = [], [], Runner.run_conditions

    def recording(self, questions, conditions, *args):
        recorders = [RecordThoughts(len(questions)) for _ in conditions]
        fed.extend(recorders)
        runs.extend(original(self, questions, [[*c, r] for c, r in zip(conditions, recorders)], *args))
        return runs[-len(conditions):]

    monkeypatch.setattr(Runner, "run_conditions", recording)
    table = PR.mean_patching(model, problems, thoughts.z, baseline, synthetic=True, batch_size=8, max_new_tokens=8,
                             n_boot=50, max_steps=2, min_share=0.0, stack=4)
    patches = P.mean_patches(problems, True, max_steps=2, min_share=0.0)
    assert len(table) == len(patches) == len(fed) and {(p.step, p.kind) for p in patches} == {
        (s, k) for s in (1, 2) for k in ("same", "different")}
    for patch, row, z, run in zip(patches, table.itertuples(), fed, runs):
        assert (row.thought, row.step, row.kind) == (f"z{patch.thought}", patch.step, patch.kind)
        values = _demo_step_values(problems, patch.step)
        count = Counter(v for v in values if v is not None)
        first = {v: values.index(v) for v in count}
        ranked = sorted(count, key=lambda v: (-count[v], first[v]))
        k, used, target = patch.thought - 1, [], {}
        for i, v in enumerate(values):
            if patch.kind == "same":
                donors = [j for j, w in enumerate(values) if w == v and j != i]
            else:
                other = next(w for w in ranked if w != v)
                donors = [j for j, w in enumerate(values) if w == other]
                _, ops = chain_of({"answer": problems[i]["solution"]})
                target[i] = other
                for op, b in ops[patch.step:]:
                    target[i] = apply_op(target[i], op, b)
            expected = thoughts.z[donors, k].mean(0) if donors else thoughts.z[i, k]
            np.testing.assert_allclose(z.z[i, k], expected, atol=1e-5)
            np.testing.assert_allclose(z.z[i, :k], thoughts.z[i, :k], atol=1e-4)  # nothing earlier is fed
            if donors:
                used.append(i)
                assert np.abs(z.z[i, k] - thoughts.z[i, k]).max() > 1e-3  # really replaced
        assert row.n == len(used) >= P.MIN_PATCHED
        ok = correctness(run.prediction, golds)[used]
        assert row.accuracy == pytest.approx(ok.mean())
        assert row.baseline_accuracy == pytest.approx(baseline[used].mean())
        assert row.change == pytest.approx(ok.mean() - baseline[used].mean())
        if patch.kind == "different":
            moved = [run.prediction[i] == target[i] for i in used]
            assert row.counterfactual == pytest.approx(np.mean(moved))
        else:
            assert np.isnan(row.counterfactual)


# GSM8K-style problems whose step 3 is a side calculation that the gold (step 2's value) does not read
SIDE_A = [4] * 6 + [5] * 5 + [7]


def _side_problems() -> list[dict]:
    return [{"question": f"Tom has {a} boxes of 3 pens and 5 more pens. Ann has 50 pens. How many pens does Tom have?",
             "solution": f"<<{a}*3={3 * a}>>\n<<{3 * a}+5={3 * a + 5}>>\n<<50-{3 * a + 5}={45 - 3 * a}>>\n"
                         f"#### {3 * a + 5}", "answer": str(3 * a + 5)} for a in SIDE_A]


def test_different_leaves_out_problems_whose_counterfactual_is_the_gold():
    """A step that does not feed the gold has a counterfactual equal to it: no donors there (a problem that stays
    correct would read as moved), and no `different` patch of that step; a step that feeds it keeps its donors."""
    problems = _side_problems()
    side = P.donors(problems, 3, "different", synthetic=False)
    assert not side.used.any() and np.isnan(side.target).all()
    fed = P.donors(problems, 1, "different", synthetic=False)
    other = {4: 5, 5: 4, 7: 4}  # the most frequent other value of a (step 1 = 3a)
    assert fed.used.all() and list(fed.target) == [3 * other[a] + 5 for a in SIDE_A]
    assert fed.donors[0] == [i for i, a in enumerate(SIDE_A) if a == 5]
    planned = {(p.step, p.kind) for p in P.mean_patches(problems, False, max_steps=3, min_share=0.0)}
    assert planned == {(1, "same"), (1, "different"), (2, "same"), (2, "different"), (3, "same")}


def test_mean_table_compares_with_the_same_problems_unpatched():
    """Each row's baseline is the unpatched accuracy of the problems patched (the a = 7 problem has no same-value
    donor), not the sample's; the change's interval is paired: answers as right as unpatched give exactly [0, 0]."""
    problems = _side_problems()
    golds = np.array([3.0 * a + 5 for a in SIDE_A])
    baseline = np.array([True] * 6 + [False] * 5 + [True])  # 7 of 12; 6 of the 11 with a same-value donor
    same_prediction = golds.copy()
    same_prediction[0] = -1.0
    cf = P.donors(problems, 1, "different", synthetic=False).target
    different_prediction = np.where(baseline, golds, cf)  # right where the baseline is, else at the counterfactual
    patches = [P.MeanPatch(2, 1, "same"), P.MeanPatch(2, 1, "different")]
    table = P.mean_table(problems, patches, [same_prediction, different_prediction], baseline, False, n_boot=200)
    same, different = table.iloc[0], table.iloc[1]
    assert same.n == 11 and same.accuracy == pytest.approx(10 / 11) and same.baseline_accuracy == pytest.approx(6 / 11)
    assert same.change == pytest.approx(4 / 11) and same.change_low <= 4 / 11 <= same.change_high
    assert different.n == 12 and different.accuracy == different.baseline_accuracy == pytest.approx(7 / 12)
    assert different.change == different.change_low == different.change_high == 0.0
    assert different.counterfactual == pytest.approx(5 / 12) and different.ci_high > different.ci_low


def _pair_baseline() -> P.PairBaseline:
    """Six hand-made pairs: pair 4 does not count (both runs' answer tokens equal, say) and has extreme logit
    differences and the clean answer, so that counting it would move every figure."""
    return P.PairBaseline(corrupted=[f"q{i}" for i in range(6)],
                          valid=np.array([True, True, True, True, False, True]),
                          ld_clean=np.array([4.0, 6.0, 2.0, 5.0, 100.0, 3.0]),
                          ld_corrupted=np.array([-2.0, 0.0, -1.0, 1.0, -50.0, -3.0]),
                          clean_prediction=np.array([10.0, 20.0, 30.0, 40.0, 50.0, 60.0]))


def test_pair_table_counts_only_valid_pairs_with_a_logit_difference():
    """recovery and n read the pairs that count and have a patched LD (not the invalid pair, not the nan one);
    answers_clean is the share over the pairs that count (the nan-LD pair included, the invalid one not)."""
    base = _pair_baseline()
    ld = np.array([1.0, 3.0, np.nan, 2.0, 90.0, 0.0])  # pair 2: no LD in this condition
    prediction = np.array([10.0, 21.0, 30.0, np.nan, 50.0, 61.0])  # clean answer at pairs 0, 2 (and invalid 4)
    row = P.pair_table([("z1", "0")], [(ld, prediction)], base, n_boot=50).iloc[0]
    # pairs 0, 1, 3, 5: mean LD 6/4, mean corrupted -4/4, mean clean 18/4
    assert row.n == 4
    assert row.recovery == pytest.approx((6 / 4 + 1) / (18 / 4 + 1))  # 5/11
    assert row.ci_low <= row.recovery <= row.ci_high
    assert row.answers_clean == pytest.approx(2 / 5)  # of pairs 0, 1, 2, 3, 5


def test_pair_table_bootstrap_recomputes_the_span_per_resample():
    """Each bootstrap draw normalises by its own resample's clean - corrupted span: a condition at the clean LD
    on every pair recovers exactly 1 in every draw ([1, 1]); the intervals are those of a by-hand bootstrap
    with the same draws (one default_rng(seed), rng.integers(0, n, n) per draw, rows in table order)."""
    base = _pair_baseline()
    partial = np.array([1.0, 3.0, np.nan, 2.0, 90.0, 0.0])
    full = base.ld_clean.copy()
    prediction = base.clean_prediction.copy()
    n_boot, seed = 80, 3
    table = P.pair_table([("z1", "0"), ("z2", "0")], [(partial, prediction), (full, prediction)], base,
                         n_boot=n_boot, seed=seed)
    assert table.iloc[1].recovery == pytest.approx(1.0)
    assert table.iloc[1].ci_low == pytest.approx(1.0) and table.iloc[1].ci_high == pytest.approx(1.0)
    rng = np.random.default_rng(seed)
    for row, ld in zip(table.itertuples(), (partial, full)):
        use = base.valid & ~np.isnan(ld)
        x, c, k = ld[use], base.ld_clean[use], base.ld_corrupted[use]
        draws = []
        for _ in range(n_boot):
            idx = rng.integers(0, len(x), len(x))
            draws.append((x[idx].mean() - k[idx].mean()) / (c[idx].mean() - k[idx].mean()))
        lo, hi = np.percentile(draws, [2.5, 97.5])
        assert (row.ci_low, row.ci_high) == (pytest.approx(lo), pytest.approx(hi))


def test_a_pair_whose_answer_tokens_are_equal_does_not_count(demo):
    """A pair counts only where the clean and the corrupted run give different answer tokens: a 'pair' whose
    corrupted question is the clean one (both runs alike, both with an answer token) does not count, and its
    logit differences are 0; the genuine pairs count exactly where their answer tokens differ."""
    model, problems = demo
    pairs = PR.make_pairs(model, problems, synthetic=True)[:6]
    clean = problems[pairs[0].index]
    itself = P.Pair(pairs[0].index, clean["question"], clean["solution"], float(clean["answer"]), (0.0, 0.0))
    runs = PR.pair_runs(model, problems, [*pairs, itself], batch_size=8, max_new_tokens=8)
    assert runs.corrupted_step[-1] >= 0  # the run has an answer token: only the equal tokens rule it out
    assert runs.answer_clean[-1] == runs.answer_corrupted[-1]
    assert not runs.baseline.valid[-1]
    assert runs.baseline.ld_clean[-1] == runs.baseline.ld_corrupted[-1] == 0.0
    genuine = runs.baseline.valid[:-1]
    assert genuine.any()
    np.testing.assert_array_equal(genuine, runs.answer_clean[:-1] != runs.answer_corrupted[:-1])
    assert runs.baseline.facts()["valid"] == genuine.sum()
