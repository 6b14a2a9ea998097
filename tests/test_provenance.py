"""codi_attn.provenance: the input files of a run fingerprinted in start, the same files recorded by load_codi, and
the check every model-loading task makes (the flow-level case, a resume after the checkpoint was replaced, is in
tests/test_flow.py)."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import pytest

from codi_attn import provenance
from codi_attn.model import load_codi
from codi_attn.provenance import ProvenanceError, check_dataset, check_files, pin_files, run_provenance


def _settings(base, ckpt, dataset, model="gpt2") -> dict:
    return {"model": model, "base": str(base), "ckpt": str(ckpt), "dataset": str(dataset)}


def test_fingerprint_streams_the_whole_file(tmp_path, monkeypatch):
    monkeypatch.setattr(provenance, "CHUNK", 7)  # many chunks and a short last one
    path = tmp_path / "blob"
    path.write_bytes(bytes(range(256)) * 3)
    assert provenance.fingerprint(path) == {"path": str(path), "size": 768,
                                            "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}


def test_run_provenance_of_local_files_and_what_load_codi_read(tiny_gpt2, gsm8k_train):
    """start's fingerprints are exactly the files, sizes and hashes load_codi records in source['files']."""
    base, ckpt = tiny_gpt2
    prov = run_provenance(_settings(base, ckpt, gsm8k_train))
    assert prov["ckpt"]["where"] == prov["base"]["where"] == prov["dataset"]["where"] == "local"
    weights = prov["ckpt"]["files"]["pytorch_model.bin"]
    assert weights == {"path": str(ckpt / "pytorch_model.bin"), "size": (ckpt / "pytorch_model.bin").stat().st_size,
                       "sha256": hashlib.sha256((ckpt / "pytorch_model.bin").read_bytes()).hexdigest()}
    assert set(prov["base"]["files"]) == {"config.json", "tokenizer.json", "tokenizer_config.json"}
    assert prov["dataset"]["files"]["train.jsonl"]["path"] == str(gsm8k_train)
    model = load_codi("gpt2", base=str(base), ckpt=str(ckpt), device="cpu", dtype="float32", prepack=False)
    assert model.source["files"] == {"base": prov["base"]["files"], "ckpt": prov["ckpt"]["files"]}
    check_files(prov, model.source["files"], "extract 1/2")  # the same files pass


def test_an_input_that_cannot_be_read_is_named_with_its_parameter(tiny_gpt2, tmp_path):
    """start fingerprints every input: one it cannot read (here a folder where the dataset file should be) is one
    message naming the parameter, the path and why."""
    folder = tmp_path / "train.jsonl"
    folder.mkdir()
    with pytest.raises(ProvenanceError) as err:
        run_provenance(_settings(*tiny_gpt2, folder))
    assert str(err.value) == f"--dataset: cannot read {folder} to fingerprint it: Is a directory"


def test_hub_ids_resolve_to_the_cached_revision(hub_cache, gsm8k_train):
    cache, revision = hub_cache
    prov = run_provenance(_settings("codi-test/base", "codi-test/ckpt", gsm8k_train))
    assert prov["base"]["where"] == prov["ckpt"]["where"] == (f"local hub cache, revision {revision} (found without "
                                                              f"network)")
    assert prov["ckpt"]["files"]["pytorch_model.bin"]["path"] == str(
        cache / "models--codi-test--ckpt" / "snapshots" / revision / "pytorch_model.bin")
    (cache / "models--codi-test--ckpt" / ".no_exist" / revision / "model.safetensors").unlink()
    unknown = run_provenance(_settings("codi-test/base", "codi-test/ckpt", gsm8k_train))
    assert unknown["ckpt"]["files"] is None
    assert unknown["ckpt"]["where"].startswith("hub id not in the local hub cache at start")


def test_load_from_the_hub_cache_offline_records_the_cached_files(hub_cache, gsm8k_train):
    """load_codi on hub ids, offline, reads the cached snapshot; what it records equals start's fingerprints."""
    cache, _ = hub_cache
    code = ("import json; from codi_attn.model import load_codi; "
            "m = load_codi('gpt2', base='codi-test/base', ckpt='codi-test/ckpt', device='cpu', prepack=False); "
            "print(json.dumps(m.source['files']))")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    prov = run_provenance(_settings("codi-test/base", "codi-test/ckpt", gsm8k_train))
    assert json.loads(out.stdout.splitlines()[-1]) == {"base": prov["base"]["files"], "ckpt": prov["ckpt"]["files"]}


@pytest.fixture
def run_prov(tiny_gpt2, gsm8k_train):
    return run_provenance(_settings(*tiny_gpt2, gsm8k_train))


def _loaded(prov: dict) -> dict:
    return {"base": {k: dict(v) for k, v in prov["base"]["files"].items()},
            "ckpt": {k: dict(v) for k, v in prov["ckpt"]["files"].items()}}


def test_changed_file_is_named_with_what_to_do(run_prov):
    now = _loaded(run_prov)
    now["ckpt"]["pytorch_model.bin"]["sha256"] = "f" * 64
    with pytest.raises(ProvenanceError) as err:
        check_files(run_prov, now, "AttentionFlow/7/extract/12")
    lines = str(err.value).splitlines()
    path, then = now["ckpt"]["pytorch_model.bin"]["path"], run_prov["ckpt"]["files"]["pytorch_model.bin"]["sha256"]
    assert lines[0] == "AttentionFlow/7/extract/12: the model files differ from those this run started with:"
    assert lines[1] == (f"  checkpoint file {path} changed since the run started (sha256 {then[:12]}... then, "
                        f"ffffffffffff... now)")
    assert len(lines) == 3 and "start a new run (`run` instead of `resume`)" in lines[2]


def test_new_and_missing_files_are_named(run_prov):
    now = _loaded(run_prov)
    gone = now["base"].pop("tokenizer_config.json")
    now["base"]["vocab.json"] = {"path": "/b/vocab.json", "size": 1, "sha256": "0" * 64}
    with pytest.raises(ProvenanceError) as err:
        check_files(run_prov, now, "scan_heads")
    message = str(err.value)
    assert f"base model file {gone['path']} was read when the run started and is not there now" in message
    assert "base model file /b/vocab.json is read now but was not there when the run started" in message


def test_pin_files_pins_what_start_could_not_find_and_checks_every_shard(run_prov):
    """A hub id start could not find offline: the first shard's files are pinned; a shard that read others
    (the hub moved on between tasks) stops the join, named."""
    unpinned = {**run_prov, "ckpt": {**run_prov["ckpt"], "files": None}}
    first, other = _loaded(run_prov), _loaded(run_prov)
    other["ckpt"]["pytorch_model.bin"]["sha256"] = "e" * 64
    pinned = pin_files(unpinned, [("shard 1", first), ("shard 2", first)])
    assert pinned["ckpt"]["files"] == first["ckpt"] and unpinned["ckpt"]["files"] is None
    with pytest.raises(ProvenanceError, match=r"^shard 2: the model files differ"):
        pin_files(unpinned, [("shard 1", first), ("shard 2", other)])
    check_files(unpinned, other, "extract 1/2")  # nothing pinned yet: an extract task has nothing to check against


def test_a_changed_or_missing_dataset_file_is_named_with_both_hashes(tiny_gpt2, tmp_path):
    """sample, rerun by a resume, reads the dataset again: an edited record or a file gone stops it, named."""
    data = tmp_path / "train.jsonl"
    data.write_text('{"question": "What is 2 plus 2?", "answer": "2+2=4\\n#### 4"}\n')
    prov = run_provenance(_settings(*tiny_gpt2, data))
    check_dataset(prov, "AttentionFlow/7/sample/2")  # unchanged: nothing to say
    then = prov["dataset"]["files"]["train.jsonl"]["sha256"]
    data.write_text('{"question": "What is 2 plus 3?", "answer": "2+3=5\\n#### 5"}\n')
    now = hashlib.sha256(data.read_bytes()).hexdigest()
    with pytest.raises(ProvenanceError) as err:
        check_dataset(prov, "AttentionFlow/7/sample/2")
    lines = str(err.value).splitlines()
    assert lines[:2] == ["AttentionFlow/7/sample/2: the dataset file differs from the one this run started with:",
                         f"  dataset file {data} changed since the run started (sha256 {then[:12]}... then, "
                         f"{now[:12]}... now)"]
    data.unlink()
    with pytest.raises(ProvenanceError, match=f"dataset file {data} was read when the run started and is not there"):
        check_dataset(prov, "sample")
    check_dataset({**prov, "dataset": {"source": "gsm8k", "where": "hub", "files": None}}, "sample")


def test_a_source_found_nowhere_by_the_task_is_not_checked(run_prov):
    """A role whose files the task could not fingerprint (None in source['files']) has nothing to compare; the
    other roles are still checked."""
    now = _loaded(run_prov)
    check_files(run_prov, {"base": now["base"], "ckpt": None}, "extract 1/2")
    now["base"]["config.json"]["sha256"] = "a" * 64
    with pytest.raises(ProvenanceError, match=r"base model file .*config\.json changed since the run started"):
        check_files(run_prov, {"base": now["base"], "ckpt": None}, "extract 1/2")
