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
         "head_random_sets": 50, "thought_analysis": True, "thought_group_size": 32,
         "condition_rows": 256, "compare_with": ""}
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
    ({"device": "gpu:x"}, r"^--device: device 'gpu:x': codi-attn runs on the CPU or a CUDA GPU; choose auto, cpu, "
                          r"cuda or cuda:N$"),  # not a torch device
    ({"device": "mps"}, r"^--device: device 'mps': codi-attn runs on the CPU or a CUDA GPU"),  # torch's, not ours
    ({"n_boot": 0, "heads": False}, r"^--n_boot 0 gives no intervals, and the verdicts of --validate, "
                                    r"--thought_analysis \(critical heads"),
    ({"split": "dev"}, r"^--split must be auto or one of train, test, got 'dev'$"),
    ({"n_problems": "1"}, r"^--n_problems: --head_kinds resample feed each problem another problem's head inputs, "
                          r"which needs two problems or more; this run has 1"),
    ({"n_problems": "1", "head_kinds": "mean", "ablation": "resample"}, r"^--n_problems: --ablation resample feed"),
    ({"head_kinds": "resample", "head_positions": "all"}, r"^--head_kinds resample is defined at the thought "
                                                          r"positions only"),
    ({"compare_with": "123456789"}, r"--compare_with: run AttentionFlow/123456789 not found"),
    ({"validate_k": 0}, r"--validate_k and --validate_random must be positive"),
    ({"validate_group_size": 0}, r"--validate_group_size must be a positive integer, got 0"),
    ({"thought_group_size": 0}, r"--thought_group_size must be a positive integer, got 0"),
    ({"ablation": "noise"}, r"--ablation must be one of mean, zero, resample, got 'noise'"),
    ({"ablation": "noise", "validate": False}, r"^--ablation must be one of mean, zero, resample, got 'noise'$"),
    ({"head_scan": "top:9"}, r"^--head_scan top:9 asks for more heads than the model has \(2 x 4 = 8\): give top:M "
                             r"with M from 2 to 8, or all$"),
    ({"ablation_positions": "bot"}, r"--ablation_positions must be one of thoughts, all"),
    ({"ablation": "resample", "ablation_positions": "all"}, r"--ablation resample is defined at the thought"),
    ({"head_kinds": "resample,mean", "head_positions": "all,thoughts"},
     r"^--head_kinds 'resample,mean' with --head_positions 'all,thoughts': the verdict, the critical heads and the "
     r"held-out test take the first kind at the first positions, and resample is not run at all positions"),
    ({"head_scan": "top:1"}, r"^--head_scan top:1 scans fewer heads than the held-out test selects among them: k = 2 "
                             r"\(a quarter of the model's 2 x 4 heads, at most 10\): give top:2 or more, or all$"),
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
    words = _jsonl(tmp_path, "words.jsonl", [good, '{"question": "q?", "answer": "x\\n#### seventy-two"}'])
    with pytest.raises(ValueError, match=r"--dataset: .*words\.jsonl, line 2: the gold answer after '####' is not a "
                                         r"number: 'seventy-two'"):
        settings.check_settings(params(base=base, ckpt=ckpt, dataset=words, n_problems="1"))
    unreadable = tmp_path / "unreadable.jsonl"
    unreadable.write_bytes(b"\xff\xfe\x00")
    with pytest.raises(ValueError, match=r"unreadable\.jsonl cannot be read"):
        settings.check_settings(params(base=base, ckpt=ckpt, dataset=str(unreadable)))
    ok = settings.check_settings(params(base=base, ckpt=ckpt, n_problems="all"))
    assert ok["n"] is None and ok["n_records"] == 7473


def test_held_out_k_and_scanned_combinations_that_work(tiny_gpt2, params):
    """top:k scans enough heads for the held-out test; resample may come first where thoughts do."""
    base, ckpt = map(str, tiny_gpt2)
    ok = settings.check_settings(params(base=base, ckpt=ckpt, head_scan="top:2", head_kinds="resample,mean",
                                        head_positions="thoughts,all"))
    assert ok["head_scan"] == ("top", 2) and ok["head_kinds"] == ("resample", "mean")
    assert settings.check_settings(params(base=base, ckpt=ckpt, head_scan="top:1", heads=False))["heads"] is False
    on, off = (settings.check_settings(params(base=base, ckpt=ckpt, heads=h)) for h in (True, False))
    from codi_attn.runs import setting_differences  # parsed alike with --heads false: one real difference
    assert setting_differences(on, off) == ["--heads True here, False there"]
    scan = settings.check_settings(params(base=base, ckpt=ckpt, head_scan="top:3", head_kinds="mean,zero"))
    assert setting_differences(scan, on) == ["--head_kinds mean,zero here, mean,zero,resample there",
                                             "--head_scan top:3 here, all there"]  # as the parameters are written
    older = {**off, "head_kinds": "mean,zero,resample", "head_positions": "thoughts", "head_scan": "all"}
    assert setting_differences(on, older) == ["--heads True here, False there"]  # a run that kept them unparsed
    llama = '{"model_type": "llama", "num_hidden_layers": 16, "num_attention_heads": 32}'
    assert settings.head_scan_error(("top", 9), llama).startswith("--head_scan top:9 scans fewer heads than the "
                                                                  "held-out test selects among them: k = 10")
    assert settings.head_scan_error(("top", 10), llama) is settings.head_scan_error(("all", None), llama) is None


def test_local_paths_are_stored_absolute(tiny_gpt2, gsm8k_train, params, monkeypatch):
    """Relative --base, --ckpt and --dataset are stored absolute: a resume from another folder finds them (and does
    not take them for hub ids)."""
    import shutil

    base, ckpt = tiny_gpt2
    monkeypatch.chdir(base.parent)
    shutil.copy(gsm8k_train, base.parent / "train.jsonl")
    ok = settings.check_settings(params(base=base.name, ckpt=f"./{ckpt.name}", dataset="train.jsonl"))
    assert (ok["base"], ok["ckpt"], ok["dataset"]) == (str(base), str(ckpt), str(base.parent / "train.jsonl"))


def test_preset_family_must_match_the_base_config(tiny_gpt2, tiny_llama, params):
    """--model gpt2 on a LLaMA base (a GPT-2 checkpoint would fail later with a wall of missing keys)."""
    base = tiny_llama[0]
    with pytest.raises(ValueError) as err:
        settings.check_settings(params(base=str(base), ckpt=str(tiny_gpt2[1])))
    assert str(err.value) == (f"--model/--ckpt/--base: --model gpt2 is a gpt2 CODI model, but {base}/config.json has "
                              f"model_type 'llama': pass --model llama for this base, or a gpt2 --base")


@pytest.mark.parametrize("fmt", ["bin", "safetensors"])
def test_checkpoint_keys_and_shapes_are_checked_in_start(tmp_path, tiny_gpt2, params, fmt):
    """A checkpoint with a key renamed, a tensor of the wrong shape or truncated bytes is refused by check_settings
    (from the file's header: no weight read), with load_codi's message; the unchanged one passes."""
    from codi_attn.fixtures import save_checkpoint
    from codi_attn.model import read_state_dict

    base, state = tiny_gpt2[0], read_state_dict(tiny_gpt2[1])
    good = save_checkpoint(state, tmp_path / "good", fmt=fmt)
    settings.check_settings(params(base=str(base), ckpt=str(good)))
    renamed = {("prj.4.weight" if k == "prj.3.weight" else k): v for k, v in state.items()}
    narrow = {k: (v[:, :-1].contiguous() if k == "prj.1.weight" else v) for k, v in state.items()}
    for name, broken, message in (("renamed", renamed, r"missing keys: 1 \(first: prj\.3\.weight\)"),
                                  ("narrow", narrow, r"wrong shapes: 1 \(first: prj\.1\.weight")):
        ckpt = save_checkpoint(broken, tmp_path / name, fmt=fmt)
        with pytest.raises(ValueError, match=rf"^--model/--ckpt/--base: checkpoint {ckpt}.* does not match the CODI "
                                             rf"model:\n  (.*\n  )?{message}"):
            settings.check_settings(params(base=str(base), ckpt=str(ckpt)))
    cut = tmp_path / "cut" / good.name
    cut.parent.mkdir()
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(ValueError, match=r"cannot be read as .*truncated or not a checkpoint"):
        settings.check_settings(params(base=str(base), ckpt=str(cut.parent)))


def test_checkpoint_dir_with_both_formats_says_which_to_pass(tmp_path, tiny_gpt2, params):
    import shutil

    ckpt = tmp_path / "both"
    shutil.copytree(tiny_gpt2[1], ckpt)
    (ckpt / "model.safetensors").write_bytes(b"")
    with pytest.raises(ValueError) as err:
        settings.check_settings(params(base=str(tiny_gpt2[0]), ckpt=str(ckpt)))
    assert str(err.value) == (f"--model/--ckpt/--base: checkpoint directory {ckpt} holds both model.safetensors and "
                              f"pytorch_model.bin; pass the one to load: --ckpt {ckpt}/model.safetensors or "
                              f"--ckpt {ckpt}/pytorch_model.bin")
    ok = settings.check_settings(params(base=str(tiny_gpt2[0]), ckpt=str(ckpt / "pytorch_model.bin")))
    assert ok["ckpt"] == str(ckpt / "pytorch_model.bin")


@pytest.mark.parametrize("remove, expected", [
    (("tokenizer.json",), "has no tokenizer: expected tokenizer.json, or vocab.json and merges.txt, or "
                          "tokenizer.model"),
    (("config.json",), "has no config.json (the base model's config)"),
])
def test_base_without_tokenizer_or_config_names_the_files(tmp_path, tiny_gpt2, params, remove, expected):
    import shutil

    base = tmp_path / "base"
    shutil.copytree(tiny_gpt2[0], base)
    for name in remove:
        (base / name).unlink()
    with pytest.raises(ValueError) as err:
        settings.check_settings(params(base=str(base), ckpt=str(tiny_gpt2[1])))
    assert str(err.value) == f"--model/--ckpt/--base: base model directory {base} {expected}"


def test_cuda_without_a_gpu_is_refused(monkeypatch, tiny_gpt2, params):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError) as err:
        settings.check_settings(params(base=str(tiny_gpt2[0]), ckpt=str(tiny_gpt2[1]), device="cuda"))
    assert str(err.value) == ("--device: 'cuda' asks for a CUDA GPU and torch sees none here "
                              "(torch.cuda.is_available() is False); use --device cpu, or --device auto (the GPU "
                              "wherever a task has one)")


def test_cuda_index_past_the_gpus_is_refused(monkeypatch, tiny_gpt2, params):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ValueError, match=r"^--device: 'cuda:1': this machine has 1 CUDA GPU\(s\), cuda:0 to cuda:0$"):
        settings.check_settings(params(base=str(tiny_gpt2[0]), ckpt=str(tiny_gpt2[1]), device="cuda:1"))


def test_compare_with_a_run_on_another_sample_is_refused(clean_run, gsm8k_train, params):
    """start computes its own sample's fingerprint and refuses a --compare_with run that sampled other problems,
    naming what differs; the clean run's own sample is accepted."""
    from codi_attn.data import dataset_fingerprint, load_records, sample_problems
    from flowrun import use_datastore

    run, root, (base, ckpt) = clean_run
    use_datastore(root)
    same = params(base=str(base), ckpt=str(ckpt), compare_with=run.id)
    assert settings.check_settings(same)["compare_with"] == run.id
    with pytest.raises(ValueError) as err:
        settings.check_settings({**same, "n_problems": "5"})
    here = dataset_fingerprint(sample_problems(load_records(str(gsm8k_train), "train"), 5))
    assert str(err.value) == (f"--compare_with: run {run.pathspec} has another sample (dataset fingerprint "
                              f"{run.data.dataset_fingerprint[:12]} there, {here[:12]} here): --n_problems 5 here, 6 "
                              f"there")


def test_shard_note_warns_past_metaflows_foreach_limit():
    assert settings.shard_note(100, 50) is None and settings.shard_note(5000, 50) is None
    note = settings.shard_note(7473, 50)
    assert "150 extract tasks" in note and "run --max-num-splits 150" in note and "--shard_size 75" in note


def test_dataset_auto():
    assert settings.resolve_dataset("auto", "demo", "", "") == "synthetic"
    assert settings.resolve_dataset("auto", "demo", "/my/ckpt", "") == "gsm8k"
    assert settings.resolve_dataset("auto", "llama", "", "") == "gsm8k"
    assert settings.resolve_dataset("x.jsonl", "demo", "", "") == "x.jsonl"


@pytest.fixture
def closed_port():
    """A 127.0.0.1 port nothing listens on (bound, then released)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_hub_probe_tells_an_answering_hub_from_a_silent_one(closed_port, monkeypatch):
    import http.server
    import threading

    from huggingface_hub import constants

    from codi_attn.hub import hub_unreachable

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # whatever the shell exports
    hub_unreachable.cache_clear()
    server = http.server.HTTPServer(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler)  # answers 501 to HEAD
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        assert hub_unreachable(f"http://127.0.0.1:{server.server_port}") is None  # any status: it answers
    finally:
        server.shutdown()
        server.server_close()
    why = hub_unreachable(f"http://127.0.0.1:{closed_port}")
    assert why.startswith(f"http://127.0.0.1:{closed_port} does not answer: ConnectError")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    hub_unreachable.cache_clear()
    assert hub_unreachable(f"http://127.0.0.1:{closed_port}").startswith("offline mode is set")
    hub_unreachable.cache_clear()


def test_offline_start_names_every_hub_input_at_once_without_downloading(closed_port, tmp_path, monkeypatch):
    """--model gpt2 with the hub silent and nothing cached: base, checkpoint and dataset each get their line, and
    nothing is attempted that would wait out the hub libraries' retries. With a copy of gsm8k in the datasets
    cache, the dataset is loaded as before (datasets falls back on that copy)."""
    import datasets
    import datasets.config
    from huggingface_hub import constants

    from codi_attn.hub import hub_unreachable

    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{closed_port}")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # whatever the shell exports
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))  # nothing cached
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets")
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: pytest.fail("the dataset was downloaded"))
    hub_unreachable.cache_clear()
    try:
        with pytest.raises(settings.SettingsError) as err:
            settings.check_settings(_settings("gsm8k"))
        lines = str(err.value).splitlines()
        silent = f"http://127.0.0.1:{closed_port} does not answer: ConnectError"
        assert lines[0].startswith("--base: could not load the base model 'openai-community/gpt2' from the "
                                   f"Hugging Face hub (not in the local cache, and {silent}")
        assert lines[0].endswith("pass a local directory instead: --base /path/to/dir")
        assert lines[1].startswith("--ckpt: could not load the checkpoint 'zen-E/CODI-gpt2'")
        assert lines[1].endswith("--ckpt /path/to/dir")
        assert lines[2].startswith(f"--dataset: the GSM8K train split cannot be downloaded ({silent}")
        assert lines[2].endswith("and no copy is cached: pass a local copy of OpenAI's grade-school-math "
                                 "train.jsonl, --dataset /path/to/gsm8k/train.jsonl")
        assert len(lines) == 3
        (tmp_path / "datasets" / "gsm8k" / "main").mkdir(parents=True)  # a cached copy: datasets is asked
        monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: (_ for _ in ()).throw(OSError("asked")))
        with pytest.raises(settings.SettingsError) as err:
            settings.check_settings(_settings("gsm8k"))
        assert str(err.value).splitlines()[2].startswith("--dataset: could not load the GSM8K train split from the "
                                                         "Hugging Face hub (OSError: asked)")
    finally:
        hub_unreachable.cache_clear()
