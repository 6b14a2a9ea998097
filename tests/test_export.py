"""python -m codi_attn export: a finished AttentionFlow run as results/<model>/ and figures/<model>/ files.
Uses the clean gpt2 flow run (conftest.py's clean_run, once per session)."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from codi_attn.__main__ import main
from codi_attn.export import ExportError, export_run, find_run
from flowrun import ROOT, use_datastore  # clean_run (conftest.py): the flow run shared with test_flow.py


PNG = b"\x89PNG\r\n\x1a\n"


def test_export_files_equal_artifacts(clean_run, tmp_path):
    run, root, _ = clean_run
    use_datastore(root)
    d = run.data
    paths = export_run(run, tmp_path)
    res, figs = tmp_path / "results" / "gpt2", tmp_path / "figures" / "gpt2"
    assert all(p.exists() and p.stat().st_size > 0 for p in paths)
    for key in ("attention_raw", "attention_mass", "attention_avg", "attention_std"):
        arr = np.load(res / f"{key}.npy")
        assert arr.dtype == getattr(d, key).dtype
        np.testing.assert_array_equal(arr, getattr(d, key))
    problems = pd.read_csv(res / "problems.csv", dtype={"gold": str})
    assert list(problems["id"]) == d.problem_ids
    np.testing.assert_array_equal(problems["correct"].to_numpy(), d.correct)
    assert list(problems["gold"]) == [p["answer"] for p in d.problems if p["id"] in d.problem_ids]
    heads = pd.read_csv(res / "ranked_heads.csv")
    assert list(heads["label"]) == list(d.ranked_heads["label"])
    np.testing.assert_allclose(heads["composite"], d.ranked_heads["composite"])
    for key in d.rankings:
        assert (res / f"{key}.csv").exists()
    summary = json.loads((res / "summary.json").read_text())
    assert summary["run"] == run.pathspec and summary["dataset_fingerprint"] == d.dataset_fingerprint
    assert summary["arrays"]["attention_raw"]["shape"] == list(d.attention_raw.shape)
    assert summary["accuracy"] == d.accuracy and summary["n_failed"] == 0
    assert json.loads((res / "failed_problems.json").read_text()) == []
    assert json.loads((res / "attention_stats.json").read_text())["n_problems"] == len(d.problem_ids)
    effects = pd.read_csv(res / "head_effects.csv")
    assert list(effects["label"]) == list(d.head_effects["label"])
    np.testing.assert_allclose(effects["delta_accuracy"], d.head_effects["delta_accuracy"])
    assert len(pd.read_csv(res / "held_out_sets.csv")) == len(d.causal_report.held_out.sets)
    assert (res / "head_correlations.csv").exists() and (res / "head_attribution_agreement.csv").exists()
    validation = pd.read_csv(res / "validation.csv")
    assert list(validation["condition"]) == list(d.validation["condition"])
    np.testing.assert_allclose(validation["accuracy"], d.validation["accuracy"])
    report = d.thought_report
    probes = pd.read_csv(res / "thought_probes.csv")
    assert len(probes) == len(report.probes)
    np.testing.assert_allclose(probes["accuracy"].astype(float), report.probes["accuracy"].astype(float))
    pairs = pd.read_csv(res / "thought_pair_patching.csv", dtype={"layer": str}, keep_default_na=False)
    assert list(pairs["layer"]) == list(report.pair_patching["layer"])
    assert json.loads((res / "thought_findings.json").read_text())["findings"] == report.findings
    for key in ("thought_lens", "thought_mean_patching", "thought_attended_by_kind", "thought_attended_by_step"):
        assert len(pd.read_csv(res / f"{key}.csv")) == len(getattr(report, key.removeprefix("thought_")))
    pngs = sorted(figs.glob("*.png"))
    details = [f"head_detail_{label}.png" for label in d.metrics_report.detail_heads()]
    assert details and len(pngs) == 17 + len(details) + 3 and all(p.read_bytes()[:8] == PNG for p in pngs)
    assert {"head_effects.png", "composite_vs_effect.png", "held_out_top_heads.png", "thought_probes.png",
            "thought_patching.png", "thought_attended_tokens.png", "validation_top_heads.png",
            "validation_single_heads.png", "validation_blocking.png", *details} <= {p.name for p in pngs}


def test_cli_export_subprocess(clean_run, tmp_path):
    run, root, _ = clean_run
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "codi_attn", "export", run.id, str(tmp_path / "out"),
                           "--datastore", str(root), "--name", "tiny", "--no-figures"],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert f"exported {run.pathspec}" in proc.stdout
    assert (tmp_path / "out" / "results" / "tiny" / "attention_raw.npy").exists()
    assert not (tmp_path / "out" / "figures").exists()


def test_cli_errors_and_help(clean_run, tmp_path, capsys):
    _, root, _ = clean_run
    assert main(["export", "424242", str(tmp_path), "--datastore", str(root)]) == 2
    assert "run '424242' not found" in capsys.readouterr().err
    assert main(["export", "1", str(tmp_path), "--datastore", str(tmp_path)]) == 2
    assert "no .metaflow datastore in" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        main(["export", "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert "RUN_ID" in out and "results/<model>/" in out and "--datastore" in out and "validation.csv" in out


def test_unfinished_run_is_refused():
    run = SimpleNamespace(successful=False, pathspec="AttentionFlow/7", id="7")
    with pytest.raises(ExportError, match="resume it first: python flows/attention_flow.py resume --origin-run-id 7"):
        export_run(run, "/nonexistent")


@pytest.mark.parametrize("name", ["/", "..", ".", "  "])
def test_a_name_that_leaves_no_folder_is_refused_and_nothing_changes(tmp_path, name):
    """--name '/' would export into results/ itself (--overwrite removing every earlier export), '..' above it."""
    run = SimpleNamespace(successful=True, data=SimpleNamespace(model="gpt2"), pathspec="AttentionFlow/7", id="7")
    earlier = tmp_path / "out" / "results" / "gpt2" / "summary.json"
    earlier.parent.mkdir(parents=True)
    earlier.write_text("{}")
    with pytest.raises(ExportError, match=rf"^--name {re.escape(repr(name))} leaves no folder name under results/"):
        export_run(run, tmp_path / "out", name=name, overwrite=True)
    assert _files(tmp_path / "out") == {"results/gpt2/summary.json": b"{}"}
    with pytest.raises(ExportError, match=r"^--name "):
        export_run(run, tmp_path / "new", name=name)
    assert not (tmp_path / "new").exists()  # no empty OUT_DIR/results/ left behind


def test_a_pathspec_of_a_step_is_refused_in_one_line(clean_run, tmp_path, capsys):
    _, root, _ = clean_run
    assert main(["export", "AttentionFlow/1/start", str(tmp_path / "out"), "--datastore", str(root)]) == 2
    assert capsys.readouterr().err == ("error: 'AttentionFlow/1/start' names no run: pass a run id, "
                                       "AttentionFlow/RUN_ID or latest\n")
    with pytest.raises(ExportError, match="names no run"):
        find_run("AttentionFlow/1/start/2")
    assert not (tmp_path / "out").exists()


def _files(folder) -> dict:
    """Every file under folder (hidden ones too) -> its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_export_keeps_an_earlier_export_unless_overwrite(clean_run, tmp_path):
    """A second export of the same name is refused naming the folder, and nothing changes; --overwrite replaces
    it whole once the new one is complete; an OUT_DIR that is a file is refused naming it."""
    run, root, _ = clean_run
    use_datastore(root)
    export_run(run, tmp_path, figures=False)
    (tmp_path / "results" / "gpt2" / "notes.txt").write_text("mine")
    (tmp_path / "figures" / "gpt2").mkdir(parents=True)
    (tmp_path / "figures" / "gpt2" / "other_run.png").write_text("an earlier export's figure")
    before = _files(tmp_path)
    with pytest.raises(ExportError) as err:
        export_run(run, tmp_path, figures=False)
    assert str(err.value) == (f"{tmp_path / 'results' / 'gpt2'} already exists: pass --overwrite to replace it "
                              f"(overwrite=True), or --name NAME to export beside it")
    assert _files(tmp_path) == before
    paths = export_run(run, tmp_path, figures=False, overwrite=True)
    after = _files(tmp_path)
    assert set(after) == {str(p.relative_to(tmp_path)) for p in paths}  # notes.txt and the old figures went
    assert not (tmp_path / "figures" / "gpt2").exists()
    assert all(after[k] == before[k] for k in after)
    (tmp_path / "file").write_text("")
    with pytest.raises(ExportError, match=f"^{tmp_path / 'file'} is a file, not a folder: pass a folder as OUT_DIR$"):
        export_run(run, tmp_path / "file")


def test_export_into_a_read_only_folder_says_so(clean_run, small_disk):
    run, root, _ = clean_run
    use_datastore(root)
    out = small_disk("1m", read_only=True)
    with pytest.raises(ExportError) as err:
        export_run(run, out, figures=False)
    assert str(err.value) == (f"cannot write {out}: Read-only file system; export to a folder on a writable disk "
                              f"(nothing was written to {out}, and no file there was changed)")


def test_export_onto_a_full_disk_leaves_no_file_and_keeps_what_was_there(clean_run, small_disk):
    """A real 2 MB tmpfs holding an earlier export, filled up to 16 KB: the new export stops naming the file it could
    not write; no half-written file is left and every file that was there is unchanged."""
    import shutil

    run, root, _ = clean_run
    use_datastore(root)
    out = small_disk("2m")
    export_run(run, out, name="earlier", figures=False)
    (out / "filler").write_bytes(b"x" * (shutil.disk_usage(out).free - 16384))
    before = _files(out)
    with pytest.raises(ExportError) as err:
        export_run(run, out)
    message = str(err.value)
    assert re.fullmatch(rf"cannot write {re.escape(str(out))}/(results|figures)/gpt2/\w+\.(npy|csv|json|png): No "
                        rf"space left on device; free space on that disk or export to another OUT_DIR \(nothing was "
                        rf"written to {re.escape(str(out))}, and no file there was changed\)", message), message
    assert _files(out) == before
    assert sorted(p.name for p in out.iterdir()) == ["filler", "results"]  # no hidden staging folder left


def test_json_files_hold_no_nan_or_infinity(tmp_path):
    """JSON has neither nan nor infinity: both are written as null (an incoming lift over a zero baseline is inf),
    numpy values as plain numbers."""
    from codi_attn.export import _write_json

    path = tmp_path / "x.json"
    _write_json(path, {"lift": np.array([1.5, np.inf, -np.inf, np.nan]), "n": np.int64(3), "ok": np.bool_(True),
                       "nested": [{"v": np.float32(0.25)}]})
    assert json.loads(path.read_text()) == {"lift": [1.5, None, None, None], "n": 3, "ok": True,
                                            "nested": [{"v": 0.25}]}


def test_a_rename_that_fails_puts_every_moved_folder_back(tmp_path, monkeypatch):
    """_swap_in moves the earlier export aside and the new folders in; when a later rename fails, the folders already
    moved go back in reverse order: OUT_DIR holds the earlier export as it was, the staging folder the new one."""
    from codi_attn.export import _swap_in

    out, staging = tmp_path / "out", tmp_path / "out" / ".export-x"
    for root, text in ((out, "old"), (staging, "new")):
        for folder in ("results/gpt2", "figures/gpt2"):
            (root / folder).mkdir(parents=True)
            (root / folder / "a.txt").write_text(f"{text} {folder}")
    before = _files(out)
    rename, calls = os.rename, []

    def failing(src, dst):  # the fourth rename, the new figures into place, fails (once)
        calls.append((src, dst))
        if len(calls) == 4:
            raise OSError(28, "No space left on device")
        rename(src, dst)

    monkeypatch.setattr(os, "rename", failing)
    with pytest.raises(OSError):
        _swap_in(staging, out, [Path("results") / "gpt2", Path("figures") / "gpt2"], [])
    assert _files(out) == before
    assert calls[3] == (staging / "figures" / "gpt2", out / "figures" / "gpt2") and len(calls) == 7
