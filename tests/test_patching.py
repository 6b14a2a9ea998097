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


def test_mean_patching_bookkeeping(demo):
    """Rows per (thought, step, kind); the counterfactual is the chain recomputed from the donors' value; the
    same-value mean of a single donor group leaves the donors' value in place."""
    model, problems = demo
    thoughts = RecordThoughts(len(problems))
    Runner(model, 8, 8).run([p["question"] for p in problems], [thoughts])
    table = PR.mean_patching(model, problems, thoughts.z, synthetic=True, batch_size=8, max_new_tokens=8, n_boot=50,
                            max_steps=2, min_share=0.0, stack=4)
    assert set(table["kind"]) == {"same", "different"} and set(table["step"]) <= {1, 2}
    assert table["accuracy"].between(0, 1).all() and table[table["kind"] == "different"]["counterfactual"].notna().all()
    record = {"answer": problems[0]["solution"]}
    from codi_attn.demo.task import answer_if

    assert P.counterfactual_answer(problems[0], 1, 5, True) == answer_if(record, 1, 5)


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
