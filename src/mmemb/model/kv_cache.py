"""KV caches: one that appends in place (prefill and the eager decoding loop), one of fixed shape
(the compiled decoding step).

transformers' ``DynamicLayer`` concatenates the whole key/value tensors at every decoding step
(O(length) copies per token: a quarter of a decoding step on the tiny backbones). ``GrowingLayer``
keeps them in a buffer with spare room and writes each new token into it; the model sees views
of the filled part. Everything else (cropping, selecting rows) behaves like ``DynamicLayer``.
``StaticKVCache`` holds a prefill's keys and values in buffers sized to the whole decode.
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


class StaticKVCache:
    """Keys and values preallocated for a fixed batch and length, written one slot per decoding step.

    Every tensor keeps its shape and address for the whole decode, which is what lets the decoding
    step be compiled once (no shape changes) and replayed as a CUDA graph (no new addresses).
    ``valid`` marks the slots each row may attend to: its own prompt (left-padded to the longest)
    and every slot decoded so far. ``slot`` (a one-element tensor, so that it is an input of the
    compiled step and not a constant baked into it) is where the next token goes.
    """

    def __init__(self, keys: list[torch.Tensor], values: list[torch.Tensor], valid: torch.Tensor, slot: torch.Tensor):
        self.keys, self.values, self.valid, self.slot = keys, values, valid, slot

    @classmethod
    def like(cls, cache: DynamicCache, batch: int, length: int, zeros: bool = True) -> "StaticKVCache":
        """Buffers shaped like ``cache``'s layers, for ``batch`` rows and ``length`` slots: zeros, or
        left uninitialised for :meth:`copy_rows` (masked slots must still hold finite numbers)."""
        new = torch.zeros if zeros else torch.empty
        keys, values = [], []
        for layer in cache.layers:
            _, heads, _, dim = layer.keys.shape
            like = dict(dtype=layer.keys.dtype, device=layer.keys.device)
            keys.append(new(batch, heads, length, dim, **like))
            values.append(new(batch, heads, length, layer.values.shape[-1], **like))
        device = keys[0].device
        return cls(keys, values, torch.zeros(batch, length, dtype=torch.bool, device=device),
                   torch.zeros(1, dtype=torch.long, device=device))

    @property
    def batch(self) -> int:
        return self.valid.shape[0]

    @property
    def length(self) -> int:
        return self.valid.shape[1]

    def load(self, caches: list[DynamicCache], masks: list[torch.Tensor]) -> None:
        """Copy prefill caches (each left-padded, ``masks`` their attention masks) into the first rows,
        right-aligned so that every row's next token goes to the same slot."""
        prompt = max(m.shape[1] for m in masks)
        if prompt >= self.length:
            raise ValueError(f"prompt of {prompt} tokens does not fit a cache of {self.length} slots")
        self.valid.zero_()
        row = 0
        for cache, mask in zip(caches, masks):
            n, length = mask.shape
            start = prompt - length
            for layer, k, v in zip(cache.layers, self.keys, self.values):
                k[row:row + n, :, start:prompt] = layer.keys[..., :length, :]
                v[row:row + n, :, start:prompt] = layer.values[..., :length, :]
            self.valid[row:row + n, start:prompt] = mask.bool()
            row += n
        self.slot.fill_(prompt)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int):
        """Write this step's key and value at ``slot``; return the layer's whole buffers."""
        keys, values = self.keys[layer_idx], self.values[layer_idx]
        keys.index_copy_(2, self.slot, key_states)
        values.index_copy_(2, self.slot, value_states)
        return keys, values

    def copy_rows(self, other: "StaticKVCache", rows: torch.Tensor) -> None:
        """``other``'s ``rows`` become this cache's first rows (same length); the rest are zeros that
        see nothing. Every slot of every row is written."""
        n = rows.numel()
        for mine, theirs in zip([*self.keys, *self.values, self.valid], [*other.keys, *other.values, other.valid]):
            torch.index_select(theirs, 0, rows, out=mine[:n])  # one pass, no temporary
            mine[n:] = 0
        self.slot.copy_(other.slot)
