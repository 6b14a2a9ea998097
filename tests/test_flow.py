"""AttentionFlow end to end: real Metaflow runs (metaflow.Runner) on tiny release-layout CODI fixtures and
GSM8K-format train records (the `gsm8k_train` fixture), each in its own datastore, checked through the Client API.

Runs: one clean gpt2 run (shared by the tests here and in test_export.py), one llama run with a failing problem that
compares with the gpt2 run, the default demo run (shared with test_s3.py, where a shard is SIGKILLed mid-way, retried
and resumed on an S3 datastore).
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from codi_attn.prepack import can_prepack
from flowrun import FLOW_FILE, N, card_data, run_flow, seed42_ids, tiny_params, use_datastore

HEADS = ["attribute_heads", "scan_heads", "join_scan", "plan_held_out", "test_held_out", "join_heads"]
THOUGHTS = ["plan_thoughts", "analyse_thoughts", "join_thoughts"]
VALIDATION = ["plan_validation", "validate_conditions", "validate_heads"]
STEPS = ["start", "sample", "extract", "aggregate", "metrics", *HEADS, *THOUGHTS, *VALIDATION, "compare",
         "end"]  # the steps with a card; after_heads and after_thoughts only choose the next step


def steps_run(run) -> list[str]:
    """The steps a run ran, in the order they ran."""
    return [s.id for s in sorted(run, key=lambda s: min(t.created_at for t in s))]


def test_artifacts_shapes_dtypes_and_sample(clean_run):
    run, root, _ = clean_run
    use_datastore(root)
    d = run.data
    assert d.problem_ids == seed42_ids(N) == [p["id"] for p in d.problems]
    assert d.sampled_ids == d.problem_ids and d.failed_problems == []
    assert d.attention_raw.dtype == np.float16 and d.attention_raw.shape == (N, 2, 4, 6, 6)
    assert d.attention_mass.dtype == np.float16 and d.attention_mass.shape == (N, 2, 4, 6, 4)
    assert d.mass_parts == ["sink", "question", "bot", "thoughts"]
    for name in ("attention_avg", "attention_std"):
        assert getattr(d, name).dtype == np.float32 and getattr(d, name).shape == (2, 4, 6, 6)
    np.testing.assert_allclose(d.attention_avg, d.attention_raw.astype(np.float32).mean(0), rtol=1e-6)
    np.testing.assert_allclose(d.attention_std, d.attention_raw.astype(np.float32).std(0), rtol=1e-5, atol=1e-7)
    # causal: no thought attends to a later one; the diagonal (self-attention) is not zero
    assert not np.triu(d.attention_raw.astype(np.float32), 1).any()
    assert (np.diagonal(d.attention_raw, axis1=-2, axis2=-1) > 0).all()
    assert d.predictions.dtype == np.float64 and d.correct.dtype == np.bool_ and len(d.texts) == N
    assert d.accuracy == float(d.correct.mean())
    assert len(d.dataset_fingerprint) == 64
    assert set(run.tags) >= {"model:gpt2", f"dataset:{d.dataset_fingerprint[:12]}"}
    heads = d.ranked_heads
    assert len(heads) == 2 * 4
    assert {"layer", "head", "flow", "hub", "hub_position", "skip", "composite"} <= set(heads.columns)
    assert heads["composite"].is_monotonic_decreasing
    assert d.metrics_report.shape == (N, 2, 4) and d.metrics_report.n_boot == 10
    from codi_attn.metrics import head_scores

    expected = head_scores(d.attention_raw.astype(np.float32))
    cols = ["layer", "head", "flow", "hub", "hub_position", "skip", "composite"]
    pd_testing = pytest.importorskip("pandas").testing
    pd_testing.assert_frame_equal(heads[cols], expected[cols], check_dtype=False)
    assert d.compared_runs == [] and d.comparison == {}
    groups = d.validation["group"].tolist()
    assert groups[:2] == ["baseline", "no-op"] and groups.count("top-k single") == 2
    assert groups.count("random control") == 1 and groups.count("blocking") == 7
    assert d.validation_result.noop_identical
    assert d.validation_result.settings["n_boot"] == d.causal_report.settings["n_boot"] == d.thought_report.settings[
        "n_boot"] == 10  # --n_boot for every interval
    assert d.validation.loc[0, "accuracy"] == d.accuracy  # the baseline is re-run on the same problems
    groups = {t.data.validation_index: t.data.validation_part for t in run["validate_conditions"]}
    assert len(groups) == 2 == len(d.validation_groups)  # 13 conditions in groups of 8, joined in table order
    assert [r["condition"] for g in sorted(groups) for r in groups[g].rows] == list(d.validation["condition"][1:])
    assert {t.data.shard_index: t.data.checkpoint_batches for t in run["extract"]} == {
        0: {"loaded": 0, "computed": 2}, 1: {"loaded": 0, "computed": 1}}  # batches of 3: 4 + 2 problems
    assert d.model_files == {}  # local model folders: nothing to cache


def test_arrays_equal_direct_extraction(clean_run, gsm8k_train):
    """The flow's per-problem arrays are exactly what codi_attn.extract gives for those problems, in order."""
    from codi_attn.data import load_records, sample_problems
    from codi_attn.extract import extract
    from codi_attn.model import load_codi

    run, root, (base, ckpt) = clean_run
    use_datastore(root)
    problems = sample_problems(load_records(str(gsm8k_train), "train"), N)
    model = load_codi("gpt2", base=str(base), ckpt=str(ckpt), device="cpu", dtype="float32")
    ex = extract(model, [p.question for p in problems], [p.solution for p in problems], batch_size=1,
                 max_new_tokens=4)
    d = run.data
    np.testing.assert_allclose(d.attention_raw.astype(np.float32), ex.attention, rtol=2e-3, atol=1e-6)
    np.testing.assert_allclose(d.attention_mass.astype(np.float32), ex.mass, rtol=2e-3, atol=1e-6)
    assert d.texts == ex.text
    np.testing.assert_array_equal(d.correct, ex.correct)
    stats = d.attention_stats
    assert stats["n_problems"] == N
    np.testing.assert_allclose(sum(stats["mass_mean"].values()), 1.0, atol=2e-3)  # the four parts cover the row
    col = ex.attention.mean(axis=(0, 1, 2))
    np.testing.assert_allclose(stats["incoming"][:4], [col[j + 2:, j].mean() for j in range(4)], rtol=2e-3)
    assert np.isnan(stats["incoming"][4:]).all()  # no thought is two steps after z5 or z6
    row_mass = col.sum(-1)
    uniform = [np.mean([row_mass[i] / (i + 1) for i in range(j + 2, 6)]) for j in range(4)]
    np.testing.assert_allclose(stats["incoming_baseline"][:4], uniform, rtol=2e-3)


def test_reports_read_back_without_pytorch(clean_run):
    """A notebook reads the causal, thought and validation reports through the Client API without loading PyTorch
    or transformers (the reports' classes live in the analyses' model-free modules)."""
    import subprocess
    import sys

    run, root, _ = clean_run
    code = ("import sys; from metaflow import Run, metadata, namespace; metadata('local@' + sys.argv[1]); "
            "namespace(None); d = Run(sys.argv[2]).data; "
            "print(len(d.head_effects), len(d.thought_report.probes) > 0, len(d.validation_result.validation), "
            "'torch' in sys.modules, 'transformers' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code, str(root), run.pathspec], cwd=root, capture_output=True,
                         text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(FLOW_FILE.parents[1])})
    assert out.returncode == 0, out.stderr[-2000:]
    use_datastore(root)
    d = run.data
    assert out.stdout.split() == [str(len(d.head_effects)), str(len(d.thought_report.probes) > 0),
                                  str(len(d.validation_result.validation)), "False", "False"]


def test_cards_on_every_step(clean_run):
    from metaflow.cards import get_cards

    run, root, _ = clean_run
    use_datastore(root)
    for name in STEPS:
        for task in run[name]:
            cards = get_cards(task)
            assert len(cards) >= 1, f"no card on {task.pathspec}"
            html = cards[0].get()
            assert len(html) > 1000, f"empty card on {task.pathspec}"
    assert "No other model has a finished run on this sample" in card_data(run["compare"].task)
    assert "AttentionFlow cannot start" not in card_data(run["start"].task)
    assert "Aggregate: 6 of 6 problems" in card_data(run["aggregate"].task)
    weights = run.data.provenance["ckpt"]["files"]["pytorch_model.bin"]
    assert weights["sha256"] == run["extract"].task.data.model_info["source"]["files"]["ckpt"]["pytorch_model.bin"][
        "sha256"]
    assert "Input files" in card_data(run["aggregate"].task) and weights["sha256"][:16] in card_data(
        run["aggregate"].task)
    linear = ("oneDNN, 8 weights prepacked, 2 with the MLP activation fused"
              if can_prepack(torch.device("cpu"), torch.float32) else "PyTorch default")
    assert (f"float32 on cpu; sdpa for the question and decoding, eager for the six thought steps; linear layers "
            f"{linear}; activation gelu_pytorch_tanh (fused form of the config's gelu_new)"
            ) in card_data(run["aggregate"].task)
    assert '"type": "progressBar"' in card_data(run["extract"].task) or "progressBar" in card_data(run["extract"].task)
    assert "Head metrics: gpt2" in card_data(run["metrics"].task)
    assert steps_run(run) == [*STEPS[:5], *HEADS, "after_heads", *THOUGHTS, "after_thoughts", *VALIDATION,
                              "compare", "end"]
    assert [run[s].task.data.next_analysis for s in ("metrics", "after_heads", "after_thoughts")] == [
        "heads", "thoughts", "validation"]


def test_causal_head_analysis_in_the_run(clean_run):
    """attribute_heads, scan_heads and join_heads: every head and kind has a row, the estimate beside the exact
    effect, the held-out test ran, and the card says what was found."""
    run, root, _ = clean_run
    use_datastore(root)
    d = run.data
    effects = d.head_effects
    assert len(effects) == 2 * 4 * 3 and set(effects["kind"]) == {"mean", "zero", "resample"}
    assert effects["estimate"].notna().all() and effects["delta_accuracy"].between(-1, 1).all()
    assert d.causal_report.held_out is not None and len(d.causal_report.held_out.summary) == 2
    assert sorted(map(tuple, sum(d.head_groups, []))) == [(l, h) for l in range(2) for h in range(4)]
    card = card_data(run["join_heads"].task)
    assert "Which heads carry the thoughts?" in card and "causally critical" in card
    # the long steps say how far they are, batch by batch (batch_size 3: 3, then all 6 problems)
    assert "attribution: 3 of 6 problems through the backward pass\nattribution: 6 of 6" in \
        run["attribute_heads"].task.stdout
    scans = list(run["scan_heads"])
    for task in scans:
        group = f"scan group {task.data.group_index + 1}/{len(scans)}"
        heads = len(d.head_groups[task.data.group_index])
        assert f"{group}: 6 of 6 problems through the group's {heads} head(s)" in task.stdout
    b = len(d.causal_report.held_out.problems_b)
    assert all(f"of {b} problems of half B through the group's" in t.stdout for t in run["test_held_out"]
               if t.data.held_out_part is not None)


def test_card_cli_view_and_get(clean_run, tmp_path):
    import subprocess
    import sys

    run, root, _ = clean_run
    env = {**os.environ, "METAFLOW_DATASTORE_SYSROOT_LOCAL": str(root)}
    out = tmp_path / "card.html"
    proc = subprocess.run([sys.executable, str(FLOW_FILE), "card", "get", f"{run.id}/aggregate", str(out)],
                          env=env, cwd=root, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert len(out.read_text()) > 1000


@pytest.fixture(scope="module")
def killed_run(tiny_gpt2, gsm8k_train, tmp_path_factory):
    """A run whose shard 1 is SIGKILLed after its first batch, on a copy of the tiny checkpoint that the tests may
    replace: (datastore root, the failed Run, the checkpoint copy's weights file)."""
    import shutil

    root = tmp_path_factory.mktemp("resume_ds")
    ckpt = shutil.copytree(tiny_gpt2[1], root / "ckpt")
    params = tiny_params(tiny_gpt2[0], ckpt, gsm8k_train, heads=False, validate=False,
                         thought_analysis=False)  # tested on the clean run
    # one worker: shard 0 finishes before shard 1 dies (Metaflow kills the siblings still running when a
    # task fails; resume would rerun those too, which is right but not what the tests pin down)
    failed = run_flow(root, env={"CODI_ATTN_FAIL_SHARD": "1:kill"}, max_workers=1, **params)
    assert failed.status == "failed"
    assert not failed.run.successful
    assert [t.data.shard_index for t in failed.run["extract"] if t.successful] == [0]  # shard 1 died
    return root, failed.run, ckpt / "pytorch_model.bin"


def test_resume_refuses_a_replaced_checkpoint(killed_run):
    """The checkpoint file is replaced after shard 0 finished: the resumed shard 1 stops before extracting,
    naming the file and what to do, and nothing after it runs (no array mixing two checkpoints is stored)."""
    from codi_attn.fixtures import save_checkpoint
    from codi_attn.model import read_state_dict

    root, failed_run, weights = killed_run
    original = weights.read_bytes()
    state = read_state_dict(str(weights))
    state["prj.3.bias"] += 1.0  # a checkpoint that loads fine, with other weights
    try:
        save_checkpoint(state, weights.parent)
        resumed = run_flow(root, resume=True, origin_run_id=failed_run.id)
    finally:
        weights.write_bytes(original)
    assert resumed.status == "failed"
    output = resumed.stdout_text + resumed.stderr_text
    assert "AttentionFlow cannot go on" in output and "Traceback" not in output
    assert f"checkpoint file {weights} changed since the run started" in output
    assert "start a new run (`run` instead of `resume`)" in output
    run = resumed.run
    assert "aggregate" not in [s.id for s in run]
    rerun = [t for t in run["extract"] if t.origin_pathspec is None]
    assert len(rerun) == 1 and not rerun[0].successful and "attention" not in rerun[0]


def test_shard_death_then_resume_equals_clean_run(clean_run, killed_run):
    """Shard 1 was SIGKILLed after its first batch; resume reruns only it; arrays equal the clean run's."""
    from metaflow import Run

    clean, clean_root, _ = clean_run
    root, failed_run, _ = killed_run
    use_datastore(root)
    shard_tasks = {t.data.shard_index: t for t in failed_run["extract"] if t.successful}

    resumed = run_flow(root, resume=True, origin_run_id=failed_run.id)
    assert resumed.status == "successful", resumed.stderr_text[-3000:]
    new = Run(resumed.run.pathspec)
    assert new.id != failed_run.id
    by_index = {t.data.shard_index: t for t in new["extract"]}
    assert by_index[0].origin_pathspec == shard_tasks[0].pathspec  # cloned, not rerun
    assert by_index[1].origin_pathspec is None  # rerun
    assert set(new.tags) >= {"model:gpt2", f"dataset:{new.data.dataset_fingerprint[:12]}"}
    assert "Extract: shard 1 of 2" in card_data(by_index[0])  # a cloned task's card is its origin's
    assert "Extract: shard 2 of 2" in card_data(by_index[1])

    use_datastore(clean_root)
    c = clean.data
    use_datastore(root)
    d = new.data
    assert d.problem_ids == c.problem_ids and d.failed_problems == []
    for name in ("attention_raw", "attention_mass", "attention_avg", "attention_std", "predictions", "correct"):
        np.testing.assert_array_equal(getattr(d, name), getattr(c, name), err_msg=name)
    assert d.texts == c.texts and d.dataset_fingerprint == c.dataset_fingerprint
    assert d.ranked_heads.equals(c.ranked_heads)


@pytest.fixture(scope="module")
def failed_problems_run(tiny_gpt2, gsm8k_train, tmp_path_factory):
    """A one-shard run on a copy of the train file that stops in extract: one of its three problems raises, over
    --max_failed_fraction 0.1: (datastore root, the failed run's result, the dataset copy)."""
    import shutil

    root = tmp_path_factory.mktemp("failed_problems_ds")
    dataset = shutil.copy(gsm8k_train, root / "train.jsonl")
    failed = run_flow(root, env={"CODI_ATTN_FAIL_PROBLEMS": seed42_ids(3)[1]},
                      **tiny_params(*tiny_gpt2, dataset, n_problems="3", shard_size=3, heads=False, validate=False,
                                    thought_analysis=False))
    return root, failed, Path(dataset)


def test_too_many_failed_problems_stop_the_shard_in_one_line(failed_problems_run):
    _, failed, _ = failed_problems_run
    assert failed.status == "failed"
    output = failed.stdout_text + failed.stderr_text
    assert "AttentionFlow extraction failed" in output and "Traceback" not in output
    assert (f"shard 1: 1 of 3 problems failed, more than --max_failed_fraction=0.1; first: {seed42_ids(3)[1]}: "
            "RuntimeError: test hook CODI_ATTN_FAIL_PROBLEMS") in output
    assert "`resume` extracts the failed problems again and reads the others back" in output
    assert "aggregate" not in [s.id for s in failed.run]


def test_resume_refuses_a_changed_dataset(failed_problems_run):
    """A sampled record's question is edited after start: sample, rerun by `resume sample`, stops naming the file
    and both hashes, without a traceback, and nothing after it runs (no old attention scored on new text)."""
    import hashlib
    import json

    root, failed, dataset = failed_problems_run
    original = dataset.read_bytes()
    lines = original.decode("utf-8").splitlines(keepends=True)
    index = int(seed42_ids(3)[0].split("_")[1])
    record = json.loads(lines[index])
    lines[index] = json.dumps({**record, "question": record["question"] + " Answer in cents."}) + "\n"
    edited = "".join(lines).encode("utf-8")
    try:
        dataset.write_bytes(edited)
        resumed = run_flow(root, resume=True, origin_run_id=failed.run.id, step_to_rerun="sample")
    finally:
        dataset.write_bytes(original)
    assert resumed.status == "failed"
    output = resumed.stdout_text + resumed.stderr_text
    assert "AttentionFlow cannot go on" in output and "Traceback" not in output
    then, now = (hashlib.sha256(b).hexdigest()[:12] for b in (original, edited))
    assert "the dataset file differs from the one this run started with" in output
    assert f"dataset file {dataset} changed since the run started (sha256 {then}... then, {now}... now)" in output
    assert "extract" not in [s.id for s in resumed.run]


def test_full_datastore_stops_naming_it_and_resume_finishes(clean_run, small_disk, tiny_gpt2, gsm8k_train):
    """The datastore on a real 5 MB tmpfs fills up mid-run: the run stops with one line naming the datastore and
    what to do, no traceback; on the disk made larger, `resume` clones what was stored and finishes with arrays
    equal to the clean run's (nothing stored before the disk filled was lost)."""
    import subprocess

    from metaflow import Run

    clean, clean_root, _ = clean_run
    disk = small_disk("5m")
    params = tiny_params(*tiny_gpt2, gsm8k_train, heads=False, validate=False, thought_analysis=False)
    failed = run_flow(disk, **params)
    assert failed.status == "failed"
    output = failed.stdout_text + failed.stderr_text
    assert (f"AttentionFlow cannot go on: No space left on device writing to the datastore (datastore {disk}/.metaflow)"
            f"; what was stored before is whole. Free space on that disk (or copy {disk}/.metaflow to a larger disk "
            f"and set METAFLOW_DATASTORE_SYSROOT_LOCAL to the folder holding the copy), then: python "
            f"flows/attention_flow.py resume") in output
    assert "Traceback" not in output and "Internal error" not in output
    assert "start" in [s.id for s in failed.run] and not failed.run.successful
    subprocess.run(["mount", "-o", "remount,size=64m", str(disk)], check=True)
    resumed = run_flow(disk, resume=True, origin_run_id=failed.run.id)
    assert resumed.status == "successful", resumed.stderr_text[-3000:]
    d = Run(resumed.run.pathspec).data
    use_datastore(clean_root)
    c = clean.data
    use_datastore(disk)
    for name in ("attention_raw", "attention_mass", "predictions", "correct"):
        np.testing.assert_array_equal(getattr(d, name), getattr(c, name), err_msg=name)


def test_failed_problem_recorded_and_compare_finds_other_model(clean_run, tiny_llama, gsm8k_train):
    """A llama run in the clean run's datastore: one problem raises and is recorded, the rest go on;
    compare finds the gpt2 run on the same sample."""
    clean, root, _ = clean_run
    bad = seed42_ids(N)[1]
    result = run_flow(root, env={"CODI_ATTN_FAIL_PROBLEMS": bad},
                      **tiny_params(*tiny_llama, gsm8k_train, model="llama", max_failed_fraction=0.5, heads=False,
                                    validate=False, thought_analysis=False))
    assert result.status == "successful", result.stderr_text[-3000:]
    d = result.run.data
    assert [f["id"] for f in d.failed_problems] == [bad]
    output = result.stdout_text + result.stderr_text  # the console counts what the cards count, by problem id
    assert f"shard 1/2: 3 of 4 problems extracted, 1 failed ({bad}); accuracy " in output
    assert "shard 2/2: 2 of 2 problems extracted, 0 failed; accuracy " in output
    assert f"run: {N - 1} of {N} problems extracted, 1 failed ({bad}); accuracy " in output
    assert f"{N - 1} of {N} problems extracted, 1 failed (failed_problems), accuracy " in output
    assert f"{N - 1} of {N} (1 failed)" in card_data(result.run["aggregate"].task)
    assert "fails on purpose" in d.failed_problems[0]["error"]
    assert d.problem_ids == [i for i in seed42_ids(N) if i != bad]
    assert d.attention_raw.shape[0] == N - 1
    assert d.compared_runs == [clean.pathspec]
    # --heads, --thought_analysis and --validate false: metrics goes on to compare, no task of the analyses runs
    assert steps_run(result.run) == [*STEPS[:5], "compare", "end"] and d.next_analysis == "compare"
    assert (d.causal_report, d.head_effects, d.thought_report, d.validation_result, d.validation) == (None,) * 5
    diff = d.comparison[clean.pathspec]
    assert {"value_llama", "value_gpt2", "diff"} <= set(diff.columns)
    assert d.metrics_report.problem_ids == tuple(d.problem_ids) and d.metrics_report.fingerprint == d.dataset_fingerprint
    assert not diff.attrs["paired"]  # one problem fewer here: the two runs are resampled independently
    card = card_data(result.run["compare"].task)
    assert "Model comparison: llama vs gpt2" in card and "same sample" not in card
    assert "each run resampled independently" in card
    assert (f"Sample: dataset fingerprint {d.dataset_fingerprint[:12]} in both runs (dataset, split, n_problems and "
            f"seed); extracted {N - 1} of {N} here, {N} of {N} there, {N - 1} in both") in card
    assert "Settings that differ besides the model: --max_failed_fraction 0.5 here, 0.1 there" in card


def test_resume_extracting_a_failed_problem_recomputes_the_head_analysis(clean_run, tiny_gpt2, gsm8k_train,
                                                                         tmp_path):
    """One problem fails (recorded, under --max_failed_fraction) and the head analysis runs on the other five; a
    `resume extract` extracts it again, and the analyses' checkpoints, made on five problems, are not read back for
    six: attribute_heads recomputes and the mean-ablation effects equal the clean run's on all six."""
    clean, clean_root, _ = clean_run
    bad = seed42_ids(N)[1]
    params = tiny_params(*tiny_gpt2, gsm8k_train, validate=False, thought_analysis=False, head_kinds="mean")
    first = run_flow(tmp_path, env={"CODI_ATTN_FAIL_PROBLEMS": bad}, **{**params, "max_failed_fraction": 0.5})
    assert first.status == "successful", first.stderr_text[-3000:]
    assert first.run.data.problem_ids == [i for i in seed42_ids(N) if i != bad]
    resumed = run_flow(tmp_path, resume=True, origin_run_id=first.run.id, step_to_rerun="extract")
    assert resumed.status == "successful", resumed.stdout_text[-3000:] + resumed.stderr_text[-3000:]
    d = resumed.run.data
    assert d.failed_problems == [] and resumed.run["attribute_heads"].task.data.checkpoint_batches["loaded"] == 0
    use_datastore(clean_root)
    c = clean.data
    assert d.problem_ids == c.problem_ids
    np.testing.assert_array_equal(d.attention_raw, c.attention_raw)
    assert d.ranked_heads.equals(c.ranked_heads)
    cols = ["layer", "head", "n_problems", "accuracy", "delta_accuracy", "delta_ci_low", "delta_ci_high", "estimate"]
    mean = c.head_effects[c.head_effects["kind"] == "mean"]
    assert len(d.head_effects) == len(mean) == 8
    assert d.head_effects[cols].reset_index(drop=True).equals(mean[cols].reset_index(drop=True))


def test_bad_input_fails_in_start(tmp_path, tiny_gpt2, gsm8k_train):
    result = run_flow(tmp_path / "ds", **tiny_params(*tiny_gpt2, gsm8k_train, n_problems="8000"))
    assert result.status == "failed"
    output = result.stdout_text + result.stderr_text
    assert "AttentionFlow cannot start" in output
    assert "n_problems=8000 is larger than the split, which has 7473" in output
    assert "Traceback" not in output
    assert [s.id for s in result.run] == ["start"]  # nothing ran after start


def test_offline_hub_models_fail_in_start_saying_what_to_pass(tmp_path, gsm8k_train):
    """--model gpt2 offline with nothing cached: start fails without a traceback, one line for the base model and
    one for the checkpoint, each naming its hub id and the flag that takes a local directory."""
    result = run_flow(tmp_path / "ds", env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}, model="gpt2",
                      dataset=str(gsm8k_train), n_problems="4", device="cpu")
    assert result.status == "failed"
    output = result.stdout_text + result.stderr_text
    assert "AttentionFlow cannot start" in output and "Traceback" not in output
    assert "base model 'openai-community/gpt2'" in output and "--base /path/to/dir" in output
    assert "checkpoint 'zen-E/CODI-gpt2'" in output and "--ckpt /path/to/dir" in output
    assert [s.id for s in result.run] == ["start"]


def test_code_package_ships_project_code(tmp_path):
    """--with kubernetes/batch: the code package holds codi_attn/ and cards/ beside the flow file, and a
    task started from the unpacked package imports them from there."""
    import subprocess
    import sys
    import tarfile

    env = {**os.environ, "METAFLOW_DATASTORE_SYSROOT_LOCAL": str(tmp_path)}
    proc = subprocess.run([sys.executable, str(FLOW_FILE), "package", "save", str(tmp_path / "pkg.tgz")],
                          env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    with tarfile.open(tmp_path / "pkg.tgz") as tar:
        names = set(tar.getnames())
        assert {"attention_flow.py", "codi_attn/data.py", "codi_attn/extract.py", "cards/extract_card.py"} <= names
        tar.extractall(tmp_path / "pkg", filter="data")
    probe = "import codi_attn.data, cards.sample_card; print(codi_attn.data.__file__, cards.sample_card.__file__)"
    out = subprocess.run([sys.executable, "-c", f"import sys; sys.path.insert(0, '.'); {probe}"],
                         cwd=tmp_path / "pkg", capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert all(Path(f).resolve().is_relative_to((tmp_path / "pkg").resolve()) for f in out.stdout.split())


def test_default_run_is_the_offline_demo(demo_run):
    """No --model, no --dataset, no network: the demo model on the bundled synthetic set, with a banner."""
    run, root = demo_run
    use_datastore(root)
    d = run.data
    start = card_data(run["start"].task)
    assert "DEMO MODEL" in start and "mean,zero,resample" in start and "('mean'" not in start  # as written
    assert "only 6 problems: percentile-bootstrap 95% intervals" in start and "only 462 distinct" in start
    assert "only 6 problems" in card_data(run["validate_heads"].task)
    assert d.demo and d.model == "demo" and d.settings["dataset"] == "synthetic"
    assert len(d.problem_ids) == 6 and d.problem_ids[0].startswith("test_")  # held out from the demo's training
    assert d.validation_result.noop_identical and d.validation_result.settings["k"] == 4  # a quarter of 4 x 4 heads
    assert len(d.validation) == 20 and len(list(run["validate_conditions"])) == 2  # 19 conditions in groups of 10
    assert steps_run(run) == [*STEPS[:5], *VALIDATION, "compare", "end"]  # --heads and --thought_analysis false
    assert d.causal_report is None and d.thought_report is None and "not measured (--heads false)" in card_data(
        run["end"].task)
    assert "model:demo" in run.tags
