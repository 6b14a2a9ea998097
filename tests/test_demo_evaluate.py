"""The shipped demo model and its evaluation: targets, the recorded accuracies, and the latent swap's partners."""

import json

import pytest
import torch

from codi_attn.demo import evaluate as E
from codi_attn.demo import task
from codi_attn.demo.codi import load_model
from codi_attn.demo.tokenizer import gold_answer
from codi_attn.hooks import FeedThoughts, solution_steps, swap_partners
from codi_attn.presets import DEMO_DIR


@pytest.fixture(scope="module")
def shipped():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    model, tok = load_model(DEMO_DIR)  # strict: every key used, none missing
    yield model, tok, json.loads((DEMO_DIR / "metrics.json").read_text())
    torch.set_num_threads(before)


def test_shipped_small_and_meets_targets(shipped):
    m = shipped[2]
    assert (DEMO_DIR / "ckpt" / "model.safetensors").stat().st_size < 10e6
    assert m["test"]["prj"] >= 0.6
    assert m["test"]["zeros"] <= m["test"]["prj"] / 2 and m["test"]["bot"] <= m["test"]["prj"] / 2
    assert m["test"]["swap"] <= m["test"]["prj"] / 2  # its thoughts carry the problem


def test_shipped_reproduces_recorded_subset_accuracy(shipped):
    model, tok, m = shipped
    subset = task.synthetic_records("test", m["subset"]["n"])
    assert E.accuracy(model, tok, subset, "prj") == pytest.approx(m["subset"]["prj"], abs=0.011)  # one problem of
    zeros = E.accuracy(model, tok, subset, "zeros")  # slack for other CPUs
    assert zeros == pytest.approx(m["subset"]["zeros"], abs=0.011)


def test_shipped_reproduces_every_recorded_test_accuracy(shipped):
    """`--evaluate`'s whole test entry (every mode of TEST_MODES, overall and by number of steps) comes back from
    the shipped weights, to two problems per entry (other CPUs' kernels may flip one; this EPYC gives it exactly)."""
    model, tok, m = shipped
    test = task.synthetic_records("test", m["test"]["n"])
    got = {"n": len(test)} | E.evaluate_all(model, tok, test, E.TEST_MODES)
    assert got.keys() == m["test"].keys() and got["by_steps"].keys() == m["test"]["by_steps"].keys()
    steps = [solution_steps(r["answer"]) for r in test]
    for mode in E.TEST_MODES:
        assert got[mode] == pytest.approx(m["test"][mode], abs=2.01 / len(test)), mode
        for k, entry in m["test"]["by_steps"].items():
            n = steps.count(int(k))
            assert got["by_steps"][k][mode] == pytest.approx(entry[mode], abs=2.01 / n), (mode, k)


def test_swap_mode_feeds_each_problem_its_partners_thoughts(shipped):
    """'swap' is the flow's latent swap: feeding the partner's thoughts by hand gives the same answers."""
    model, tok, _ = shipped
    records = task.synthetic_records("test", 30)
    partner = swap_partners([r["answer"] for r in records])
    own = {}
    for idx, b in E.batches_by_length(tok, records, 256):
        for i, z in zip(idx, model.think(b.question)[1]):
            own[i] = z
    by_hand = []
    with torch.no_grad():
        for i, r in enumerate(records):
            b = E.encode(tok, [r])
            cache, _ = model.think(b.question, hooks=[FeedThoughts(own[int(partner[i])][None])])
            row = E.greedy(model, cache, torch.full((1, 1), model.eot_id), 16, tok.eos_token_id)[0]
            by_hand.append(E.parse_answer(tok.decode(row, skip_special_tokens=True)))
    assert E.predict(model, tok, records, "swap") == by_hand
    assert sum(p == gold_answer(r) for p, r in zip(by_hand, records)) < 0.5 * len(records)


def test_unknown_mode_is_refused(shipped):
    model, tok, _ = shipped
    with pytest.raises(ValueError, match="mode must be one of"):
        E.predict(model, tok, task.synthetic_records("test", 2), "random")


def test_model_card_shows_a_runs_thought_findings(tmp_path):
    """train --thoughts RUN: the run's join_thoughts findings go to thoughts.json, metrics.json and the card; a
    run that skipped the step is refused."""
    from types import SimpleNamespace

    from codi_attn.demo.card import thoughts_entry, update_report

    (tmp_path / "metrics.json").write_text((DEMO_DIR / "metrics.json").read_text())
    findings = ["The thoughts read the question's numbers.", "Linear probes find nothing above control."]
    report = SimpleNamespace(settings={"n_problems": 100}, findings=findings)
    run = SimpleNamespace(pathspec="AttentionFlow/7", data=SimpleNamespace(thought_report=report))
    (tmp_path / "thoughts.json").write_text(json.dumps(thoughts_entry(run)))
    update_report(tmp_path)
    assert json.loads((tmp_path / "metrics.json").read_text())["thoughts"]["findings"] == findings
    card = (tmp_path / "README.md").read_text()
    assert ("## What its thoughts hold\nFrom the `join_thoughts` step of flow run `AttentionFlow/7` (100 problems "
            "of the test split; its card has the figures and intervals):\n\n- The thoughts read the question's "
            "numbers.\n- Linear probes find nothing above control.\n") in card
    skipped = SimpleNamespace(pathspec="AttentionFlow/8", data=SimpleNamespace(thought_report=None))
    with pytest.raises(SystemExit, match=r"run AttentionFlow/8 skipped the thought analysis \(--thought_analysis false\)"):
        thoughts_entry(skipped)
