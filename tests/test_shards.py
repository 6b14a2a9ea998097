"""Sharded extraction (codi_attn.shards): failures kept per problem, the join in sample order, CPU threads."""
from __future__ import annotations

import numpy as np
import pytest

from codi_attn import shards


def test_extract_shard_isolates_failing_problem(gpt2_model, monkeypatch):
    """A batch that raises is retried problem by problem: only the bad problem is lost, order is kept,
    and the rest equal a direct extraction."""
    from codi_attn.extract import extract

    problems = [{"id": f"train_{k}", "question": q, "answer": "1", "solution": "#### 1"} for k, q in enumerate(
        ["Tom has 3 apples. How many?", "Ann has 5 pens and buys 2. How many?", "What is 4 plus 4?",
         "Sue has 9 coins. She loses 1. How many?", "A robe takes 2 bolts. How many?"])]
    monkeypatch.setenv("CODI_ATTN_FAIL_PROBLEMS", "train_1")
    seen = []
    out = shards.extract_shard(gpt2_model, problems, batch_size=3, max_new_tokens=3,
                                 on_batch=lambda done, failed: seen.append((done, failed)))
    assert seen == [(3, 1), (5, 1)]
    assert out["ids"] == ["train_0", "train_2", "train_3", "train_4"]
    assert [f["id"] for f in out["failed"]] == ["train_1"] and "RuntimeError" in out["failed"][0]["error"]
    keep = [problems[k] for k in (0, 2, 3, 4)]
    ex = extract(gpt2_model, [p["question"] for p in keep], None, batch_size=4, max_new_tokens=3)
    assert out["attention"].dtype == np.float16
    np.testing.assert_array_equal(out["attention"], ex.attention.astype(np.float16))
    assert out["texts"] == ex.text
    with pytest.raises(shards.ShardError, match=r"^shard 1: 1 of 5 problems failed, more than --max_failed_fraction=0.1"
                                                r"; first: train_1: RuntimeError: .*`resume` extracts the failed "
                                                r"problems again and reads the others back$"):
        shards.check_failures(out["failed"], 5, 0.1, 0)
    shards.check_failures(out["failed"], 5, 0.2, 0)  # exactly at the bound is fine


def test_merge_shards_checks_coverage():
    a = np.zeros((1, 1, 1, 6, 6), np.float16)
    m = np.zeros((1, 1, 1, 6, 4), np.float16)

    def shard(ids, failed=()):
        return {"ids": list(ids), "attention": np.repeat(a, len(ids), 0), "mass": np.repeat(m, len(ids), 0),
                "texts": list(ids), "predictions": np.zeros(len(ids)), "correct": np.zeros(len(ids), bool),
                "failed": [{"id": f, "error": "x"} for f in failed]}

    merged = shards.merge_shards(["a", "b", "c"], [shard(["c"]), shard(["a"], failed=["b"])])
    assert merged["ids"] == ["a", "c"] and merged["texts"] == ["a", "c"] and merged["failed"][0]["id"] == "b"
    with pytest.raises(RuntimeError, match=r"duplicated \['a'\]"):
        shards.merge_shards(["a", "b"], [shard(["a", "b"]), shard(["a"])])
    with pytest.raises(RuntimeError, match=r"lost \['b'\]"):
        shards.merge_shards(["a", "b"], [shard(["a"])])
    with pytest.raises(RuntimeError, match=r"unknown \['z'\]"):
        shards.merge_shards(["a"], [shard(["a", "z"])])
    with pytest.raises(shards.ShardError, match=r"^no problem was extracted \(2 failed\); first error: a: x$"):
        shards.merge_shards(["a", "b"], [shard([], failed=["b"]), shard([], failed=["a"])])


@pytest.mark.parametrize("n_shards, cpus, threads", [(2, 2, 1), (1, 8, 8), (3, 8, 2), (5, 2, 1), (100, 64, 4)])
def test_cpu_threads_are_shared_by_the_shards_running_at_once(n_shards, cpus, threads):
    """Up to 16 shards (Metaflow's default --max-workers) run at once; each gets its share of the cores."""
    assert shards.cpu_threads_per_shard(n_shards, cpus) == threads


def test_bad_questions_fail_alone_named_by_id(gpt2_model):
    """An empty and a too long question are recorded under their problem ids before any batch (not as 'question 0'
    of the batch retried alone); the good problem in their batch is extracted."""
    long = "seven " * gpt2_model.max_positions
    problems = [{"id": i, "question": q, "answer": "1", "solution": "#### 1"}
                for i, q in (("train_3", "What is 4 plus 4?"), ("train_8", "  "), ("train_9", long))]
    out = shards.extract_shard(gpt2_model, problems, batch_size=3, max_new_tokens=2)
    assert out["ids"] == ["train_3"]
    n_tokens = len(gpt2_model.tokenizer(long.strip())["input_ids"])
    assert out["failed"] == [
        {"id": "train_8", "error": "ValueError: the question of train_8 is empty"},
        {"id": "train_9", "error": f"ValueError: the question of train_9 has {n_tokens} tokens; with BOT, six thoughts "
                                   f"and EOT it exceeds the model's context of {gpt2_model.max_positions} positions"}]


def test_outcome_line_counts_the_failed_by_id():
    failed = [{"id": f"train_{k}", "error": "x"} for k in range(6)]
    assert shards.outcome_line("shard 1/2", 4, np.array([True, False, True]), failed[:1]) == (
        "shard 1/2: 3 of 4 problems extracted, 1 failed (train_0); accuracy 66.7% of the extracted")
    assert shards.outcome_line("run", 6, np.zeros(0, bool), failed) == (
        "run: 0 of 6 problems extracted, 6 failed (train_0, train_1, train_2, train_3, train_4, ...); accuracy n/a "
        "of the extracted")
    assert shards.outcome_line("run", 2, np.array([True, True]), []) == (
        "run: 2 of 2 problems extracted, 0 failed; accuracy 100.0% of the extracted")


def test_attention_stats_by_hand():
    """The run's overall numbers: incoming to thought j is the mean weight from the thoughts two or more steps
    later, its baseline the same under causal-uniform attention with the observed row masses, the mass split the
    mean of each part, self-attention the mean diagonal."""
    rng = np.random.default_rng(0)
    a = np.tril(rng.uniform(0, 0.2, (5, 2, 3, 6, 6))).astype(np.float16)
    m = rng.dirichlet(np.ones(4), (5, 2, 3, 6)).astype(np.float16)
    stats = shards.attention_stats(a, m, ("sink", "question", "bot", "thoughts"))
    col = a.astype(np.float64).mean(axis=(0, 1, 2))
    row_mass = col.sum(-1)
    np.testing.assert_allclose(stats["incoming"][:4], [col[j + 2:, j].mean() for j in range(4)], rtol=1e-5)
    np.testing.assert_allclose(stats["incoming_baseline"][:4],
                               [np.mean([row_mass[i] / (i + 1) for i in range(j + 2, 6)]) for j in range(4)],
                               rtol=1e-5)
    np.testing.assert_allclose(stats["incoming_lift"][:4],
                               np.array(stats["incoming"][:4]) / np.array(stats["incoming_baseline"][:4]))
    assert np.isnan(stats["incoming"][4:]).all() and np.isnan(stats["incoming_lift"][4:]).all()
    np.testing.assert_allclose(list(stats["mass_mean"].values()), m.astype(np.float32).mean(axis=(0, 1, 2, 3)),
                               rtol=1e-5)
    assert stats["self_attention"] == pytest.approx(np.diagonal(col).mean(), rel=1e-5)
    assert stats["n_problems"] == 5 and np.shape(stats["mass_by_layer"]) == (2, 4)


def test_failures_come_back_in_input_order_whenever_they_failed(gpt2_model, monkeypatch):
    """A problem that raises in its batch (train_1) and an empty question caught before any batch (train_3): the
    failed list follows the shard's order, not the order the failures were found in."""
    problems = [{"id": f"train_{k}", "question": q, "answer": "1", "solution": "#### 1"} for k, q in enumerate(
        ["Tom has 3 apples. How many?", "Ann has 5 pens and buys 2. How many?", "What is 4 plus 4?", " "])]
    monkeypatch.setenv("CODI_ATTN_FAIL_PROBLEMS", "train_1")
    out = shards.extract_shard(gpt2_model, problems, batch_size=4, max_new_tokens=2)
    assert out["ids"] == ["train_0", "train_2"]
    assert [f["id"] for f in out["failed"]] == ["train_1", "train_3"]


def test_merge_shards_gathers_every_array_by_id():
    """Each extracted problem's attention, mass, prediction and correctness follow its id into sample order
    (distinct values per problem, shards in another order than the sample)."""
    values = {"a": 1.0, "b": 2.0, "c": 3.0, "d": 4.0}

    def shard(ids):
        return {"ids": ids, "attention": np.stack([np.full((1, 1, 6, 6), values[i], np.float16) for i in ids]),
                "mass": np.stack([np.full((1, 1, 6, 4), -values[i], np.float16) for i in ids]),
                "texts": [f"text {i}" for i in ids], "predictions": np.array([values[i] * 10 for i in ids]),
                "correct": np.array([values[i] > 2 for i in ids]), "failed": []}

    merged = shards.merge_shards(["a", "b", "c", "d"], [shard(["d", "b"]), shard(["c", "a"])])
    assert merged["ids"] == ["a", "b", "c", "d"] and merged["texts"] == ["text a", "text b", "text c", "text d"]
    np.testing.assert_array_equal(merged["attention"][:, 0, 0, 0, 0], [1, 2, 3, 4])
    np.testing.assert_array_equal(merged["mass"][:, 0, 0, 5, 3], [-1, -2, -3, -4])
    np.testing.assert_array_equal(merged["predictions"], [10, 20, 30, 40])
    np.testing.assert_array_equal(merged["correct"], [False, False, True, True])


def test_outcome_line_elides_only_beyond_the_shown_ids():
    failed = [{"id": f"train_{k}", "error": "x"} for k in range(5)]
    assert shards.outcome_line("run", 5, np.zeros(0, bool), failed) == (
        "run: 0 of 5 problems extracted, 5 failed (train_0, train_1, train_2, train_3, train_4); accuracy n/a of the "
        "extracted")


def test_attention_stats_mass_by_layer_is_each_layers_mean_part():
    """mass_by_layer[l][p]: part p's mean share over problems, heads and thought rows of layer l."""
    rng = np.random.default_rng(1)
    m = rng.dirichlet(np.ones(4), (3, 2, 2, 6)).astype(np.float16)
    a = np.tril(rng.uniform(0, 0.2, (3, 2, 2, 6, 6))).astype(np.float16)
    stats = shards.attention_stats(a, m, ("sink", "question", "bot", "thoughts"))
    by_hand = [[float(np.mean([float(m[n, l, h, i, p]) for n in range(3) for h in range(2) for i in range(6)]))
                for p in range(4)] for l in range(2)]
    np.testing.assert_allclose(stats["mass_by_layer"], by_hand, rtol=1e-5)
