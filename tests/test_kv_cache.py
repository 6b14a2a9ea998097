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


def test_storage_hands_back_its_memory_until_a_cache_needs_more_or_another_dtype():
    """take() returns views of the same key and value buffers for as large a cache or a smaller one (memory kept
    from batch to batch), separate buffers per key, and new buffers of the asked dtype and shape otherwise."""
    from codi_attn.kv_cache import KVStorage

    storage, f32 = KVStorage(), torch.zeros(1)
    k, v = storage.take(("batch", 0), f32, (2, 3, 4))
    assert k.shape == v.shape == (2, 3, 4) and k.dtype == torch.float32 and k.data_ptr() != v.data_ptr()
    for shape in ((2, 3, 4), (1, 3, 4)):
        again = storage.take(("batch", 0), f32, shape)
        assert again[0].shape == shape and (again[0].data_ptr(), again[1].data_ptr()) == (k.data_ptr(), v.data_ptr())
    other = storage.take(("batch", 1), f32, (2, 3, 4))
    assert not {other[0].data_ptr(), other[1].data_ptr()} & {k.data_ptr(), v.data_ptr()}
    half = storage.take(("batch", 0), torch.zeros(1, dtype=torch.bfloat16), (2, 3, 4))
    assert half[0].dtype == half[1].dtype == torch.bfloat16 and half[0].shape == (2, 3, 4)
    larger = storage.take(("batch", 0), f32, (3, 3, 4))
    assert larger[0].shape == larger[1].shape == (3, 3, 4) and larger[0].dtype == torch.float32


def test_reserve_takes_more_than_the_capacity_and_rewind_to_the_current_length_is_a_no_op():
    torch.manual_seed(0)
    layer = PreallocatedLayer(capacity=2)
    layer.reserve(torch.zeros(1, 3, 1, 5), batch=2, length=5)
    assert layer.keys.shape == layer.values.shape == (2, 3, 5, 5) and layer.get_seq_length() == 5
    layer.keys.copy_(torch.randn(2, 3, 5, 5))
    prompt = layer.keys.clone()
    new = torch.randn(2, 3, 1, 5)
    keys, _ = layer.update(new, new)
    assert torch.equal(keys[..., :5, :], prompt) and torch.equal(keys[..., 5:, :], new)
    layer.rewind(6)  # already 6 positions: nothing to forget
    assert layer.get_seq_length() == 6 and torch.equal(layer.keys[..., :5, :], prompt)


def test_a_prefill_window_writes_its_rows_in_place_over_several_updates():
    """WindowLayer: rows 1-2 of a 3-row cache of 6 positions, written from column 2: two updates land side by
    side in the parent's buffers (what attention reads is the concatenation), a third that would pass the
    parent's width is refused, and the parent then appends after its width."""
    torch.manual_seed(0)
    parent = PreallocatedLayer(capacity=8)
    window = parent.window(slice(1, 3), 2, 3, 6)
    first, second = (torch.randn(2, 2, n, 4) for n in (3, 1))
    keys, values = window.update(first, -first)
    assert torch.equal(keys, first) and torch.equal(values, -first)
    keys, values = window.update(second, -second)
    assert torch.equal(keys, torch.cat([first, second], -2)) and torch.equal(values, -keys)
    assert parent.get_seq_length() == 6 and parent.keys.shape == (3, 2, 6, 4)
    assert torch.equal(parent.keys[1:3, :, 2:6], keys) and torch.equal(parent.values[1:3, :, 2:6], -keys)
    with pytest.raises(ValueError, match="a prefill window of 4 positions cannot take 1 more"):
        window.update(second, second)
    step = torch.randn(3, 2, 1, 4)
    keys, _ = parent.update(step, step)
    assert keys.shape == (3, 2, 7, 4) and torch.equal(keys[..., 6:, :], step)
    assert torch.equal(keys[1:3, :, 2:6], torch.cat([first, second], -2))
