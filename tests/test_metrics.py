"""codi_attn.metrics: known answers on synthetic attention, baselines, stability, types, criteria, comparison."""
from __future__ import annotations

import pickle

import numpy as np
import pandas as pd
import pytest

from codi_attn import metrics as M

I, J = np.indices((6, 6))
H6 = sum(1 / k for k in range(1, 7))


def template(kind: str) -> np.ndarray:
    """Renormalised 6x6 pattern (rows sum to 1): sequential, uniform, hub0, hub1, skip, self."""
    t = np.zeros((6, 6))
    if kind == "uniform":
        return (I >= J) / (np.arange(6) + 1.0)[:, None]
    if kind == "sequential":
        t[0, 0] = 1
        t[np.arange(1, 6), np.arange(5)] = 1
    elif kind.startswith("hub"):
        k = int(kind[3:])
        for i in range(6):
            t[i, min(i, k)] = 1
    elif kind == "skip":
        for i in range(6):
            t[i, i - 3 if i >= 3 else i] = 1
    elif kind == "self":
        t[np.arange(6), np.arange(6)] = 1
    else:
        raise ValueError(kind)
    return t


def patterned(kinds, n: int = 40, layers: int = 2, mass: float = 0.12, noise: float = 0.1,
              seed: int = 0) -> np.ndarray:
    """Raw attention [n, layers, len(kinds), 6, 6]: head h follows kinds[h] in every layer, mixed per
    problem with up to `noise` causal-uniform attention; every row carries `mass` of the whole row."""
    rng = np.random.default_rng(seed)
    t = np.stack([template(k) for k in kinds])  # [H, 6, 6]
    e = rng.uniform(0, noise, (n, layers, len(kinds), 1, 1))
    return ((1 - e) * t + e * template("uniform")) * mass


def random_attention(n=30, layers=3, heads=4, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(n, layers, heads, 6, 6)) * 2
    e = np.exp(logits) * (I >= J)
    return e / e.sum(-1, keepdims=True) * rng.uniform(0.05, 0.3, (n, layers, heads, 6, 1))


KNOWN = {  # kind: flow, hub (variance of column sums), hub_position, skip, on renorm
    "sequential": (5 / 6, np.var([2, 1, 1, 1, 1, 0]), 0, 0.0),
    "uniform": ((6 - H6) / 6, np.var([sum(1 / (i + 1) for i in range(j, 6)) for j in range(6)]), 0, 1 / 6),
    "hub0": (5 / 6, np.var([6, 0, 0, 0, 0, 0]), 0, 1 / 3),
    "hub1": (4 / 6, np.var([1, 5, 0, 0, 0, 0]), 1, 1 / 3),
    "skip": (3 / 6, np.var([2, 2, 2, 0, 0, 0]), 0, 1 / 3),
    "self": (0.0, 0.0, 0, 0.0),
}


@pytest.mark.parametrize("kind", list(KNOWN))
def test_design_scores_known_answers(kind):
    a = patterned([kind], noise=0.0)
    flow, hub, pos, skip = KNOWN[kind]
    for basis, scale in (("renorm", 1.0), ("raw", 0.12)):
        s = M.head_scores(a, basis).iloc[0]
        assert s["flow"] == pytest.approx(flow, abs=1e-6)  # a ratio: the same on both bases
        assert s["hub"] == pytest.approx(hub * scale ** 2, abs=1e-6)
        assert s["skip"] == pytest.approx(skip * scale, abs=1e-6)
        assert s["hub_position"] == pos


def test_composite_min_max_over_all_heads_of_the_model():
    """composite = 0.4 flow + 0.4 minmax(hub) + 0.2 minmax(skip), scaled over every head of the model, not per layer."""
    kinds = [["hub0", "uniform"], ["sequential", "self"]]  # layer 0 and layer 1 span different hub and skip ranges
    a = np.broadcast_to(np.array([[template(k) for k in row] for row in kinds]) * 0.1, (5, 2, 2, 6, 6)).copy()
    flow, hub, _, skip = (np.array([[KNOWN[k][q] for k in row] for row in kinds]) for q in range(4))
    mm = lambda x: (x - x.min()) / (x.max() - x.min())
    want = 0.4 * flow + 0.4 * mm(hub) + 0.2 * mm(skip)
    s = M.head_scores(a).set_index("label")["composite"]
    for l in range(2):
        for h in range(2):
            assert s[M.head_label(l, h)] == pytest.approx(want[l, h], abs=1e-6)


def test_row_shares_leave_out_row_z1():
    """self_share and max_entry read rows z2..z6 only: row z1 is [1, 0, ...] on renorm whatever the head does."""
    assert M.self_share(template("sequential")) == 0.0
    assert M.self_share(template("self")) == 1.0
    assert M.self_share(template("uniform")) == pytest.approx(np.mean([1 / k for k in range(2, 7)]), rel=1e-12)
    assert M.max_entry(template("uniform")) == pytest.approx(0.5)  # row z2: [1/2, 1/2]
    assert M.max_entry(0.5 * template("uniform") + 0.5 * template("sequential")) == pytest.approx(0.75)
    r = M.analyze(patterned(["sequential"] * 2, noise=0.0), n_boot=0)
    assert (r.types["self"] == 0).all()
    b = r.baseline.set_index("metric")
    assert b.loc["self", "observed"] == 0
    assert b.loc["self", "baseline"] == pytest.approx(np.mean([1 / k for k in range(2, 7)]))


@pytest.mark.parametrize("kind, expected", [("sequential", "sequential"), ("uniform", "diffuse"),
                                            ("hub0", "hub"), ("hub1", "hub"), ("skip", "long-range"), ("self", "self")])
def test_functional_types(kind, expected):
    r = M.analyze(patterned([kind] * 2), n_boot=0)
    assert set(r.types["type"]) == {expected}


def test_uniform_causal_is_the_baseline():
    r = M.analyze(patterned(["uniform"] * 3), n_boot=20)
    b = r.baseline.set_index("metric")
    for metric in ("flow", "hub", "skip", "seq", "self", "long"):
        assert b.loc[metric, "ratio"] == pytest.approx(1.0, abs=1e-6)
    assert b.loc["row entropy", "observed"] == pytest.approx(1.0, abs=1e-6)
    p = r.position_lift
    assert np.allclose(p.loc[p["rows"] > 0, "lift"], 1.0)
    assert not p["is_hub"].any()
    # trap 7: the design's column sums and hub position favour z1 even here
    assert r.ranked_heads["hub_position"].eq(0).all()
    assert p["colsum"].idxmax() == 0


def test_raw_baseline_uses_observed_row_mass():
    a = patterned(["uniform"], noise=0.0, mass=0.2)
    r = M.analyze(a, basis="raw", n_boot=0)
    b = r.baseline.set_index("metric")
    assert b.loc["skip", "baseline"] == pytest.approx(0.2 / 6)
    assert np.allclose(r.position_lift.query("rows > 0")["lift"], 1.0)


@pytest.mark.parametrize("share, hub", [(0.1, False), (0.6, True)])
def test_hub_claimed_only_above_lift_threshold(share, hub):
    t = (1 - share) * template("uniform") + share * template("hub0")
    a = np.broadcast_to(t * 0.1, (30, 2, 3, 6, 6)).copy()
    a *= np.random.default_rng(0).uniform(0.9, 1.1, (30, 2, 3, 1, 1))
    r = M.analyze(a, n_boot=50)
    z1 = r.position_lift.iloc[0]
    # incoming to z1 counts rows z3..z6 (i >= j + 2); causal-uniform, row i gives each key 1 / (i + 1)
    assert z1["baseline"] == pytest.approx(np.mean([1 / 3, 1 / 4, 1 / 5, 1 / 6]), rel=1e-9)
    assert z1["lift"] == pytest.approx((1 - share) + share / z1["baseline"], rel=1e-6)
    assert bool(z1["is_hub"]) == hub
    assert r.hubs == ([0] if hub else [])


@pytest.mark.parametrize("spread, hub", [(0.4, False), (0.02, True)])
def test_hub_claimed_on_the_lower_end_of_the_lift_interval(spread, hub):
    """A hub is claimed when the lower end of the bootstrap interval of z1's lift reaches 2, not its point lift:
    problems alternate hub0 shares 0.4 -/+ spread, so the point lift is 2.28 on both sides, the interval is not."""
    n, n_boot, seed = 10, 200, 0
    s = np.where(np.arange(n) % 2, 0.4 + spread, 0.4 - spread)
    t = (1 - s)[:, None, None] * template("uniform") + s[:, None, None] * template("hub0")  # [n, 6, 6]
    a = np.broadcast_to((0.1 * t)[:, None, None], (n, 2, 2, 6, 6)).copy()
    r = M.analyze(a, n_boot=n_boot, seed=seed)
    b = np.mean([1 / 3, 1 / 4, 1 / 5, 1 / 6])  # z1's causal-uniform incoming (rows z3..z6)
    per_problem = (1 - s) + s / b  # each problem's lift of z1, the same in every head
    w = np.random.default_rng(seed).multinomial(n, np.full(n, 1 / n), size=n_boot) / n
    lo = np.percentile(w @ per_problem, 2.5)
    z1 = r.position_lift.iloc[0]
    assert z1["lift"] == pytest.approx(per_problem.mean(), rel=1e-6) and z1["lift"] > M.LIFT_THRESHOLD
    assert z1["lift_lo"] == pytest.approx(lo, rel=1e-5)
    assert (lo >= M.LIFT_THRESHOLD) == hub
    assert bool(z1["is_hub"]) == hub and r.hubs == ([0] if hub else [])


def test_raw_lift_interval_resamples_the_baseline():
    """Raw basis: each bootstrap draw's lift divides the resampled incoming attention by the causal-uniform
    incoming of the same resampled row masses (both follow the thought-block mass)."""
    n, n_boot, seed = 20, 100, 2
    a = random_attention(n=n, layers=2, heads=3, seed=4).astype(np.float32).astype(np.float64)
    r = M.analyze(a, basis="raw", n_boot=n_boot, seed=seed)
    w = np.random.default_rng(seed).multinomial(n, np.full(n, 1 / n), size=n_boot) / n
    mb = np.einsum("bn,nlhij->blhij", w, a)
    mass = mb.sum(-1)  # [B, L, H, 6] resampled row masses
    rows = [np.arange(j + 2, 6) for j in range(4)]  # incoming to z1..z4: rows i >= j + 2
    obs = np.stack([mb[..., rows[j], j].mean(-1) for j in range(4)], -1).mean((1, 2))
    base = np.stack([(mass[..., rows[j]] / (rows[j] + 1)).mean(-1) for j in range(4)], -1).mean((1, 2))
    lo, hi = np.percentile(obs / base, [2.5, 97.5], axis=0)
    p = r.position_lift.iloc[:4]
    np.testing.assert_allclose(p["lift_lo"], lo, rtol=1e-5)
    np.testing.assert_allclose(p["lift_hi"], hi, rtol=1e-5)


def test_sequential_attention_lifts_no_position():
    """Attention to the previous thought only is no hub attention: incoming to j leaves out row j + 1, so every
    position's lift is exactly 0."""
    lift = M.analyze(patterned(["sequential"] * 2, noise=0.0), n_boot=0).position_lift
    assert (lift.loc[lift["rows"] > 0, "lift"] == 0).all() and (lift["rows"] > 0).sum() == 4


def test_hub_at_a_late_position_is_not_claimable():
    r = M.analyze(patterned(["sequential"] * 4), n_boot=20)
    assert not r.position_lift["is_hub"].any()
    assert r.position_lift["eligible"].tolist() == [True, True, False, False, False, False]


def test_scores_within_ranges():
    r = M.analyze(random_attention(), n_boot=30)
    for basis, s in r.scores.items():
        assert s["flow"].between(0, 1).all() and s["skip"].between(0, 1).all()
        assert (s["hub"] >= 0).all() and s["hub_position"].between(0, 5).all()
        assert s["composite"].between(0, 1).all()
        assert s["composite"].is_monotonic_decreasing
    st = r.stability
    assert (st.filter(like="_lo").to_numpy() <= st.filter(like="_hi").to_numpy() + 1e-12).all()
    assert st["top6_retention"].between(0, 1).all()
    assert r.types["entropy"].between(0, 1).all()
    assert set(r.rankings) == {f"heads_ranked_by_{s}" for s in ("flow", "hub", "skip", "composite")}
    assert r.rankings["heads_ranked_by_hub"]["hub"].is_monotonic_decreasing


def test_aggregates_invariant_to_head_order():
    a = random_attention(heads=5)
    perm = [3, 0, 4, 1, 2]
    r1, r2 = M.analyze(a, n_boot=40, seed=1), M.analyze(a[:, :, perm], n_boot=40, seed=1)
    pd.testing.assert_frame_equal(r1.position_lift, r2.position_lift, atol=1e-9)
    pd.testing.assert_frame_equal(r1.criteria, r2.criteria, atol=1e-9)
    pd.testing.assert_frame_equal(r1.model_stats, r2.model_stats, atol=1e-9)
    pd.testing.assert_frame_equal(r1.baseline, r2.baseline, atol=1e-9)
    # the same heads, renamed
    rename = {M.head_label(l, h): M.head_label(l, perm.index(h)) for l in range(3) for h in range(5)}
    got = r2.ranked_heads.set_index("label")["composite"]
    want = r1.ranked_heads.set_index(r1.ranked_heads["label"].map(rename))["composite"]
    pd.testing.assert_series_equal(got.sort_index(), want.sort_index(), check_names=False, atol=1e-9)


def test_trap1_signature_is_flagged():
    good = random_attention()
    bad = np.zeros_like(good)
    bad[..., 1:, :] = good[..., :-1, :]  # query at Q+s labelled row s: row 0 empty, no diagonal
    r = M.analyze(bad, n_boot=0)
    assert any("codi-spec trap 1" in w for w in r.warnings)
    assert np.allclose(r.ranked_heads["flow"], 1.0)
    assert not any("trap 1" in w for w in M.input_warnings(good))


@pytest.mark.parametrize("zeroed, phrase", [("diagonal", "the diagonal (self-attention) is zero"),
                                            ("row0", "row 0 (z1's query) is empty")])
def test_trap1_either_signature_alone_is_flagged(zeroed, phrase):
    """The trap-1 warning fires on an empty row z1 alone or a zero diagonal (rows z2..z6) alone, naming which."""
    a = random_attention()
    if zeroed == "diagonal":
        a[..., np.arange(1, 6), np.arange(1, 6)] = 0
    else:
        a[..., 0, :] = 0
    trap = [w for w in M.input_warnings(a) if "codi-spec trap 1" in w]
    other = {"diagonal": "row 0 (z1's query) is empty", "row0": "the diagonal (self-attention) is zero"}[zeroed]
    assert len(trap) == 1 and phrase in trap[0] and other not in trap[0]


@pytest.mark.parametrize("edit, phrase", [
    (lambda a: a.transpose(0, 1, 2, 4, 3), "not causal"),
    (lambda a: M.renormalise(a), "renormalised already"),
    (lambda a: a * 8, "> 1"),
    (lambda a: a[:1], "Only one problem"),
])
def test_input_warnings(edit, phrase):
    assert any(phrase in w for w in M.input_warnings(edit(random_attention())))


def test_mass_checks_and_profile():
    a = random_attention()
    rows = a.sum(-1, keepdims=True)
    mass = np.concatenate([(1 - rows) * 0.5, (1 - rows) * 0.3, (1 - rows) * 0.2, rows], -1)
    r = M.analyze(a, mass=mass, n_boot=10)
    assert r.warnings == []
    assert np.allclose(r.mass_profile[list(M.MASS_PARTS)].sum(axis=1), 1)
    assert "sink mass" in set(r.model_stats["quantity"])
    assert any("disagrees" in w for w in M.input_warnings(a, mass[..., ::-1]))
    with pytest.raises(ValueError):
        M.input_warnings(a, mass[..., :3])


def test_bad_input_raises():
    with pytest.raises(ValueError):
        M.head_scores(np.zeros((2, 1, 1, 5, 5)))
    with pytest.raises(ValueError):
        M.head_scores(np.full((2, 1, 1, 6, 6), np.nan))
    with pytest.raises(ValueError):
        M.head_scores(random_attention(), basis="softmax")


def test_bootstrap_is_seeded_and_optional():
    a = random_attention()
    r1, r2 = M.analyze(a, n_boot=25, seed=3), M.analyze(a, n_boot=25, seed=3)
    np.testing.assert_array_equal(r1.draws, r2.draws)
    assert r1.draws.shape == (25, len(r1.model_stats))
    r0 = M.analyze(a, n_boot=0)
    assert r0.n_boot == 0 and r0.stability["composite_lo"].isna().all()
    assert r0.model_stats["lo"].isna().all()


def test_stability_retention_of_a_clear_winner():
    a = patterned(["hub0", "uniform", "uniform", "uniform"], layers=3, noise=0.3)
    r = M.analyze(a, n_boot=50)
    st = r.stability.set_index("label")
    for l in range(3):
        assert st.loc[f"L{l}H0", "top6_retention"] == 1.0
    assert 0 <= r.mean_std < 0.2


def test_report_pickles():
    r = M.analyze(random_attention(), n_boot=10, name="x")
    r2 = pickle.loads(pickle.dumps(r))
    pd.testing.assert_frame_equal(r.ranked_heads, r2.ranked_heads)
    assert r2.name == "x" and r2.high_composite_heads.equals(r.high_composite_heads)


def test_mass_parts_match_the_extractor():
    from codi_attn import extract

    assert M.MASS_PARTS == extract.MASS_PARTS


# ---------------------------------------------------------------- criteria

EPS = 1e-3
THRESHOLDS = {key: (threshold, op) for key, _, _, threshold, op in M.CRITERIA}


@pytest.mark.parametrize("key", list(THRESHOLDS))
def test_criteria_both_sides_of_each_threshold(key):
    threshold, op = THRESHOLDS[key]
    step = 1 if key == "top_types" else EPS
    good, bad = (threshold - step, threshold + step) if op == "<" else (threshold + step, threshold - step)
    for value, passed in ((good, True), (bad, False)):
        row = M.criteria_table({key: value}).set_index("key").loc[key]
        assert row["passed"] == passed and row["measured"] == value
    if op == ">=":
        assert M.criteria_table({key: threshold}).set_index("key").loc[key, "passed"]
    if op in (">", "<"):
        assert not M.criteria_table({key: threshold}).set_index("key").loc[key, "passed"]


def test_criteria_unmeasured_and_baseline():
    c = M.criteria_table({}, {"max_hub": 0.5}, n_heads=16).set_index("key")
    assert not c["passed"].any()
    assert c.loc["max_hub", "baseline_passes"]
    assert pd.isna(c.loc["mean_std", "baseline_passes"])
    assert "top-8" in c.loc["top_bottom_ratio", "criterion"] and "bottom-8" in c.loc["top_bottom_ratio", "criterion"]


@pytest.mark.parametrize("strong, passed", [(2, True), (1, False)])
def test_strong_heads_measured(strong, passed):
    """Raw basis: 20 heads, `strong` of them put 0.9 of their row on one key, the rest 0.1 spread."""
    kinds = ["sequential"] * strong + ["uniform"] * (20 - strong)
    a = patterned(kinds, layers=1, noise=0.0, mass=0.1)
    a[:, :, :strong] *= 9
    c = M.analyze(a, basis="raw", n_boot=0).criteria.set_index("key")
    assert c.loc["strong_heads", "measured"] == pytest.approx(strong / 20)
    assert c.loc["strong_heads", "passed"] == passed
    assert c.loc["strong_heads", "baseline"] == pytest.approx(strong / 20)  # 0.9 / 2 > 0.4 in row z2


def test_strong_heads_ignore_row_z1():
    """Raw basis: row z1 puts 0.9 on z1 but rows z2..z6 only 0.1 spread evenly, so no head is strong (nor in the
    causal-uniform baseline, which has the same row masses)."""
    a = patterned(["uniform"] * 4, layers=1, noise=0.0, mass=0.1)
    a[..., 0, 0] = 0.9
    r = M.analyze(a, basis="raw", n_boot=0)
    c = r.criteria.set_index("key")
    assert c.loc["strong_heads", "measured"] == 0 and c.loc["strong_heads", "baseline"] == 0
    assert r.baseline.set_index("metric").loc["max entry (z2..z6)", "observed"] == pytest.approx(0.05)


@pytest.mark.parametrize("flip, passed", [(0.0, True), (1.0, False)])
def test_mean_std_measured(flip, passed):
    """Problems alternate between the sequential and the self pattern: std up to 0.5 per entry."""
    a = patterned(["sequential"] * 4, n=40, noise=0.0)
    a[::2] = (1 - flip) * a[::2] + flip * patterned(["self"] * 4, n=20, noise=0.0)
    c = M.analyze(a, n_boot=0).criteria.set_index("key")
    assert c.loc["mean_std", "passed"] == passed


def test_mean_std_by_hand():
    """mean_std: std across problems of each renorm entry, averaged over the 20 causal entries of rows z2..z6 per
    head, then over heads (row z1 is constant on renorm and left out)."""
    a = random_attention(n=12, layers=2, heads=3, seed=7).astype(np.float32).astype(np.float64)
    r = M.analyze(a, n_boot=0)
    sd = (a / a.sum(-1, keepdims=True)).std(0)  # [L, H, 6, 6]
    entries = [(i, j) for i in range(1, 6) for j in range(i + 1)]
    per_head = np.mean([sd[..., i, j] for i, j in entries], axis=0)  # [L, H]
    assert len(entries) == 20
    assert r.mean_std == pytest.approx(per_head.mean(), rel=1e-5)
    st = r.stability.set_index("label")["mean_std"]
    for l in range(2):
        for h in range(3):
            assert st[M.head_label(l, h)] == pytest.approx(per_head[l, h], rel=1e-5)
    assert r.criteria.set_index("key").loc["mean_std", "measured"] == pytest.approx(per_head.mean(), rel=1e-5)


@pytest.mark.parametrize("kinds, n_types", [(["sequential"] * 4, 1), (["sequential", "self", "skip", "hub0"], 2)])
def test_types_in_top_measured(kinds, n_types):
    """8 heads, top 4: hub0 (composite 0.93) and skip (0.48) heads outrank sequential (0.36) and self."""
    c = M.analyze(patterned(kinds, layers=2), n_boot=0).criteria.set_index("key")
    assert c.loc["top_types", "measured"] == n_types
    assert c.loc["top_types", "passed"] == (n_types > 1)


def test_failed_criteria_are_rows_not_errors():
    c = M.analyze(patterned(["uniform"] * 4), n_boot=10).criteria
    assert len(c) == len(M.CRITERIA) and c["passed"].dtype == bool
    assert not c.set_index("key").loc["top_types", "passed"]


# ---------------------------------------------------------------- comparison


def test_compare_different_shapes():
    a = M.analyze(patterned(["hub0", "hub0", "uniform", "sequential"], layers=4, noise=0.3), n_boot=60, seed=1)
    b = M.analyze(patterned(["uniform"] * 6 + ["sequential"] * 2, layers=6, noise=0.3, seed=2), n_boot=60, seed=2)
    df = M.compare_reports(a, b, ("gpt2", "llama"))
    assert df.attrs["names"] == ("gpt2", "llama")
    row = df.set_index(["quantity", "group"]).loc[("incoming lift", "z1")]
    assert row["diff"] > 0 and row["diff_lo"] > 0 and row["real"]
    ent = df.set_index(["quantity", "group"]).loc[("row entropy", "all")]
    assert ent["diff"] < 0 and ent["real"]
    assert {"high-composite heads", "concentration", "mass", "depth profile", "hubs"} <= set(df["section"])
    assert set(df.loc[df["section"] == "depth profile", "group"]) == {"0-25%", "25-50%", "50-75%", "75-100%"}


def test_compare_maps_an_older_runs_stat_names():
    """A report made before 'critical heads' became 'high-composite heads' compares as if made today, and so
    does a stored comparison handed to the card."""
    import dataclasses

    from cards.compare_card import compare_card

    a = M.analyze(patterned(["hub0", "hub0", "uniform", "sequential"], layers=4, noise=0.3), n_boot=30, seed=1)
    b = M.analyze(patterned(["uniform"] * 6 + ["sequential"] * 2, layers=6, noise=0.3, seed=2), n_boot=30, seed=2)
    old_names = {new: old for old, new in M.RENAMED.items()}
    old = dataclasses.replace(b, model_stats=b.model_stats.replace({"section": old_names, "quantity": old_names}))
    assert "critical heads" in set(old.model_stats["section"])
    today = M.compare_reports(a, b, ("a", "b"))
    pd.testing.assert_frame_equal(M.compare_reports(a, old, ("a", "b")), today)
    stored = today.replace({"section": old_names, "quantity": old_names})
    stored.attrs = dict(today.attrs)
    assert len(compare_card(stored)) == len(compare_card(today))  # the high-composite figure finds its rows


def test_compare_identical_runs_shows_no_difference():
    """A run against itself: no difference, and an interval as wide as two independent runs' (the same problem
    weights in both, paired by draw, would give [0, 0] everywhere)."""
    r = M.analyze(random_attention(), n_boot=30)
    df = M.compare_reports(r, r)
    assert np.allclose(df["diff"], 0) and not df["real"].any()
    row = df.set_index(["quantity", "group"]).loc[("row entropy", "all")]
    assert 1.0 < (row["diff_hi"] - row["diff_lo"]) / (row["hi_a"] - row["lo_a"]) < 2.0  # ~sqrt(2) if independent


def test_compare_pairs_runs_of_the_same_problems():
    """Two runs of the same problems: the difference's interval is the bootstrap of the per-problem difference,
    computed here from the weights numpy draws for the seed (row entropy: a per-problem mean); tighter than the
    independent one when the runs' problems vary alike. Another order of the problems, seed, n_boot or sample (the
    same ids in another dataset): independent."""
    x = random_attention(n=40, seed=3)
    rng = np.random.default_rng(9)
    y = x * rng.uniform(0.9, 1.1, x.shape)  # same problems, a little changed: the two runs covary by problem
    y = y / y.sum(-1, keepdims=True) * x.sum(-1, keepdims=True)
    ids = [f"p{i}" for i in range(40)]
    a, b = (M.analyze(v, n_boot=300, seed=5, problem_ids=ids, fingerprint="f00d") for v in (x, y))
    df = M.compare_reports(a, b)
    assert M.paired(a, b) and df.attrs["paired"]
    w = np.random.default_rng(5).multinomial(40, np.full(40, 1 / 40), size=300) / 40
    per_problem = M.row_entropy(M.renormalise(x)).mean((1, 2)) - M.row_entropy(M.renormalise(y)).mean((1, 2))
    lo, hi = np.percentile(w @ per_problem, [2.5, 97.5])
    row = df.set_index(["quantity", "group"]).loc[("row entropy", "all")]
    assert row["diff"] == pytest.approx(per_problem.mean(), abs=1e-9)
    assert (row["diff_lo"], row["diff_hi"]) == (pytest.approx(lo, abs=1e-6), pytest.approx(hi, abs=1e-6))
    apart = M.compare_reports(M.analyze(x, n_boot=300, seed=5), M.analyze(y, n_boot=300, seed=5))
    assert not apart.attrs["paired"]
    wide = apart.set_index(["quantity", "group"]).loc[("row entropy", "all")]
    assert (row["diff_hi"] - row["diff_lo"]) < 0.5 * (wide["diff_hi"] - wide["diff_lo"])
    for changed in (dict(problem_ids=ids[::-1]), dict(seed=6), dict(n_boot=200), dict(fingerprint="beef")):
        other = M.analyze(y, **{**dict(n_boot=300, seed=5, problem_ids=ids, fingerprint="f00d"), **changed})
        assert not M.paired(a, other) and not M.compare_reports(a, other).attrs["paired"]
    same = M.compare_reports(a, a)  # a run against itself, paired: no difference in any draw
    assert np.allclose(same["diff_lo"], 0) and np.allclose(same["diff_hi"], 0) and not same["real"].any()
    with pytest.raises(ValueError, match="problem_ids: 3 ids for 40 problems"):
        M.analyze(x, n_boot=0, problem_ids=ids[:3])


def test_compare_needs_one_basis():
    a = random_attention()
    with pytest.raises(ValueError):
        M.compare_reports(M.analyze(a, n_boot=0), M.analyze(a, basis="raw", n_boot=0))
    df = M.compare_reports(M.analyze(a, n_boot=0), M.analyze(a, n_boot=0))
    assert df["real"].isna().all()
