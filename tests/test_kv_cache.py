"""The KV cache of codi_attn.kv_cache: preallocated layers against transformers' own, what they refuse."""
from __future__ import annotations

import pytest
import torch

from codi_attn.kv_cache import PreallocatedLayer, preallocated_cache


def test_preallocated_layer_equals_concatenation_grows_and_rewinds():
    """Writing into reserved room (and growing past it) gives exactly what DynamicLayer's torch.cat gives;
    rewinding keeps the first positions untouched."""
    from transformers.cache_utils import DynamicLayer

    torch.manual_seed(0)
    room, plain = PreallocatedLayer(capacity=6), DynamicLayer()
    for n in (4, 1, 1, 3, 1):  # prefill, then one-position steps; 4 + 1 + 1 exactly fills, 3 more must grow
        k, v = torch.randn(2, 3, n, 5), torch.randn(2, 3, n, 5)
        got, want = room.update(k, v), plain.update(k, v)
        for a, b in zip(got, want):
            assert torch.equal(a, b)
        assert room.get_seq_length() == plain.get_seq_length()
    assert room.buffers[0].shape[-2] >= 10
    prompt = room.keys[..., :4, :].clone()
    room.rewind(4)
    assert room.get_seq_length() == 4 and torch.equal(room.keys, prompt)
    with pytest.raises(ValueError, match="cannot rewind"):
        room.rewind(5)


def test_preallocated_layer_refuses_what_would_leave_it_stale():
    layer = PreallocatedLayer(capacity=4)
    layer.update(torch.zeros(1, 1, 2, 3), torch.zeros(1, 1, 2, 3))
    for call in (lambda: layer.crop(-1), layer.reset, lambda: layer.batch_select_indices(torch.tensor([0]))):
        with pytest.raises(NotImplementedError, match="only appends"):
            call()


def test_sliding_window_models_are_refused():
    from transformers import MistralConfig

    with pytest.raises(NotImplementedError, match="full-attention models"):
        preallocated_cache(MistralConfig(sliding_window=4, num_hidden_layers=2), 8)
