"""The extraction benchmark runs on the tiny shape, writes its JSON and really checks (a) against (c); the causal
benchmark reports its ratios; the flow benchmark counts a run's tasks.

No timing assertions: timings live in the benchmark, never in the test suite.
"""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks" / "bench_extract.py"
KEYS = {"reference_problems_per_s", "plain_problems_per_s", "project_problems_per_s", "speedup", "capture_overhead",
        "peak_rss_mb", "achieved_gflops", "peak_gflops", "batch_size", "agreement", "machine", "memory"}



@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_extract", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_extract"] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def args(gsm8k_train):
    def make(out: Path, *extra: str) -> list[str]:
        return ["--shape", "tiny", "--n-problems", "5", "--batch-size", "2,4", "--max-new-tokens", "2", "--threads",
                "1", "--peak-size", "256", "--device", "cpu", "--dtype", "float32", "--gsm8k", str(gsm8k_train),
                "--json", str(out), *extra]

    return make


def test_tiny_benchmark_writes_json_and_checks_reference(bench, tmp_path, monkeypatch, args):
    import torch

    threads = torch.get_num_threads()
    calls = []
    real = bench.agreement
    monkeypatch.setattr(bench, "agreement", lambda *a, **k: calls.append(1) or real(*a, **k))
    out = tmp_path / "bench.json"
    assert bench.main(args(out, "--reference-problems", "3")) == 0
    res = json.loads(out.read_text())
    assert KEYS <= set(res), KEYS - set(res)
    assert calls, "the (a)-vs-(c) agreement check did not run"
    check = res["agreement"]
    assert check["ok"] and check["n_compared"] == 3 == res["reference_problems"]
    assert check["max_abs_diff_attention"] <= check["atol"]
    assert res["n_problems"] == 5 and res["batch_size"] in (2, 4) and set(res["sweep_problems_per_s"]) == {"2", "4"}
    for key in ("reference_problems_per_s", "plain_problems_per_s", "project_problems_per_s", "achieved_gflops",
                "peak_gflops", "peak_rss_mb"):
        assert res[key] > 0, key
    assert res["speedup"] == pytest.approx(res["project_problems_per_s"] / res["reference_problems_per_s"])
    assert res["capture_overhead"] == pytest.approx(res["project_seconds"] / res["plain_seconds"] - 1)
    assert res["generated_tokens_mean"] == 2  # random weights: the fixed decode budget is what runs
    if res["linear"].startswith("oneDNN"):  # the yardstick of the library's own kernel, where it runs
        assert res["packed_peak_gflops"] > 0
        assert res["achieved_fraction_of_packed_peak"] == pytest.approx(
            res["achieved_gflops"] / max(res["packed_peak_gflops"], res["peak_gflops"]))
    assert torch.get_num_threads() == threads  # --threads does not leak out of an in-process run


def test_reference_mismatch_is_caught(bench, tmp_path, monkeypatch, args):
    """A reference that reads the wrong key column (the off-by-one of codi-spec trap 1) must fail the check."""
    real = bench.reference_extract

    def shifted(*args, **kwargs):
        out = real(*args, **kwargs)
        out["attention"] = np.roll(out["attention"], 1, axis=-1)
        return out

    monkeypatch.setattr(bench, "reference_extract", shifted)
    out = tmp_path / "bad.json"
    assert bench.main(args(out, "--reference-problems", "2")) == bench.EXIT_MISMATCH
    res = json.loads(out.read_text())
    assert res["agreement"]["ok"] is False and "project_problems_per_s" not in res


def test_profile_accounts_for_the_run_and_splits_its_work(bench, tmp_path, args):
    """--profile: every op's self time counted once (the rows sum to the profiled ops and fit in the run's wall
    time), every phase of the runner found, and the GFLOP per phase summing to the FLOP count of the whole run."""
    out = tmp_path / "profile.json"
    assert bench.main(args(out, "--skip-reference", "--profile")) == 0
    res = json.loads(out.read_text())
    prof, n = res["profile"], res["n_problems"]
    rows = {(r["phase"], r["part"]): r for r in prof["rows"]}
    assert sum(r["seconds"] for r in prof["rows"]) == pytest.approx(prof["events_s"], abs=1e-3)
    assert 0.5 * prof["wall_s"] < prof["events_s"] <= prof["wall_s"] * 1.001
    for key in (("prefill", "linear"), ("prefill", "attention"), ("thoughts", "linear"), ("thoughts", "attention"),
                ("decode", "linear"), ("decode", "attention"), ("lm head", "linear")):
        assert rows[key]["seconds"] > 0 and rows[key]["gflop"] > 0, key
    assert sum(r["gflop"] for r in prof["rows"]) == pytest.approx(res["flops_per_problem_mean"] * n / 1e9, rel=1e-3)
    assert rows[("thoughts", "attention")]["gb_per_s"] > 0 and rows[("prefill", "linear")]["gb_per_s"] is None


def test_profile_classifies_ops_by_their_ranges(bench):
    """An op's phase is its nearest codi:: phase range; its part linear inside a linear kernel (the LM head's
    mm under aten::linear), attention inside an attention module (but a projection there is linear), else
    other."""
    from types import SimpleNamespace

    def chain(*names):  # outermost first; the event is the last
        event = None
        for name in names:
            event = SimpleNamespace(name=name, cpu_parent=event)
        return event

    assert bench.classify(chain("codi::rest", "codi::prefill", "codi::attention", "aten::_softmax")) == (
        "prefill", "attention")
    assert bench.classify(chain("codi::rest", "codi::thoughts", "codi::attention", "mkldnn::_linear_pointwise")) == (
        "thoughts", "linear")
    assert bench.classify(chain("codi::rest", "codi::lm head", "aten::linear", "aten::mm")) == ("lm head", "linear")
    assert bench.classify(chain("codi::rest", "codi::decode", "aten::native_layer_norm")) == ("decode", "other")
    assert bench.classify(chain("codi::rest", "aten::argmax")) == ("rest", "other")
    assert bench.classify(chain("aten::empty")) == ("rest", "other")


def test_help_names_every_option(bench, capsys):
    with pytest.raises(SystemExit):
        bench.main(["--help"])
    text = capsys.readouterr().out
    for option in ("--shape", "--n-problems", "--batch-size", "--max-new-tokens", "--device", "--dtype", "--json",
                   "--gsm8k", "--reference-problems", "--profile"):
        assert option in text


def test_help_shows_defaults_only_where_there_are_some(bench, capsys):
    with pytest.raises(SystemExit):
        bench.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: 8)" in text and "(default: None)" not in text and "(default: False)" not in text


def test_a_bad_gsm8k_file_is_one_line_naming_it(bench, tmp_path):
    with pytest.raises(SystemExit, match=rf"^--gsm8k: dataset file {tmp_path}/nope.jsonl does not exist$"):
        bench.main(["--gsm8k", str(tmp_path / "nope.jsonl"), "--n-problems", "2"])


def test_causal_benchmark_reports_its_ratios(tmp_path, gsm8k_train):
    """bench_causal.py: one extraction, then the validation and a scan of two heads on the same problems."""
    import subprocess

    out = tmp_path / "causal.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_causal.py"), "--shape", "tiny",
                           "--n-problems", "3", "--max-new-tokens", "2", "--scan", "--scan-heads", "2",
                           "--thoughts", "--condition-rows", "0", "--gsm8k", str(gsm8k_train), "--json", str(out)],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["scan_heads"] == 2 and result["scan_conditions"] == 6  # mean, zero, resample
    assert result["condition_rows"] == 0 and result["stack"] == 1
    for key in ("validation_over_extraction", "scan_over_extraction", "scan_condition_over_extraction",
                "thoughts_over_extraction"):
        assert result[key] > 0


def load_flow_bench():
    spec = importlib.util.spec_from_file_location("bench_flow", ROOT / "benchmarks" / "bench_flow.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_flow_benchmark_counts_the_clean_runs_tasks(clean_run):
    """bench_flow.py on the tests' clean run (no new flow run here): every task once, split into the steps with
    @resources and the rest, and the seconds add up."""
    from flowrun import use_datastore

    flow = load_flow_bench()
    run, root, _ = clean_run
    use_datastore(root)
    model = flow.model_steps(flow.FLOW_FILE)
    assert model == {"extract", "attribute_heads", "scan_heads", "test_held_out", "analyse_thoughts",
                     "validate_conditions"}
    times = flow.task_times(run)
    got = flow.summarise(times, model)
    tasks = {s.id: len(list(s)) for s in run}
    assert got["tasks"] == sum(tasks.values()) and set(got["per_step"]) == set(tasks)
    assert got["model_tasks"] == sum(n for step, n in tasks.items() if step in model)
    assert got["model_task_seconds"] + got["model_free_task_seconds"] == pytest.approx(got["task_seconds"])
    assert all(seconds > 0 for _, seconds in times)


def test_flow_benchmark_refuses_a_bad_param(capsys):
    flow = load_flow_bench()
    with pytest.raises(SystemExit):
        flow.main(["--param", "heads"])
    assert "--param takes NAME=VALUE (a flow parameter), got 'heads'" in capsys.readouterr().err
    for bad, why in (("heads=maybe", "--param heads=maybe: true or false"),
                     ("n_boot=many", "--param n_boot=many: not an int"),
                     ("head=false", "--param head: the flow has no such parameter (it has ablation, ")):
        with pytest.raises(SystemExit):
            flow.main(["--param", bad])
        assert why in capsys.readouterr().err
    assert flow.typed({"heads": "False", "n_problems": "6", "n_boot": "10"}, flow.parameter_types(flow.FLOW_FILE)) == {
        "heads": False, "n_problems": "6", "n_boot": 10}  # as the flow's Parameters type them
    with pytest.raises(SystemExit):
        flow.main(["--help"])
    text = capsys.readouterr().out
    for option in ("--flow", "--tiny", "--param", "--repeats", "--json"):
        assert option in text, text
