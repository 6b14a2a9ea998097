"""Run settings (codi_attn.settings): every parameter checked in start, one line per problem, naming it."""
from __future__ import annotations

import subprocess
import sys

import pytest

from codi_attn import settings


def test_importing_settings_does_not_import_torch():
    """start's checks are cheap to import: torch comes only when a device is checked."""
    code = "import sys, codi_attn.settings; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


@pytest.fixture
def params(gsm8k_train):
    """The flow's parameters as start passes them to check_settings, on the GSM8K train file."""
    def make(**overrides):
        return _settings(gsm8k_train, **overrides)

    return make


def _settings(train_file, **overrides):
    p = {"model": "gpt2", "ckpt": "", "base": "", "dataset": str(train_file), "split": "train", "n_problems": "6",
         "seed": 42, "shard_size": 4, "batch_size": 2, "max_new_tokens": 4, "device": "cpu", "dtype": "float32",
         "max_failed_fraction": 0.1, "n_boot": 10, "validate": True, "validate_k": 2, "validate_random": 1,
         "validate_group_size": 8, "ablation": "mean", "ablation_positions": "thoughts", "heads": True,
         "head_kinds": "mean,zero,resample", "head_positions": "thoughts", "head_scan": "all", "head_group_size": 32,
         "head_random_sets": 50, "thought_analysis": True, "condition_rows": 256, "compare_with": ""}
    return {**p, **overrides}


def _jsonl(tmp_path, name, lines):
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n")
    return str(path)


@pytest.mark.parametrize("overrides, message", [
    ({"n_problems": "7474"}, r"n_problems=7474 is larger than the split, which has 7473"),
    ({"shard_size": 0}, r"--shard_size must be a positive integer, got 0"),
    ({"shard_size": -3}, r"--shard_size must be a positive integer"),
    ({"batch_size": 0}, r"--batch_size must be a positive integer"),
    ({"max_failed_fraction": 1.5}, r"--max_failed_fraction must be between 0 and 1"),
    ({"dataset": "/nonexistent/train.jsonl"}, r"dataset file /nonexistent/train\.jsonl does not exist"),
    ({"model": "bert"}, r"--model: unknown preset 'bert'"),
    ({"ckpt": "/nonexistent/ckpt"}, r"checkpoint directory not found: /nonexistent/ckpt"),
    ({"dtype": "int8"}, r"--dtype: unknown dtype 'int8'"),
    ({"device": "gpu:x"}, r"--device: "),
    ({"split": "dev"}, r"--dataset: split must be one of train, test"),
    ({"compare_with": "123456789"}, r"--compare_with: run AttentionFlow/123456789 not found"),
    ({"validate_k": 0}, r"--validate_k and --validate_random must be positive"),
    ({"validate_group_size": 0}, r"--validate_group_size must be a positive integer, got 0"),
    ({"ablation": "noise"}, r"--ablation must be one of mean, zero, resample, got 'noise'"),
    ({"ablation_positions": "bot"}, r"--ablation_positions must be one of thoughts, all"),
    ({"ablation": "resample", "ablation_positions": "all"}, r"--ablation resample is defined at the thought"),
])
def test_check_settings_messages(overrides, message, tiny_gpt2, params):
    base, ckpt = tiny_gpt2
    with pytest.raises(ValueError, match=message):
        settings.check_settings(params(**{"base": str(base), "ckpt": str(ckpt), **overrides}))


def test_check_settings_reports_every_problem(tiny_gpt2, params):
    with pytest.raises(ValueError) as err:
        settings.check_settings(params(ckpt="/nonexistent/ckpt", shard_size=0, n_problems="9999"))
    lines = str(err.value).splitlines()
    assert lines == ["--shard_size must be a positive integer, got 0",
                     "--model/--ckpt/--base: checkpoint directory not found: /nonexistent/ckpt",
                     "--n_problems: n_problems=9999 is larger than the split, which has 7473 problems "
                     "(use 0 or 'all' for the whole split)"]


def test_check_settings_bad_files(tmp_path, tiny_gpt2, params):
    base, ckpt = map(str, tiny_gpt2)
    good = '{"question": "q?", "answer": "x\\n#### 1"}'
    bad_line = _jsonl(tmp_path, "bad.jsonl", [good, good, '{"question": '])
    with pytest.raises(ValueError, match=r"bad\.jsonl, line 3: malformed JSON"):
        settings.check_settings(params(base=base, ckpt=ckpt, dataset=bad_line, n_problems="1"))
    no_answer = _jsonl(tmp_path, "noanswer.jsonl", [good, '{"question": "q?"}'])
    with pytest.raises(ValueError, match=r"noanswer\.jsonl, line 2: record has no 'answer' key"):
        settings.check_settings(params(base=base, ckpt=ckpt, dataset=no_answer, n_problems="1"))
    unreadable = tmp_path / "unreadable.jsonl"
    unreadable.write_bytes(b"\xff\xfe\x00")
    with pytest.raises(ValueError, match=r"unreadable\.jsonl cannot be read"):
        settings.check_settings(params(base=base, ckpt=ckpt, dataset=str(unreadable)))
    ok = settings.check_settings(params(base=base, ckpt=ckpt, n_problems="all"))
    assert ok["n"] is None and ok["n_records"] == 7473


def test_shard_note_warns_past_metaflows_foreach_limit():
    assert settings.shard_note(100, 50) is None and settings.shard_note(5000, 50) is None
    note = settings.shard_note(7473, 50)
    assert "150 extract tasks" in note and "run --max-num-splits 150" in note and "--shard_size 75" in note


def test_dataset_auto():
    assert settings.resolve_dataset("auto", "demo", "", "") == "synthetic"
    assert settings.resolve_dataset("auto", "demo", "/my/ckpt", "") == "gsm8k"
    assert settings.resolve_dataset("auto", "llama", "", "") == "gsm8k"
    assert settings.resolve_dataset("x.jsonl", "demo", "", "") == "x.jsonl"
