"""KV caches written in place: room reserved up front, prefill groups writing their rows straight into it, and
the memory kept from run to run on the same model.

On CPU, PyTorch hands freed memory back to the operating system, so a cache allocated per batch pays the first
touch of every page again (the kernel zeroes each one): at GPT-2 shape, batch 24, on a 2-core Xeon VM that was
a fifth of extraction time (48 problems in 8.3 s -> 6.6 s once every batch wrote into the same memory).
"""
from __future__ import annotations

import math
import weakref
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer


class KVStorage:
    """Memory for KV caches: one flat key buffer and one flat value buffer per (role, layer), handed out again to
    every later batch and run (replaced by larger ones when a batch needs more: the largest batch's cache stays
    allocated while the model lives; a cache that outgrows its reserved room mid-batch grows outside it)."""

    def __init__(self):
        self.flat: dict[tuple[str, int], tuple[torch.Tensor, torch.Tensor]] = {}
        self.leased = False

    def take(self, key: tuple[str, int], like: torch.Tensor, shape: tuple[int, ...]
             ) -> tuple[torch.Tensor, torch.Tensor]:
        """Uninitialised (keys, values) of `shape` under `key`, with the dtype and device of `like`."""
        n = math.prod(shape)
        flat = self.flat.get(key)
        if flat is None or flat[0].numel() < n or flat[0].dtype != like.dtype or flat[0].device != like.device:
            self.flat.pop(key, None)  # the old buffers go before the new ones are allocated
            flat = self.flat[key] = (like.new_empty(n), like.new_empty(n))
        return flat[0][:n].view(shape), flat[1][:n].view(shape)

    @contextmanager
    def lease(self) -> Iterator["KVStorage"]:
        """This storage for one run, or a fresh one while another run holds it (e.g. a run started from inside a
        hook): two runs in one thread never write into the same buffers. Not for runs in parallel threads on one
        model (they would need a lock here)."""
        if self.leased:
            yield KVStorage()
            return
        self.leased = True
        try:
            yield self
        finally:
            self.leased = False


_STORAGE: "weakref.WeakKeyDictionary[nn.Module, KVStorage]" = weakref.WeakKeyDictionary()


def kv_storage(lm: nn.Module) -> KVStorage:
    """The KV memory of the causal LM `lm`, kept as long as `lm` is alive."""
    storage = _STORAGE.get(lm)
    if storage is None:
        storage = _STORAGE[lm] = KVStorage()
    return storage


class PreallocatedLayer(DynamicLayer):
    """A DynamicLayer that writes new positions into buffers of `capacity` positions reserved at the first update.

    transformers' DynamicLayer concatenates (copies) the whole cache at every step; with a few hundred prompt
    positions and one new position per thought or decode step, that copy dominated those steps on CPU.
    `keys`/`values` are views of the used part, so everything that reads the cache sees a DynamicLayer.
    The buffers come from `storage` (under `key`) where given; they grow (one copy) if a batch needs more than
    `capacity` positions; `rewind` forgets positions; `window` lets a prefill group write its rows in place.
    """

    def __init__(self, capacity: int, storage: KVStorage | None = None, key: tuple[str, int] = ("batch", 0)):
        super().__init__()
        self.capacity, self.used = capacity, 0
        self.storage, self.key = storage, key
        self.buffers: tuple[torch.Tensor, torch.Tensor] | None = None

    def _unsupported(self, *args, **kwargs):
        raise NotImplementedError("PreallocatedLayer only appends positions or rewinds (crop, reset and batch "
                                  "reordering would leave its buffers stale)")

    crop = reset = batch_repeat_interleave = batch_select_indices = _unsupported

    def reserve(self, like: torch.Tensor, batch: int, length: int) -> None:
        """Start with `length` positions of uninitialised keys and values for `batch` rows, with the heads,
        head size, dtype and device of `like` [*, H, *, D]: the caller fills them in place through `keys` /
        `values` or `window` (no zero-filled copy of the whole width)."""
        self.lazy_initialization(like, like)
        shape = (batch, *like.shape[1:-2], max(self.capacity, length), like.shape[-1])
        self.buffers = self.storage.take(self.key, like, shape) if self.storage is not None \
            else (like.new_empty(shape), like.new_empty(shape))
        self._view(length)

    def _view(self, used: int) -> None:
        self.used = used
        self.keys, self.values = (buffer[..., :used, :] for buffer in self.buffers)

    def rewind(self, length: int) -> None:
        """Keep only the first `length` positions (their keys and values are untouched)."""
        if length > self.used:
            raise ValueError(f"cannot rewind {self.used} cached positions to {length}")
        self._view(length)

    def window(self, rows: slice, start: int, batch: int, length: int) -> "WindowLayer":
        """A cache layer for a forward of rows `rows` that writes their new positions into this layer's buffers
        from column `start` on; the buffers are reserved at its first update (`batch` rows, `length` used)."""
        return WindowLayer(self, rows, start, batch, length)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if self.buffers is None:
            self.reserve(key_states, key_states.shape[0], 0)
        n = key_states.shape[-2]
        if self.used + n > self.buffers[0].shape[-2]:
            size = 2 * (self.used + n)
            grown = tuple(t.new_empty(*t.shape[:-2], size, t.shape[-1]) for t in self.buffers)
            for new, old in zip(grown, self.buffers):
                new[..., : self.used, :] = old[..., : self.used, :]
            self.buffers = grown
        for buffer, new in zip(self.buffers, (key_states, value_states)):
            buffer[..., self.used: self.used + n, :] = new
        self._view(self.used + n)
        return self.keys, self.values


class WindowLayer(DynamicLayer):
    """The cache layer of one prefill group: rows `rows` of a PreallocatedLayer's buffers from column `start`,
    written in place (the group's keys and values are never copied into the batch cache afterwards)."""

    def __init__(self, parent: PreallocatedLayer, rows: slice, start: int, batch: int, length: int):
        super().__init__()
        self.parent, self.rows, self.start, self.batch, self.length = parent, rows, start, batch, length
        self.used = 0

    _unsupported = PreallocatedLayer._unsupported
    crop = reset = batch_repeat_interleave = batch_select_indices = _unsupported

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if self.parent.buffers is None:
            self.parent.reserve(key_states, self.batch, self.length)
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        n, at = key_states.shape[-2], self.start + self.used
        if at + n > self.parent.used:
            raise ValueError(f"a prefill window of {self.parent.used - self.start} positions cannot take {n} more")
        views = tuple(buffer[self.rows, ..., self.start: at + n, :] for buffer in self.parent.buffers)
        for view, new in zip(views, (key_states, value_states)):
            view[..., self.used:, :] = new
        self.used += n
        self.keys, self.values = views
        return self.keys, self.values


def preallocated_cache(config, capacity: int, storage: KVStorage | None = None, role: str = "batch"
                       ) -> DynamicCache:
    """A DynamicCache for `config` whose layers reserve `capacity` positions (`PreallocatedLayer`), in the
    buffers `storage` keeps for `role` where given (caches alive at the same time need different roles)."""
    cache = DynamicCache(config=config)
    kinds = {type(layer).__name__ for layer in cache.layers}
    if kinds != {"DynamicLayer"}:  # e.g. sliding windows, which drop old keys: the join would misalign
        raise NotImplementedError(f"{config.model_type} asks for KV cache layers {sorted(kinds)}; the runner "
                                  "supports full-attention models (plain DynamicLayer) only")
    cache.layers = [PreallocatedLayer(capacity, storage, (role, i)) for i in range(len(cache.layers))]
    return cache
