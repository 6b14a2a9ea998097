"""Mid-task checkpoints (codi_attn.checkpoints) in a local Metaflow datastore: where they are read back from, and the
extract shard, the head scan and a validation group stopped mid-way, rerun, redo only the batches left and give
bit for bit what an uninterrupted run gives."""
from __future__ import annotations

import sys
import types

import numpy as np
import pytest

from codi_attn.checkpoints import Checkpoints, fingerprint, problem_content, remembered
from codi_attn.datastore import DatastoreFiles

QUESTIONS = ["Natalia sold 48 clips in April. How many clips?", "Weng earns $12 an hour.",
             "A robe takes 2 bolts of blue fiber and half that much white fiber.", "Tom has 3 apples. How many?",
             "Ann has 5 pens and buys 2. How many?"]
SOLUTIONS = ["<<12*4=48>>\n#### 48", "<<12*6=72>>\n#### 72", "<<2/2=1>>\n#### 3", "#### 3", "<<5+2=7>>\n#### 7"]
GOLDS = ["48", "72", "3", "3", "7"]


class Interrupted(Exception):
    """Stands in for the task dying."""


@pytest.fixture
def files(tmp_path) -> DatastoreFiles:
    from metaflow.plugins.datastores.local_storage import LocalStorage

    return DatastoreFiles(LocalStorage(str(tmp_path / ".metaflow")), "AttentionFlow")


def folder(files: DatastoreFiles, run: str) -> str:
    return files.path("checkpoints", run, "extract", f"0-{fingerprint('settings')}")


class DiesAfter(Checkpoints):
    """Checkpoints whose task dies (Interrupted) right after its `saves`-th save."""

    def __init__(self, *args, saves: int):
        super().__init__(*args)
        self.saves = saves

    def save(self, name: str, obj) -> None:
        super().save(name, obj)
        if len(self.saved) == self.saves:
            raise Interrupted


def stop_after(n_batches: int):
    """A progress callback that interrupts the run after n_batches batches."""
    seen = []

    def progress(k: int) -> None:
        seen.append(k)
        if len(seen) == n_batches:
            raise Interrupted

    return progress


def test_checkpoints_read_back_own_run_then_origin(files):
    """A retry finds its own run's checkpoint; a resume finds the origin's and keeps a copy under its own run (a
    resume of the resume finds it there); other inputs give another folder."""
    first = Checkpoints(files, folder(files, "1"))
    assert first.load("batch-0") is None
    first.save("batch-0", {"rows": [0, 1], "x": np.arange(3)})
    retry = Checkpoints(files, folder(files, "1"))
    assert retry.load("batch-0")["rows"] == [0, 1] and retry.counts() == {"loaded": 1, "computed": 0}
    resumed = Checkpoints(files, folder(files, "2"), [folder(files, "1")])
    np.testing.assert_array_equal(resumed.load("batch-0")["x"], np.arange(3))
    again = Checkpoints(files, folder(files, "3"), [folder(files, "2")])
    assert again.load("batch-0") is not None
    calls = []
    assert remembered(again, "batch-1", lambda: calls.append(1) or "computed") == "computed"
    assert remembered(again, "batch-1", lambda: calls.append(1) or "again") == "computed" and calls == [1]
    assert again.counts() == {"loaded": 2, "computed": 1}
    assert fingerprint({"n": 1}, [1, 2]) != fingerprint({"n": 2}, [1, 2]) == fingerprint({"n": 2}, (1, 2))
    assert remembered(None, "batch-0", lambda: 5) == 5


def test_checkpoints_are_keyed_on_the_problems_text_and_gold():
    """A record edited under the same id (its question or its gold) is another problem: other checkpoints."""
    problems = [{"id": "train_3", "question": QUESTIONS[0], "answer": "48", "solution": SOLUTIONS[0]}]
    key = fingerprint({"n": 1}, problem_content(problems))
    assert fingerprint({"n": 1}, problem_content([{**problems[0], "question": QUESTIONS[1]}])) != key
    assert fingerprint({"n": 1}, problem_content([{**problems[0], "answer": "49"}])) != key
    assert fingerprint({"n": 1}, problem_content([{**problems[0], "solution": "#### 48"}])) == key


def test_group_checkpoints_are_keyed_on_what_the_conditions_do():
    """The validation and thought tasks key their checkpoints on their conditions and units themselves (the flow's
    _checkpoints(conds) / (units, plan settings)): a condition of the same name with other heads, or a plan
    reading other heads, is another key (a resume after the ranking changed must not read back another head set's
    outcomes)."""
    from codi_attn.contents import ThoughtUnit
    from codi_attn.patching import MeanPatch
    from codi_attn.validate import Condition

    group = [Condition("top-2", "top-k", ((0, 1), (1, 2))), Condition("random 1", "random control", ((0, 3), (1, 0)))]
    other = [group[0], Condition("random 1", "random control", ((0, 2), (1, 0)))]
    assert fingerprint(group) != fingerprint(other) and fingerprint(group) == fingerprint(list(group))
    units = [ThoughtUnit("record"), ThoughtUnit("mean", MeanPatch(2, 1, "same"))]
    assert fingerprint(units, {"heads": [(2, 0)]}) != fingerprint(units, {"heads": [(1, 2)]})
    different = [units[0], ThoughtUnit("mean", MeanPatch(2, 1, "different"))]
    assert fingerprint(units, {"heads": [(2, 0)]}) != fingerprint(different, {"heads": [(2, 0)]})


def test_a_checkpoint_that_no_longer_unpickles_is_recomputed_with_a_warning(files, capsys):
    """A checkpoint whose class has moved since it was written (codi-attn upgraded between a task's death and its
    resume), or bytes that are no pickle, is recomputed with a warning naming it, not a failed task; the
    recomputed object replaces it."""
    moved = types.ModuleType("codi_attn_moved")
    moved.Gone = type("Gone", (), {"__module__": "codi_attn_moved"})
    sys.modules["codi_attn_moved"] = moved
    try:
        Checkpoints(files, folder(files, "1")).save("batch-0", moved.Gone())
    finally:
        del sys.modules["codi_attn_moved"]
    files.put(files.storage.path_join(folder(files, "1"), "batch-1"), b"no pickle")
    resumed = Checkpoints(files, folder(files, "2"), [folder(files, "1")])
    assert [remembered(resumed, f"batch-{b}", lambda: f"recomputed {b}") for b in (0, 1)] == \
        ["recomputed 0", "recomputed 1"]
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and "batch-0" in err[0] and "ModuleNotFoundError" in err[0] and "batch-1" in err[1]
    assert resumed.counts() == {"loaded": 0, "computed": 2}
    assert Checkpoints(files, folder(files, "2")).load("batch-0") == "recomputed 0"


def test_extract_shard_killed_after_two_batches_redoes_only_the_rest(gpt2_model, files, monkeypatch):
    from codi_attn.shards import FAIL_SHARD_ENV, extract_shard

    problems = [{"id": f"train_{k}", "question": q, "answer": g, "solution": s}
                for k, (q, g, s) in enumerate(zip(QUESTIONS, GOLDS, SOLUTIONS))]
    clean = extract_shard(gpt2_model, problems, batch_size=2, max_new_tokens=3)  # batches of 2, 2, 1
    monkeypatch.setenv(FAIL_SHARD_ENV, "0:after=2")
    killed = Checkpoints(files, folder(files, "1"))
    with pytest.raises(RuntimeError, match="fails on purpose"):
        extract_shard(gpt2_model, problems, batch_size=2, max_new_tokens=3, checkpoints=killed)
    assert killed.counts() == {"loaded": 0, "computed": 2}
    monkeypatch.setenv(FAIL_SHARD_ENV, "")
    rerun = Checkpoints(files, folder(files, "2"), [folder(files, "1")])
    out = extract_shard(gpt2_model, problems, batch_size=2, max_new_tokens=3, checkpoints=rerun)
    assert rerun.counts() == {"loaded": 2, "computed": 1}
    assert out["ids"] == clean["ids"] and out["texts"] == clean["texts"] and out["failed"] == []
    for key in ("attention", "mass", "predictions", "correct"):
        np.testing.assert_array_equal(out[key], clean[key], err_msg=key)


def test_extract_shard_rerun_extracts_the_failed_problems_again(gpt2_model, files, monkeypatch):
    """Problems that raised (an error that passes, such as running out of memory) are saved as failed with their
    batch; a rerun extracts only them again, reads the rest back, and a rerun of that reads everything back."""
    import codi_attn.extract
    from codi_attn.shards import FAIL_PROBLEMS_ENV, extract_shard

    problems = [{"id": f"train_{k}", "question": q, "answer": g, "solution": s}
                for k, (q, g, s) in enumerate(zip(QUESTIONS, GOLDS, SOLUTIONS))]
    clean = extract_shard(gpt2_model, problems, batch_size=2, max_new_tokens=3)  # batches of 2, 2, 1
    monkeypatch.setenv(FAIL_PROBLEMS_ENV, "train_1,train_4")
    first = Checkpoints(files, folder(files, "1"))
    failed = extract_shard(gpt2_model, problems, batch_size=2, max_new_tokens=3, checkpoints=first)
    assert [f["id"] for f in failed["failed"]] == ["train_1", "train_4"]
    monkeypatch.setenv(FAIL_PROBLEMS_ENV, "")
    asked, extract = [], codi_attn.extract.extract
    monkeypatch.setattr(codi_attn.extract, "extract", lambda model, qs, *a, **kw: asked.append(qs) or extract(
        model, qs, *a, **kw))
    rerun = Checkpoints(files, folder(files, "2"), [folder(files, "1")])
    out = extract_shard(gpt2_model, problems, batch_size=2, max_new_tokens=3, checkpoints=rerun)
    assert asked == [[QUESTIONS[1]], [QUESTIONS[4]]]
    assert rerun.loaded == ["batch-0", "batch-1", "batch-2"] and rerun.saved == ["batch-0", "batch-2"]
    assert out["ids"] == clean["ids"] and out["texts"] == clean["texts"] and out["failed"] == []
    for key in ("attention", "mass", "predictions", "correct"):
        np.testing.assert_array_equal(out[key], clean[key], err_msg=key)
    again = Checkpoints(files, folder(files, "3"), [folder(files, "2")])
    assert extract_shard(gpt2_model, problems, batch_size=2, max_new_tokens=3, checkpoints=again)["ids"] == clean["ids"]
    assert len(asked) == 2 and again.counts() == {"loaded": 3, "computed": 0}


def test_head_scan_interrupted_redoes_only_the_batches_left(gpt2_model, files):
    from codi_attn.heads_run import scan_heads

    args = (gpt2_model, QUESTIONS, GOLDS, SOLUTIONS, [(0, 1), (1, 2)], ("mean", "resample"))
    clean = scan_heads(*args, batch_size=2, max_new_tokens=3)
    first = Checkpoints(files, folder(files, "1"))
    with pytest.raises(Interrupted):
        scan_heads(*args, batch_size=2, max_new_tokens=3, progress=stop_after(2), checkpoints=first)
    assert first.saved == ["baseline", "batch-0", "batch-1"]
    rerun = Checkpoints(files, folder(files, "1"))
    scan = scan_heads(*args, batch_size=2, max_new_tokens=3, checkpoints=rerun)
    assert rerun.loaded == ["baseline", "batch-0", "batch-1"] and rerun.saved == ["batch-2"]
    assert scan.heads == clean.heads and scan.kinds == clean.kinds
    for key in ("base_correct", "base_prediction", "base_logit_diff", "correct", "prediction", "kl", "logit_diff"):
        np.testing.assert_array_equal(getattr(scan, key), getattr(clean, key), err_msg=key)


def test_validation_group_interrupted_equals_uninterrupted(gpt2_model, files):
    """Recorded rows of every hook kind (answer logits, attention, thoughts) come back from the checkpoint; the
    no-op's batches (run alone) and the other conditions' (two stacked in one forward) are saved apart."""
    import pandas as pd

    from codi_attn.validate import plan_validation
    from codi_attn.validate_run import validate_group
    from test_validate import ranked

    plan = plan_validation(ranked(gpt2_model), gpt2_model.n_layers, gpt2_model.n_heads, len(QUESTIONS), k=2,
                           n_random=1)
    group = plan.conditions[:3] + plan.conditions[-1:]  # no-op, top-2, a single head, the swap
    args = (gpt2_model, QUESTIONS, GOLDS, SOLUTIONS, group)
    options = {"batch_size": 2, "max_new_tokens": 3, "n_boot": 50, "stack": 2}
    clean = validate_group(*args, **options)
    first = Checkpoints(files, folder(files, "1"))
    with pytest.raises(Interrupted):
        validate_group(*args, **options, progress=stop_after(1), checkpoints=first)
    noop = ["no-op-batch-0", "no-op-batch-1", "no-op-batch-2"]  # 5 problems in batches of 2
    assert first.saved == ["baseline", *noop, "batch-0"]
    rerun = Checkpoints(files, folder(files, "1"))
    part = validate_group(*args, **options, checkpoints=rerun)
    assert rerun.loaded == ["baseline", *noop, "batch-0"] and rerun.saved == ["batch-1", "batch-2"]
    pd.testing.assert_frame_equal(pd.DataFrame(part.rows), pd.DataFrame(clean.rows))
    assert part.noop_identical is clean.noop_identical is True  # the no-op's restored rows equal the baseline's


def test_checkpointed_run_refuses_hooks_whose_state_it_cannot_save(gpt2_model, files):
    from codi_attn.ablation import HeadMeans
    from codi_attn.runner import Runner

    with pytest.raises(ValueError, match="cannot be saved batch by batch"):
        Runner(gpt2_model, 2, 3).run_conditions(QUESTIONS, [[HeadMeans(gpt2_model)]],
                                                checkpoints=Checkpoints(files, folder(files, "1")))


def test_held_out_interrupted_redoes_only_the_batches_left(gpt2_model, files):
    """test_held_out: half B's baseline and finished batches come back; the sets equal an uninterrupted
    run's."""
    import pandas as pd

    from codi_attn.extract import extract
    from codi_attn.heads_run import held_out, scan_heads

    scan = scan_heads(gpt2_model, QUESTIONS * 2, GOLDS * 2, SOLUTIONS * 2, [(0, 1), (1, 2), (0, 0)], ("mean",),
                      batch_size=2, max_new_tokens=3)
    attention = extract(gpt2_model, QUESTIONS * 2, GOLDS * 2, max_new_tokens=1).attention
    args = (gpt2_model, QUESTIONS * 2, GOLDS * 2, SOLUTIONS * 2, scan, attention)
    options = {"k": 1, "n_random": 2, "n_boot": 20, "batch_size": 2, "max_new_tokens": 3}
    clean = held_out(*args, **options)
    first = DiesAfter(files, folder(files, "1"), saves=2)
    with pytest.raises(Interrupted):
        held_out(*args, **options, checkpoints=first)
    assert first.saved == ["held-out-baseline", "held-out-0"]
    rerun = Checkpoints(files, folder(files, "1"))
    held = held_out(*args, **options, checkpoints=rerun)
    assert rerun.loaded == first.saved and rerun.saved == ["held-out-1", "held-out-2"]  # 5 problems of half B
    pd.testing.assert_frame_equal(held.sets, clean.sets)
    pd.testing.assert_frame_equal(held.summary, clean.summary)


def test_attribution_interrupted_redoes_only_the_batches_left(unpacked_models, files):
    """attribute_heads: the baseline and each batch's gradient estimates come back; the estimates and the scan plan
    equal an uninterrupted run's."""
    import pandas as pd

    from codi_attn.heads_run import plan_scan

    problems = [{"id": str(i), "question": q, "answer": g, "solution": s}
                for i, (q, g, s) in enumerate(zip(QUESTIONS, GOLDS, SOLUTIONS))]
    args = (unpacked_models["gpt2"], problems, ("mean", "zero"), ("thoughts",), ("top", 3), 2, 2, 3)
    clean = plan_scan(*args)
    first = DiesAfter(files, folder(files, "1"), saves=2)
    with pytest.raises(Interrupted):
        plan_scan(*args, checkpoints=first)
    assert first.saved == ["baseline", "attribution-0"]
    rerun = Checkpoints(files, folder(files, "1"))
    estimates, groups = plan_scan(*args, checkpoints=rerun)
    assert rerun.loaded == first.saved and rerun.saved == ["attribution-1", "attribution-2"]
    pd.testing.assert_frame_equal(estimates, clean[0], check_exact=True)
    assert groups == clean[1]


def test_a_tasks_own_checkpoint_comes_before_the_origin_runs(files, capsys):
    """Where both the task's own run and the origin run saved `name`, an earlier attempt of this task wins; where the
    own one no longer unpickles, the origin's is read (with the warning) and copied under the own run."""
    Checkpoints(files, folder(files, "1")).save("batch-0", "origin")
    Checkpoints(files, folder(files, "1")).save("batch-1", "origin 1")
    Checkpoints(files, folder(files, "2")).save("batch-0", "own attempt")
    files.put(files.storage.path_join(folder(files, "2"), "batch-1"), b"no pickle")
    resumed = Checkpoints(files, folder(files, "2"), [folder(files, "1")])
    assert resumed.load("batch-0") == "own attempt"
    assert resumed.load("batch-1") == "origin 1" and resumed.loaded == ["batch-0", "batch-1"]
    assert "batch-1" in capsys.readouterr().err
    assert Checkpoints(files, folder(files, "2")).load("batch-1") == "origin 1"


def test_fingerprint_does_not_depend_on_the_order_of_a_dicts_keys():
    """Settings built in another order (a resumed task, another Python) are the same inputs: the same key."""
    assert fingerprint({"n": 1, "seed": 2}, [1]) == fingerprint({"seed": 2, "n": 1}, [1])
    assert fingerprint({"n": 1, "seed": 2}) != fingerprint({"n": 2, "seed": 1})
    assert len(fingerprint({"n": 1})) == 16
