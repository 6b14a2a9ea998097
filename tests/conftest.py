"""Shared fixtures: tiny CODI models in the release layout, built once per test session."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("USERNAME", "codi-attn-tests")  # Metaflow refuses to run as root without it

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
GSM8K_TRAIN = SHARED / "data" / "gsm8k" / "train.jsonl"


@pytest.fixture(scope="session")
def tiny_gpt2(tmp_path_factory) -> tuple[Path, Path]:
    """(base_dir, ckpt_dir) of a tiny GPT-2-style CODI with LoRA, saved as pytorch_model.bin."""
    from codi_attn.fixtures import build_tiny_codi

    return build_tiny_codi(tmp_path_factory.mktemp("tiny_gpt2"), "gpt2", seed=0)


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> tuple[Path, Path]:
    """(base_dir, ckpt_dir) of a tiny LLaMA-style CODI (GQA, BOS) with LoRA, saved as model.safetensors."""
    from codi_attn.fixtures import build_tiny_codi

    return build_tiny_codi(tmp_path_factory.mktemp("tiny_llama"), "llama", seed=1, fmt="safetensors")


@pytest.fixture(scope="session")
def gpt2_model(tiny_gpt2):
    from codi_attn.model import load_codi

    base, ckpt = tiny_gpt2
    return load_codi("gpt2", base=str(base), ckpt=str(ckpt), device="cpu", dtype="float32")


@pytest.fixture(scope="session")
def llama_model(tiny_llama):
    from codi_attn.model import load_codi

    base, ckpt = tiny_llama
    return load_codi("llama", base=str(base), ckpt=str(ckpt), device="cpu", dtype="float32")


@pytest.fixture(scope="session")
def unpacked_models(tiny_gpt2, tiny_llama) -> dict:
    """{family: the tiny model with PyTorch's linear layers}: readable `.weight`s, copyable (the loader's
    default packs them for oneDNN on CPU float32)."""
    from codi_attn.model import load_codi

    return {family: load_codi(family, base=str(base), ckpt=str(ckpt), device="cpu", dtype="float32", prepack=False)
            for family, (base, ckpt) in (("gpt2", tiny_gpt2), ("llama", tiny_llama))}


@pytest.fixture(params=["gpt2", "llama"])
def any_model(request):
    """Each tiny model family in turn."""
    return request.getfixturevalue(f"{request.param}_model")
