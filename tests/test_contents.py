"""The analyse_thoughts report (codi_attn.contents, run by codi_attn.contents_run): every part on the demo model,
findings that say what the tables say, decodability against every control, and honest notes where a sample is too small
for a part."""
from __future__ import annotations

import pickle
from dataclasses import asdict, replace

import numpy as np
import pandas as pd
import pytest

from codi_attn import contents as C
from codi_attn import contents_run as CR
from codi_attn.conventions import N_THOUGHTS
from codi_attn.patching import MIN_PATCHED
from codi_attn.probes import MIN_PROBLEMS, POSITIONS, run_probes


def _problems(dataset: str, split: str, n: int) -> list[dict]:
    from codi_attn.data import load_records, sample_problems

    return [asdict(p) for p in sample_problems(load_records(dataset, split), n, seed=42, split=split)]


@pytest.fixture(scope="module")
def demo_report():
    from codi_attn.model import load_codi

    model = load_codi("demo", device="cpu", dtype="float32")
    problems = _problems("synthetic", "test", MIN_PROBLEMS)
    return model, problems, CR.analyse_thoughts(model, problems, True, [(1, 0), (0, 3)], batch_size=8,
                                               max_new_tokens=8, n_boot=50, seed=0, stack=4)


def test_demo_report_has_every_part(demo_report):
    model, problems, report = demo_report
    assert len(report.attended) == len(problems)
    for w, p in zip(report.attended, problems):
        assert w.dtype == np.float16 and w.shape[0] == N_THOUGHTS
    shares = report.attended_by_kind[["share_number", "share_operation", "share_other"]].sum(axis=1)
    np.testing.assert_allclose(shares, 1.0, atol=1e-6)
    assert report.attended_heads_by_kind is not None and report.settings["heads"] == ["L1H0", "L0H3"]
    cells = len(POSITIONS) * model.n_layers
    per_target = report.probes.groupby("target").size()
    assert (per_target == cells).all() and {"step 1", "step 5", "answer", "op 1"} <= set(per_target.index)
    assert (report.probes["n"] >= MIN_PROBLEMS).all()
    assert set(report.mean_patching["kind"]) == {"same", "different"}
    assert len(report.pair_patching) == N_THOUGHTS * (model.n_layers + 1) and report.pair_facts["valid"] > 0
    assert report.notes == []
    assert pickle.loads(pickle.dumps(report)).findings == report.findings


def test_the_recording_passes_the_seed_to_probes_and_lens(demo_report, monkeypatch):
    """--seed reaches the probes' resamples and the lens's permuted floor (the lens drew with seed 0 whatever the
    run's seed was)."""
    model, problems, _ = demo_report
    seeds = {}
    for name in ("run_probes", "lens_table"):
        monkeypatch.setattr(CR, name, lambda *a, _name=name, **k: seeds.setdefault(_name, k["seed"]))
    CR._record(model, problems, (), n_boot=10, seed=7, batch_size=8, max_new_tokens=4, checkpoints=None,
               progress=None)
    assert seeds == {"run_probes": 7, "lens_table": 7}


def test_findings_say_what_the_tables_say(demo_report):
    _, _, report = demo_report
    k = report.attended_by_kind
    assert report.findings[0].startswith(f"The thoughts read the question's numbers: "
                                         f"{100 * k['share_number'].mean():.0f}% of their question attention")
    best = C.best_probes(report.probes)
    steps = best[best["target"].str.startswith("step")]
    found = steps[steps["decodable"]]
    line = next(f for f in report.findings if "intermediate results" in f)
    if len(found):
        assert line.startswith(f"Linear probes read the intermediate results above control for {len(found)} of "
                               f"{len(steps)} targets")
    else:
        assert line.startswith("Linear probes find the intermediate results nowhere above control")
    pp = report.pair_patching
    r = pp[pp["layer"] != "z"].sort_values("recovery", ascending=False).iloc[0]
    assert f"from {r.thought}'s residual after block {r.layer}" in report.findings[-1]


def _mean_report(rows: list[dict]) -> C.ThoughtReport:
    """A report with nothing but these mean-patching rows (and a sample baseline that none of them has)."""
    from codi_attn.patching import MEAN_PATCHING_COLUMNS

    empty = pd.DataFrame()
    return C.ThoughtReport([], empty, empty, None, [], empty, empty, pd.DataFrame(rows, columns=MEAN_PATCHING_COLUMNS),
                           empty, {}, 0.9, {"n_layers": 2})


SAME = [{"thought": "z1", "step": 1, "kind": "same", "n": 12, "accuracy": 0.5, "ci_low": 0.2, "ci_high": 0.8,
         "baseline_accuracy": 0.4, "change": 0.1, "change_low": -0.1, "change_high": 0.3},
        {"thought": "z3", "step": 1, "kind": "same", "n": 11, "accuracy": 0.2, "ci_low": 0.0, "ci_high": 0.4,
         "baseline_accuracy": 0.6, "change": -0.4, "change_low": -0.6, "change_high": -0.2}]
DIFFERENT = [{"thought": t, "step": 2, "kind": "different", "n": 10, "accuracy": 0.3, "ci_low": 0.1, "ci_high": 0.5,
              "baseline_accuracy": 0.5, "change": -0.2, "change_low": -0.4, "change_high": 0.0, "counterfactual": cf,
              "cf_low": cf - 0.1, "cf_high": cf + 0.1} for t, cf in (("z2", 0.3), ("z4", 0.6))]


def test_mean_patching_findings_compare_the_same_problems_and_need_their_rows():
    """Same-value accuracy set against the rows' own unpatched accuracy (not the sample's 90%); a cost claimed only
    where the paired interval of the change lies below 0; each finding only where its rows exist."""
    both = C.findings(_mean_report(SAME + DIFFERENT))
    assert both == [
        "Mean patching: replacing a thought by the mean thought of the problems with the same value of a step leaves "
        "20-50% accuracy, against 40-60% unpatched on the same problems (change -40 to +10 points).",
        "Even the same-value mean costs accuracy in 1 of 2 cells (interval below 0); at most z3, step 1, 20% against "
        "60% unpatched on the same problems (-40 points [-60, -20]): the thoughts carry more of their problem than one "
        "step's value.",
        "Mean patching with another value of a step: at most 60% [50, 70] of the answers move to the counterfactual "
        "(z4, step 2; problems whose counterfactual equals their gold, where the step does not feed the answer, left "
        "out)."]
    assert C.findings(_mean_report(SAME)) == both[:2]
    assert C.findings(_mean_report(DIFFERENT)) == both[2:]
    assert C.findings(_mean_report(SAME[:1])) == [
        "Mean patching: replacing a thought by the mean thought of the problems with the same value of a step leaves "
        "50-50% accuracy, against 40-40% unpatched on the same problems (change +10 to +10 points)."]
    assert C.findings(_mean_report([])) == []
    wide = {**SAME[1], "thought": "z5", "n": 3, "change": -0.5, "change_low": -0.9, "change_high": 0.1}
    costly = C.findings(_mean_report([*SAME, wide]))[1]  # the largest drop is noise: the cost is z3's
    assert costly.startswith("Even the same-value mean costs accuracy in 1 of 3 cells (interval below 0); at most z3")


def test_card_tables_mean_patching_against_the_same_problems(demo_report):
    from cards.thoughts_card import thoughts_card

    _, _, report = demo_report
    mp = report.mean_patching
    rendered = [part.render() for part in thoughts_card(report)]
    shown = next(r for r in rendered if r["type"] == "table" and "unpatched (same problems)" in r["columns"])
    column = shown["columns"].index("unpatched (same problems)")
    assert [row[column] for row in shown["data"]] == [f"{100 * v:.0f}%" for v in mp["baseline_accuracy"]]
    text = "\n".join(r["source"] for r in rendered if r["type"] == "markdown")
    assert "leave out the problems whose counterfactual equals their gold" in text


def test_decodable_needs_the_interval_on_half_b_above_every_control():
    row = pd.Series({"ci_low_b": 0.5, "control_b": 0.3, "permuted_b": 0.2, "majority_b": 0.4,
                     "ci_low": 0.1, "control": 0.9, "permuted": 0.9, "majority": 0.9})  # all problems: not what counts
    assert C.decodable(row)
    for control in ("control_b", "permuted_b", "majority_b"):
        assert not C.decodable(row.where(row.index != control, 0.5))


def test_best_probe_is_chosen_on_half_a_and_judged_on_half_b():
    """The cell with the highest selectivity on A, not on all problems; decodable from B's numbers."""
    probes = pd.DataFrame({"target": ["step 1"] * 3 + ["answer"] * 2, "position": ["BOT", "z1", "z2", "z1", "z2"],
                           "layer": [0, 1, 0, 0, 1], "selectivity": [0.9, 0.3, 0.2, -0.1, 0.5],
                           "selectivity_a": [0.1, 0.3, 0.2, -0.1, 0.0],
                           "ci_low_b": [0.9, 0.6, 0.4, 0.9, 0.2], "control_b": [0.1] * 5, "permuted_b": [0.1] * 5,
                           "majority_b": [0.3] * 5})
    best = C.best_probes(probes)
    assert list(best["target"]) == ["step 1", "answer"]
    assert list(best["position"]) == ["z1", "z2"] and list(best["decodable"]) == [True, False]
    with pytest.raises(ValueError, match="made before a target's best cell was chosen on half A"):
        C.best_probes(probes.drop(columns="selectivity_a"))  # a report pickled by an older version


def test_probe_findings_on_noise_are_at_chance():
    """Residuals of pure noise, four balanced operations: the best cells, chosen on half A and judged on half B, are
    at chance on B on average and seldom called decodable; the most selective cells on all problems (chosen
    and judged on the same problems) are well above it, the selection bias the halves remove."""
    rng = np.random.default_rng(7)
    chosen, pooled, calls = [], [], 0
    for rep in range(8):
        ops = rng.choice(list("+-*/"), (100, 2))
        solutions = [f"<<2{a}3=1>> <<1{b}4=2>>\n#### 2" for a, b in ops]
        questions = [f"Tom has {rng.integers(1, 1000)} apples." for _ in range(100)]
        resid = rng.standard_normal((100, len(POSITIONS), 8, 16)).astype(np.float32)
        probes = run_probes(resid, solutions, questions, n_boot=200, seed=rep)
        best = C.best_probes(probes[probes["target"].str.startswith("op")])
        chosen += list(best["accuracy_b"] - best["control_b"])
        calls += int(best["decodable"].sum())
        pooled += list(probes.groupby("target")["selectivity"].max())
    assert len(chosen) == 16 and calls <= 2  # 2 here; about 1 target in 40 over 48 more
    assert abs(np.mean(chosen)) < 0.05 and np.mean(pooled) > 0.08, (np.mean(chosen), np.mean(pooled))


def test_small_sample_says_which_parts_it_cannot_show(gpt2_model, gsm8k_train):
    """Six GSM8K problems on the tiny model: no probe, no mean patching; the notes say why, the card renders."""
    from cards.thoughts_card import thoughts_card

    report = CR.analyse_thoughts(gpt2_model, _problems(str(gsm8k_train), "train", 6), False, batch_size=3,
                                max_new_tokens=4, n_boot=10)
    assert report.probes.empty and report.mean_patching.empty
    assert report.notes[:2] == [
        f"no probe: fewer than {MIN_PROBLEMS} problems have any one target with 2 or more values",
        f"no mean patching: no step is in 80% of the problems and at least {MIN_PATCHED} of them with the same and "
        "with another value"]
    rendered = [part.render() for part in thoughts_card(report)]
    text = "\n".join(r["source"] for r in rendered if r["type"] == "markdown")
    assert all(f"Note: {n}." in text for n in report.notes)
    assert sum(r["type"] == "image" for r in rendered) == 5


@pytest.fixture(scope="module")
def grouped(demo_report):
    """The demo report's plan in groups of 8 (a multiple of the 4 conditions stacked per forward), each group run
    on its own, in reverse order: (plan, groups, parts)."""
    model, problems, _ = demo_report
    plan = C.plan_thoughts(problems, True, model.n_layers, [(1, 0), (0, 3)], n_boot=50, seed=0)
    groups = plan.groups(8)
    parts = [CR.analyse_group(model, problems, plan, g, batch_size=8, max_new_tokens=8, stack=4) for g in groups[::-1]]
    return plan, groups, parts[::-1]


def test_groups_join_to_exactly_the_analysis_in_one_process(demo_report, grouped):
    """Groups of one part each (the recording alone) joined in any order give the one-process report bit for bit."""
    _, problems, whole = demo_report
    plan, groups, parts = grouped
    assert [u.part for u in groups[0]] == ["record"] and all(len({u.part for u in g}) == 1 for g in groups)
    assert [u for g in groups for u in g] == plan.units and len(groups) >= 5
    assert {u.part for u in plan.units} == {"record", "mean", "pair"}
    joined = C.join_thoughts(plan, parts[::-1], problems)
    for name in ("attended_by_kind", "attended_by_step", "attended_heads_by_kind", "probes", "lens", "mean_patching",
                 "pair_patching"):
        pd.testing.assert_frame_equal(getattr(joined, name), getattr(whole, name), check_exact=True, obj=name)
    assert all(np.array_equal(a, b) for a, b in zip(joined.attended, whole.attended))
    assert (joined.findings, joined.notes, joined.pair_facts, joined.baseline_accuracy, joined.settings) == (
        whole.findings, whole.notes, whole.pair_facts, whole.baseline_accuracy, whole.settings)


def test_join_refuses_parts_that_do_not_make_the_plan(demo_report, grouped):
    _, problems, _ = demo_report
    plan, _, parts = grouped
    for wrong in (parts[:-1], parts + parts[-1:]):
        with pytest.raises(ValueError, match="the thought parts hold units"):
            C.join_thoughts(plan, wrong, problems)
    with pytest.raises(ValueError, match="a group holds the units of one part"):
        CR.analyse_group(demo_report[0], problems, plan, plan.units[:2])


def test_a_killed_group_redoes_only_the_batches_left(demo_report, grouped, tmp_path):
    """Each part (recording, mean patches, pair patches) killed after its second checkpoint: the rerun reads back
    what was saved, computes only the rest, and gives the uninterrupted group's outcome bit for bit."""
    from metaflow.plugins.datastores.local_storage import LocalStorage

    from codi_attn.checkpoints import Checkpoints
    from codi_attn.datastore import DatastoreFiles
    from test_checkpoints import DiesAfter, Interrupted

    model, problems, _ = demo_report
    plan, groups, parts = grouped
    files = DatastoreFiles(LocalStorage(str(tmp_path / ".metaflow")), "AttentionFlow")
    for g, (group, clean) in enumerate(zip(groups, parts)):
        if g and group[0].part == groups[g - 1][0].part:
            continue  # the first group of each part
        folder = files.path("checkpoints", "1", "analyse_thoughts", str(g))
        first = DiesAfter(files, folder, saves=2)
        with pytest.raises(Interrupted):
            CR.analyse_group(model, problems, plan, group, batch_size=8, max_new_tokens=8, stack=4, checkpoints=first)
        rerun = Checkpoints(files, folder)
        part = CR.analyse_group(model, problems, plan, group, batch_size=8, max_new_tokens=8, stack=4,
                               checkpoints=rerun)
        assert rerun.loaded == first.saved and len(rerun.saved) >= 1 and not set(rerun.saved) & set(first.saved)
        baseline = {"record": [], "mean": ["thoughts"], "pair": ["pairs"]}[group[0].part]
        assert first.saved[:len(baseline)] == baseline
        if part.recording is None:
            for a, b in zip(part.predictions + part.logit_diff, clean.predictions + clean.logit_diff):
                assert a is b is None or np.array_equal(a, b, equal_nan=True)
        else:
            r, c = part.recording, clean.recording
            assert all(np.array_equal(a, b) for a, b in zip(r.attended, c.attended))
            assert r.probes.equals(c.probes) and r.lens.equals(c.lens) and r.by_step.equals(c.by_step)
            assert np.array_equal(r.baseline_correct, c.baseline_correct)


def test_probe_map_boxes_the_chosen_cells_and_draws_an_old_report_without_them(demo_report):
    """Each target's panel boxes the cell best_probes chose (solid where decodable, dashed where not); probes from
    before the halves (no selectivity_a) still draw, unboxed, so an older run still exports."""
    from matplotlib.patches import Rectangle

    from codi_attn.contents import best_probes
    from codi_attn.figures.thoughts import probe_maps
    from codi_attn.probes import POSITIONS

    _, _, report = demo_report
    best = best_probes(report.probes).set_index("target")
    fig = probe_maps(report)
    panels = {ax.get_title().split(":")[0]: ax for ax in fig.axes if ax.get_title()}
    for target, row in best.iterrows():
        (box,) = [p for p in panels[target].patches if isinstance(p, Rectangle)]
        assert box.get_xy() == (row["layer"] - 0.5, POSITIONS.index(row["position"]) - 0.5)
        assert (box.get_linestyle() == "-") == row["decodable"]
        assert panels[target].get_title().endswith(": read on B" if row["decodable"] else ": not read on B")
    old = replace(report, probes=report.probes.drop(columns=["selectivity_a"]))
    assert not any(isinstance(p, Rectangle) for ax in probe_maps(old).axes for p in ax.patches)


def _report(**tables) -> C.ThoughtReport:
    """A report with nothing but the given tables (attended_by_kind, probes, lens, pair_patching), pair_facts and
    settings."""
    from codi_attn.patching import MEAN_PATCHING_COLUMNS

    empty = pd.DataFrame()
    return C.ThoughtReport([], tables.get("attended_by_kind", empty), empty, None, [], tables.get("probes", empty),
                           tables.get("lens", empty), pd.DataFrame(columns=MEAN_PATCHING_COLUMNS),
                           tables.get("pair_patching", empty), tables.get("pair_facts", {}), 0.9,
                           tables.get("settings", {"n_layers": 2}))


def test_attention_finding_gives_the_mean_shares_and_the_spread_over_thoughts():
    kinds = pd.DataFrame({"thought": ["z1", "z2", "z3"], "share_number": [0.5, 0.7, 0.6],
                          "share_operation": [0.1, 0.2, 0.3], "share_other": [0.4, 0.1, 0.1]})
    assert C.findings(_report(attended_by_kind=kinds)) == [
        "The thoughts read the question's numbers: 60% of their question attention goes to number tokens, 20% to "
        "operation words (thoughts z1..z6 differ by at most 20 points)."]


PROBES = pd.DataFrame(
    [("step 1", "BOT", 0, 0.5, 0.8, 0.6, 0.9), ("step 1", "z1", 0, 0.2, 0.5, 0.1, 0.7),
     ("step 1", "z1", 1, 0.1, 0.5, 0.1, 0.7), ("step 2", "BOT", 0, 0.0, 0.4, 0.1, 0.6),
     ("step 2", "z1", 0, 0.4, 0.7, 0.5, 0.85), ("step 2", "z1", 1, 0.3, 0.6, 0.1, 0.8),
     ("op 1", "BOT", 0, 0.1, 0.3, 0.1, 0.5), ("op 1", "z1", 0, 0.3, 0.2, 0.05, 0.4),
     ("op 1", "z1", 1, -0.1, 0.9, 0.2, 0.95), ("op 2", "BOT", 0, 0.1, 0.6, 0.1, 0.7),
     ("op 2", "z1", 0, 0.05, 0.3, 0.1, 0.5), ("op 2", "z1", 1, -0.2, 0.4, 0.1, 0.6)],
    columns=["target", "position", "layer", "selectivity_a", "accuracy_b", "ci_low_b", "ci_high_b"]).assign(
    control_b=0.25, permuted_b=0.2, majority_b=0.3)


def test_probe_findings_name_each_targets_cell_chosen_on_half_a():
    """Three cells (position, layer) per target: step 1 and step 2 read at their cell of highest selectivity on A
    (BOT for step 1: said to be read from the question); the operations nowhere, and of their chosen cells the one
    most selective on A is reported (op 1's, not op 2's with the better accuracy on B)."""
    how = "the best of 3 cells each, chosen on half A of the problems, measured on half B"
    assert C.findings(_report(probes=PROBES)) == [
        f"Linear probes read the intermediate results above control for 2 of 2 targets ({how}): step 1 at BOT layer "
        "0: 80% [60, 90] vs control 25%; step 2 at z1 layer 0: 70% [50, 85] vs control 25%. For 1 of them the best "
        "cell is BOT, before any thought: read from the question text.",
        f"Linear probes find the operations nowhere above control: at best op 1 at z1 layer 0, 20% [5, 40] vs control "
        f"25% and majority 30% ({how})."]


def test_lens_finding_reads_the_best_cell_of_the_targets_ranked_often_enough():
    lens = pd.DataFrame([("step 1", "z1", 0, MIN_PROBLEMS, 0.4, 0.1), ("step 1", "z2", 1, MIN_PROBLEMS, 0.6, 0.2),
                         ("step 2", "z1", 0, MIN_PROBLEMS - 1, 0.9, 0.5)],  # too few problems: left out
                        columns=["target", "position", "layer", "n", "top1", "permuted_top1"])
    assert C.findings(_report(lens=lens)) == [
        f"The lens per layer ranks a target value first among the number tokens at best for 60% of the {MIN_PROBLEMS} "
        f"problems it ranks (step 1 at z2 layer 1; targets ranked on at least {MIN_PROBLEMS} problems), against 20% "
        "there with the targets permuted across problems (at best 20% over the 2 cells)."]


def test_pair_finding_names_the_best_residual_and_the_best_fed_thought():
    """The most recovery among the residuals after a block, and among the fed thoughts (layer z); the residual after
    the last block (n_layers - 1) is called the state the next thought is projected from, another one is not."""
    pp = pd.DataFrame([("z1", "0", 9, 0.2, 0.0, 0.4), ("z1", "1", 9, 0.7, 0.5, 0.9), ("z2", "0", 9, 0.3, 0.1, 0.5),
                       ("z1", "z", 9, 0.4, 0.1, 0.6), ("z2", "z", 9, 0.1, -0.2, 0.3)],
                      columns=["thought", "layer", "n", "recovery", "ci_low", "ci_high"])
    assert C.findings(_report(pair_patching=pp, pair_facts={"valid": 5})) == [
        "Clean -> corrupted patching (5 pairs differing in one question number): the most recovery of the answer's "
        "logit difference comes from z1's residual after block 1 (the state the next thought is projected from), 0.70 "
        "[0.50, 0.90], and from a fed thought, z1: 0.40 [0.10, 0.60]."]
    three = C.findings(_report(pair_patching=pp, pair_facts={"valid": 5}, settings={"n_layers": 3}))
    assert "from z1's residual after block 1, 0.70 [0.50, 0.90], and" in three[0]


def test_join_refuses_parts_of_other_models_or_other_pairs(demo_report, grouped):
    """Groups that ran another model, or clean/corrupted pairs that differ, do not join."""
    _, problems, _ = demo_report
    plan, _, parts = grouped
    other = [replace(p, model={**p.model, "name": "other"}) if i == 1 else p for i, p in enumerate(parts)]
    with pytest.raises(ValueError, match="^the thought parts ran different models: "):
        C.join_thoughts(plan, other, problems)
    pairs = [i for i, p in enumerate(parts) if p.units[0].part == "pair"]
    assert len(pairs) >= 2
    base = parts[pairs[1]].pair_baseline
    moved = [replace(p, pair_baseline=replace(base, ld_clean=base.ld_clean + 1.0)) if i == pairs[1] else p
             for i, p in enumerate(parts)]
    with pytest.raises(ValueError, match=r"^the thought parts ran different clean/corrupted pairs"):
        C.join_thoughts(plan, moved, problems)


def test_join_says_so_where_no_pair_counts_and_reads_the_baseline_accuracy(demo_report, grouped):
    """No pair with answer tokens that differ in both runs: a note says pair patching has nothing to recover; the
    baseline accuracy is the share of problems the recording run answers correctly."""
    _, problems, _ = demo_report
    plan, _, parts = grouped
    invalid = [replace(p, pair_baseline=replace(p.pair_baseline, valid=np.zeros_like(p.pair_baseline.valid)))
               if p.pair_baseline is not None else p for p in parts]
    report = C.join_thoughts(plan, invalid, problems)
    n = len(parts[-1].pair_baseline.valid)
    assert report.pair_facts["valid"] == 0 and report.notes == [
        f"no clean/corrupted pair of the {n} has answer tokens in both runs that differ: pair patching has nothing to "
        "recover"]
    correct = parts[0].recording.baseline_correct
    assert report.baseline_accuracy == correct.sum() / len(problems) and len(correct) == len(problems)
