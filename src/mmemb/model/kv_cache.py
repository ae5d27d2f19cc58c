"""A KV cache that appends in place.

transformers' ``DynamicLayer`` concatenates the whole key/value tensors at every decoding step
(O(length) copies per token: a quarter of a decoding step on the tiny backbones). ``GrowingLayer``
keeps them in a buffer with spare room and writes each new token into it; the model sees views
of the filled part. Everything else (cropping, selecting rows) behaves like ``DynamicLayer``.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer


class GrowingLayer(DynamicLayer):
    def __init__(self, reserve: int = 64):
        super().__init__()
        self.reserve = reserve
        self._k: torch.Tensor | None = None
        self._v: torch.Tensor | None = None
        self._n = 0

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if self._k is None:
            # The prefill: keep its tensors as they are. Rows that never decode (an auto-mode
            # batch that decides not to think) then cost no copy; the first append grows the buffer.
            self._k, self._v, self._n = key_states, value_states, key_states.shape[-2]
            self._views()
            return self.keys, self.values
        need = self._n + key_states.shape[-2]
        if need > self._k.shape[-2]:
            self._grow(key_states, value_states, need)
        self._k[..., self._n:need, :] = key_states
        self._v[..., self._n:need, :] = value_states
        self._n = need
        self._views()
        return self.keys, self.values

    def _grow(self, k: torch.Tensor, v: torch.Tensor, need: int) -> None:
        capacity = need + max(self.reserve, need // 2)
        new_k = k.new_empty(*k.shape[:-2], capacity, k.shape[-1])
        new_v = v.new_empty(*v.shape[:-2], capacity, v.shape[-1])
        if self._n:
            new_k[..., :self._n, :] = self._k[..., :self._n, :]
            new_v[..., :self._n, :] = self._v[..., :self._n, :]
        self._k, self._v = new_k, new_v

    def _views(self) -> None:
        self.keys, self.values = self._k[..., :self._n, :], self._v[..., :self._n, :]

    def get_seq_length(self) -> int:
        return self._n if self.is_initialized else 0

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove > 0:
            raise ValueError("crop takes the (negative) number of tokens to remove")
        if tokens_to_remove and self.is_initialized:
            self._n += tokens_to_remove
            self._views()

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.get_seq_length() > 0:
            self._k, self._v = self._k[indices], self._v[indices]
            self._views()

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.get_seq_length() > 0:
            self._k = self._k.repeat_interleave(repeats, dim=0)
            self._v = self._v.repeat_interleave(repeats, dim=0)
            self._views()

    def reset(self) -> None:
        self._k = self._v = None
        self._n = 0
        super().reset()


def new_cache(text_config) -> DynamicCache:
    """A DynamicCache whose layers append in place."""
    cache = DynamicCache(config=text_config)
    cache.layers = [GrowingLayer() for _ in cache.layers]
    return cache
