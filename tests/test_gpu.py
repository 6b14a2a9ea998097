"""The CUDA path: same attention as on the CPU, batch == batch-of-one, bf16 sane, hooks and the shared prefill
bit for bit. Skipped without a GPU."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from codi_attn.extract import extract
from codi_attn.model import load_codi

from reference import QUESTIONS

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(params=["gpt2", "llama"])
def family_dirs(request):
    return request.param, request.getfixturevalue(f"tiny_{request.param}")


def test_cuda_fp32_matches_cpu_and_batching(family_dirs):
    family, (base, ckpt) = family_dirs
    cpu = load_codi(family, base=str(base), ckpt=str(ckpt), device="cpu", dtype="float32")
    gpu = load_codi(family, base=str(base), ckpt=str(ckpt), device="cuda", dtype="float32")
    on_cpu = extract(cpu, QUESTIONS, batch_size=4, max_new_tokens=4)
    batched = extract(gpu, QUESTIONS, batch_size=4, max_new_tokens=4)
    np.testing.assert_allclose(batched.attention, on_cpu.attention, atol=1e-3)
    for k, question in enumerate(QUESTIONS):
        single = extract(gpu, [question], max_new_tokens=4)
        np.testing.assert_allclose(batched.attention[k], single.attention[0], atol=1e-4)


def test_cuda_bf16_default(family_dirs):
    family, (base, ckpt) = family_dirs
    model = load_codi(family, base=str(base), ckpt=str(ckpt))
    assert model.dtype == torch.bfloat16 and model.device.type == "cuda"
    ex = extract(model, QUESTIONS, batch_size=4, max_new_tokens=4)
    assert np.isfinite(ex.attention).all()
    np.testing.assert_allclose(ex.mass.sum(-1), 1.0, atol=2e-2)
    assert np.all(ex.attention[..., np.triu_indices(6, 1)[0], np.triu_indices(6, 1)[1]] == 0)


def test_cuda_hooks_and_shared_prefill_bit_for_bit(family_dirs):
    """On the GPU too: a no-op ablation and a reused prefill reproduce the plain run exactly."""
    from codi_attn.ablation import AblateHeads
    from codi_attn.hooks import RecordThoughts
    from codi_attn.runner import Runner

    family, (base, ckpt) = family_dirs
    model = load_codi(family, base=str(base), ckpt=str(ckpt), device="cuda")
    runner = Runner(model, batch_size=4, max_new_tokens=4)
    plain, noop = RecordThoughts(len(QUESTIONS)), RecordThoughts(len(QUESTIONS))
    first, second = runner.run_conditions(QUESTIONS, [[plain], [AblateHeads(model, ()), noop]])
    np.testing.assert_array_equal(first.tokens, second.tokens)
    np.testing.assert_array_equal(plain.hidden, noop.hidden)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_cuda_padded_prefill_rows_stay_finite(family_dirs, dtype, monkeypatch):
    """All questions in one left-padded prefill forward, so the pad positions' queries see no key at all: CUDA's
    sdpa kernels must not turn those rows into NaN keys and values that later real queries read (at weight 0,
    0 x NaN is still NaN). Batched equals one at a time, where nothing is padded."""
    import codi_attn.runner as runner

    family, (base, ckpt) = family_dirs
    monkeypatch.setattr(runner, "prefill_groups", lambda lengths: [list(range(len(lengths)))])
    model = load_codi(family, base=str(base), ckpt=str(ckpt), device="cuda", dtype=dtype)
    batched = extract(model, QUESTIONS, batch_size=len(QUESTIONS), max_new_tokens=4)
    assert np.isfinite(batched.attention).all() and np.isfinite(batched.mass).all()
    for k, question in enumerate(QUESTIONS):
        single = extract(model, [question], max_new_tokens=4)
        np.testing.assert_allclose(batched.attention[k], single.attention[0], atol=1e-4 if dtype == "float32" else 3e-2)
