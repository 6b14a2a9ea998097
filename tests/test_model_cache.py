"""Hub model files cached once per run in the datastore (codi_attn.model_cache), against a fake hub: start downloads
each hub id once, and every later shard loads the cached copy without touching the hub."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from codi_attn.datastore import DatastoreFiles
from codi_attn.model import load_codi
from codi_attn.model_cache import cache_model_files, load_cached


@pytest.fixture
def fake_hub(tiny_llama, tmp_path, monkeypatch):
    """huggingface_hub's downloads served from the tiny LLaMA's folders (the base as repo fake/base, the checkpoint as
    fake/ckpt, in a snapshot folder as the hub cache lays them out); returns the list of downloads made."""
    import fnmatch

    import huggingface_hub

    base, ckpt = tiny_llama
    repos = {"fake/base": base, "fake/ckpt": ckpt}
    downloads = []

    def fetch(repo: str, patterns: list[str]) -> Path:
        folder = tmp_path / "hub" / repo.replace("/", "--") / "snapshots" / "0123abcd"
        folder.mkdir(parents=True, exist_ok=True)
        for file in repos[repo].iterdir():
            if any(fnmatch.fnmatch(file.name, p) for p in patterns):
                shutil.copy(file, folder / file.name)
        return folder

    def snapshot(repo, allow_patterns=None, **kwargs):
        downloads.append(repo)
        return str(fetch(repo, allow_patterns or ["*"]))

    def file(repo, filename, **kwargs):
        downloads.append(f"{repo}/{filename}")
        return str(fetch(repo, [filename]) / filename)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", file)
    return downloads


@pytest.fixture
def files(tmp_path) -> DatastoreFiles:
    from metaflow.plugins.datastores.local_storage import LocalStorage

    return DatastoreFiles(LocalStorage(str(tmp_path / ".metaflow")), "AttentionFlow")


def test_second_shard_reads_the_cached_copy(fake_hub, files, tiny_llama, monkeypatch):
    import huggingface_hub

    entry = cache_model_files(files, "17", "fake/base", "fake/ckpt")  # the start step
    assert fake_hub == ["fake/base", "fake/ckpt/model.safetensors"]  # one download each
    assert set(entry) == {"base", "ckpt"} and entry["ckpt"]["names"] == ["model.safetensors"]
    assert "config.json" in entry["base"]["names"]
    assert not any(n.endswith(".safetensors") for n in entry["base"]["names"])  # weights: the checkpoint's only
    assert all(files.exists(p) and "/17/" in p for e in entry.values() for p in e["paths"])

    def offline(*args, **kwargs):
        raise AssertionError("a shard went to the hub")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    base, ckpt = tiny_llama
    direct = load_codi("llama", base=str(base), ckpt=str(ckpt), device="cpu", dtype="float32", prepack=False)
    for _ in range(2):  # two shards
        model = load_cached(files, entry, "llama", "fake/base", "fake/ckpt", device="cpu", dtype="float32",
                            prepack=False)
        assert model.source["base"] == "fake/base" and model.source["ckpt"] == "fake/ckpt"
        assert model.source["cached"] == "datastore"
        for (name, a), b in zip(model.lm.state_dict().items(), direct.lm.state_dict().values()):
            assert torch.equal(a, b), name
        assert model.tokenizer("Tom has 3 apples")["input_ids"] == direct.tokenizer("Tom has 3 apples")["input_ids"]
    assert len(fake_hub) == 2


def test_local_sources_are_not_cached(files, tiny_gpt2):
    base, ckpt = tiny_gpt2
    assert cache_model_files(files, "17", str(base), str(ckpt)) == {}
    model = load_cached(files, {}, "gpt2", str(base), str(ckpt), device="cpu", dtype="float32")
    assert model.source["base"] == str(base) and "cached" not in model.source
