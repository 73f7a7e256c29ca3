"""A KV cache whose layers append in place, for decoding many steps.

transformers' `DynamicLayer.update` concatenates the new positions onto the cached ones,
which copies a layer's whole cache at every decode step: O(S) bytes per step and O(S^2)
over a reply. `GrowingLayer` keeps spare capacity instead (a quarter of the length, at least
32 positions), so a step writes only its new positions and a copy happens once per
quarter-length of growth. From 128 positions on, at most a fifth of the buffer is unused.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

MIN_SPARE = 32  # positions


class GrowingLayer(DynamicLayer):
    """A `DynamicLayer` that appends into spare capacity.

    `keys` and `values` are views of the first `length` positions of larger buffers.
    Assigning them (as `batch_select_indices`, `crop` or a batch merge does) replaces the
    buffers with exactly the assigned tensors, and the next update adds capacity again.
    """

    def __init__(self, **kwargs) -> None:
        self._key_buffer: torch.Tensor | None = None
        self._value_buffer: torch.Tensor | None = None
        # Separate lengths, because callers assign keys and values one after the other and
        # read the values between the two assignments.
        self._key_length = self._value_length = 0
        super().__init__(**kwargs)

    @property
    def keys(self) -> torch.Tensor | None:
        return None if self._key_buffer is None else self._key_buffer[..., :self._key_length, :]

    @keys.setter
    def keys(self, tensor: torch.Tensor | None) -> None:
        self._key_buffer = tensor
        self._key_length = _positions(tensor)

    @property
    def values(self) -> torch.Tensor | None:
        return None if self._value_buffer is None else self._value_buffer[..., :self._value_length, :]

    @values.setter
    def values(self, tensor: torch.Tensor | None) -> None:
        self._value_buffer = tensor
        self._value_length = _positions(tensor)

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        self._key_buffer = self._value_buffer = None
        self._key_length = self._value_length = 0
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
               ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if self._key_length != self._value_length:
            raise RuntimeError(f"cache layer has {self._key_length} key positions but {self._value_length} value "
                               "positions: assign both keys and values before the next update")
        start, end = self._key_length, self._key_length + key_states.shape[-2]
        if self._key_buffer is None or end > self._key_buffer.shape[-2]:
            self._key_buffer = _grow(self._key_buffer, key_states, start, end)
            self._value_buffer = _grow(self._value_buffer, value_states, start, end)
        self._key_buffer[..., start:end, :].copy_(key_states)
        self._value_buffer[..., start:end, :].copy_(value_states)
        self._key_length = self._value_length = end
        return self.keys, self.values

    def reserve(self, shape: tuple[int, int, int], like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Make room for one new position of (B, heads, D) keys and values; return both buffers and its index.

        New buffers take `like`'s dtype and device. For a caller that writes the position itself (a compiled decode step); it then calls
        `advance`. Until then the layer's keys and values do not include the position.
        """
        if not self.is_initialized:
            self.lazy_initialization(like, like)
        if self._key_length != self._value_length:
            raise RuntimeError(f"cache layer has {self._key_length} key positions but {self._value_length} value "
                               "positions: assign both keys and values before the next update")
        start = self._key_length
        if (self._key_buffer is None or self._value_buffer is None or start + 1 > self._key_buffer.shape[-2]
                or start + 1 > self._value_buffer.shape[-2]):
            batch, heads, dim = shape
            template = like.new_empty((batch, heads, 1, dim))
            self._key_buffer = _grow(self._key_buffer, template, start, start + 1)
            self._value_buffer = _grow(self._value_buffer, template, start, start + 1)
        return self._key_buffer, self._value_buffer, start

    def advance(self) -> None:
        """Count the position that the last `reserve` made room for and the caller wrote."""
        end = self._key_length + 1
        if self._key_buffer is None or end > self._key_buffer.shape[-2] or end > self._value_buffer.shape[-2]:
            raise RuntimeError(f"cache layer has no room for position {end - 1}: call reserve before advance")
        self._key_length = self._value_length = end

    def get_seq_length(self) -> int:
        return self._key_length


def _positions(tensor: torch.Tensor | None) -> int:
    return 0 if tensor is None or tensor.ndim < 2 else tensor.shape[-2]


def _grow(buffer: torch.Tensor | None, new: torch.Tensor, length: int, end: int) -> torch.Tensor:
    """Return a buffer for `end` positions plus spare ones, with the first `length` positions of `buffer` copied in."""
    capacity = end + max(MIN_SPARE, end // 4)
    grown = new.new_empty((*new.shape[:-2], capacity, new.shape[-1]))
    if buffer is not None and length:
        grown[..., :length, :].copy_(buffer[..., :length, :])
    return grown


def new_kv_cache(config) -> DynamicCache:
    """Return an empty cache for a model `config`, with `GrowingLayer` for full-attention layers.

    Other layer kinds (sliding-window layers, for example) keep transformers' own classes.
    """
    cache = DynamicCache(config=config)
    cache.layers = [GrowingLayer() if type(layer) is DynamicLayer else layer for layer in cache.layers]
    return cache
