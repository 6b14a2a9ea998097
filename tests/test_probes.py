"""Probes (codi_attn.probes): a planted linear feature is recovered and the controls stay at chance; the stacked fit
is the per-target RidgeClassifier; the targets read the solution."""
from __future__ import annotations

import numpy as np
import pandas as pd

from codi_attn.contents import best_probes
from codi_attn.probes import POSITIONS, control_labels, cross_validated, run_probes, targets


def planted(n: int = 120, d: int = 16, layers: int = 3, seed: int = 0):
    """Residuals [n, 7, L, d] of noise, except that at z3 layer 1 the value of step 1 (5 classes) is written along
    one direction each; solutions and questions to match (the first number: a surface feature unrelated to it)."""
    rng = np.random.default_rng(seed)
    values = rng.integers(0, 5, n)
    resid = rng.normal(size=(n, len(POSITIONS), layers, d)).astype(np.float32)
    directions = rng.normal(size=(5, d)) * 3
    resid[:, POSITIONS.index("z3"), 1] += directions[values]
    solutions = [f"<<{v}+0={v}>>\n#### {v}" for v in values]
    questions = [f"Tom has {rng.integers(1, 30)} apples." for _ in range(n)]
    return resid, solutions, questions


def test_probes_recover_a_planted_feature_and_controls_stay_at_chance():
    resid, solutions, questions = planted()
    df = run_probes(resid, solutions, questions, n_boot=100).set_index(["target", "position", "layer"])
    hit = df.loc[("step 1", "z3", 1)]
    assert hit["accuracy"] > 0.9 and hit["ci_low"] > hit["control"] and hit["selectivity"] > 0.5
    elsewhere = df.loc["step 1"].drop(index=("z3", 1))
    assert (elsewhere["accuracy"] < 0.45).all()  # 5 classes: ~0.2 by chance
    assert (df.loc["step 1"]["permuted"] < 0.45).all() and hit["control"] < 0.6
    assert set(df.index.get_level_values("target")) == {"step 1", "answer"}  # op 1 is always +: one class, skipped
    assert (df["n"] == 120).all()
    best = best_probes(df.reset_index()).set_index("target").loc["step 1"]  # chosen on half A, judged on half B
    assert (best["position"], best["layer"], best["n_b"]) == ("z3", 1, 60) and best["decodable"]
    assert best["accuracy_b"] > 0.8 and best["ci_low_b"] > max(best["control_b"], best["majority_b"])


def test_the_halves_do_not_move_with_n_boot_or_the_layers():
    """Two groups of targets (step 2 only where a solution has two steps): every group's halves, and so the scores on
    A and B, are the same whatever --n_boot and however many layers come before."""
    resid, solutions, questions = planted(n=80)
    solutions = [s.replace("\n", f"\n<<{k % 3}+1={k % 3 + 1}>>\n") if k % 2 else s for k, s in enumerate(solutions)]
    df = run_probes(resid, solutions, questions, n_boot=100)
    assert set(df.loc[df["target"] == "step 2", "n"]) == {40} and set(df.loc[df["target"] == "step 1", "n"]) == {80}
    other = run_probes(resid[:, :, :2], solutions, questions, n_boot=30)
    same = ["target", "position", "layer", "n_b", "selectivity_a", "accuracy_b", "control_b", "permuted_b"]
    pd.testing.assert_frame_equal(other[same], df[df["layer"] < 2][same].reset_index(drop=True))


def test_stacked_fit_equals_ridge_classifier_per_target():
    """cross_validated fits all label sets at once; each set's predictions equal RidgeClassifier's on it alone."""
    from sklearn.linear_model import RidgeClassifier
    from sklearn.model_selection import KFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    rng = np.random.default_rng(1)
    x = rng.normal(size=(60, 10))
    sets = [rng.integers(0, k, 60).astype(str) for k in (2, 3, 7)]
    sets[2][:3] = "rare"  # a class absent from some training folds
    folds = list(KFold(5, shuffle=True, random_state=0).split(x))
    got = cross_validated(x, sets, folds)
    for y, correct in zip(sets, got):
        expected = np.zeros(len(y), bool)
        for train, test in folds:
            clf = make_pipeline(StandardScaler(), RidgeClassifier(alpha=1.0)).fit(x[train], y[train])
            expected[test] = clf.predict(x[test]) == y[test]
        np.testing.assert_array_equal(correct, expected)


def test_control_labels_are_fixed_per_feature_value_with_the_targets_classes():
    rng = np.random.default_rng(0)
    labels = np.array(list("aabbbcc") * 10)
    feature = np.array([i % 4 for i in range(70)], dtype=object)
    control = control_labels(labels, feature, rng)
    assert set(control) <= set(labels)
    for value in range(4):
        assert len(set(control[feature == value])) == 1


def test_targets_read_the_solution():
    """`answer` is the gold after '####': not the last step where that is a side calculation, and there where a
    solution has no step."""
    t = targets(["<<2+3=5>>\n<<5*2=10>>\n#### 10", "<<4-1=3>>\n<<3*7=21>>\n<<21-20=1>>\n#### 21", "#### 1,200"],
                max_steps=2)
    assert list(t["step 1"]) == [5.0, 3.0, None] and list(t["step 2"]) == [10.0, 21.0, None]
    assert list(t["answer"]) == [10.0, 21.0, 1200.0] and list(t["op 2"]) == ["*", "*", None]


def test_majority_b_is_the_majority_share_of_half_b():
    """majority_b is the most frequent label's share among half B's problems (the first n // 2 of
    default_rng([seed, 1]).permutation(n)), not among all problems: labels skewed so the two differ."""
    n, seed = 40, 0
    half_b = np.zeros(n, bool)
    half_b[np.random.default_rng([seed, 1]).permutation(n)[: n // 2]] = True
    values = np.full(n, 1)
    values[np.flatnonzero(half_b)[:12]] = 2  # half B: 12 twos, 8 ones (0.6); all: 28 ones of 40 (0.7)
    rng = np.random.default_rng(5)
    resid = rng.normal(size=(n, len(POSITIONS), 1, 4)).astype(np.float32)
    solutions = [f"<<{v}+0={v}>>\n#### {v}" for v in values]
    questions = [f"Tom has {rng.integers(1, 30)} apples." for _ in range(n)]
    df = run_probes(resid, solutions, questions, n_boot=10, seed=seed)
    assert set(df["target"]) == {"step 1", "answer"} and (df["n_b"] == n // 2).all()
    assert np.allclose(df["majority"], 28 / 40) and np.allclose(df["majority_b"], 12 / 20)
