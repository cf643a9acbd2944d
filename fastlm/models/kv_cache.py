"""KVCache: the keys and values of earlier tokens, kept across the steps of incremental decoding."""

from __future__ import annotations

from torch import Tensor


class AttentionCache:
    """Keys/values of one attention module, (B, Hkv, capacity or S, hd).

    Self-attention writes each token at its own position (rows may hold different lengths, padding at the right),
    so the buffers are allocated once at full capacity and never copied as they grow. Cross-attention keys/values
    are set once from the encoder output and only read afterwards."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.keys: Tensor | None = None
        self.values: Tensor | None = None

    def write(self, keys: Tensor, values: Tensor, positions: Tensor) -> tuple[Tensor, Tensor]:
        """Store (B, Hkv, T, hd) keys/values at (B or 1, T) positions; return the whole buffers."""
        batch, heads, length, head_dim = keys.shape
        if self.keys is None:
            shape = (batch, heads, self.capacity, head_dim)
            self.keys = keys.new_zeros(shape)
            self.values = values.new_zeros(shape)
        slots = positions.expand(batch, length)[:, None, :, None].expand(batch, heads, length, head_dim)
        self.keys.scatter_(2, slots, keys)
        self.values.scatter_(2, slots, values)
        return self.keys, self.values

    def reorder(self, rows: Tensor) -> None:
        if self.keys is not None:
            self.keys = self.keys.index_select(0, rows)
            self.values = self.values.index_select(0, rows)


class KVCache:
    """All attention caches of one model during generation.

    `filled` is False until the first forward (the prompt, whole rows) has stored its keys/values; after that each
    forward brings one token per row. `capacity` bounds the tokens per row (prompt + generated)."""

    def __init__(self, capacity: int):
        if capacity <= 0:
            raise ValueError(f"KVCache capacity = {capacity}: expected a positive number of tokens")
        self.capacity = capacity
        self.filled = False
        self._caches: dict[tuple[int, str], AttentionCache] = {}

    def attention(self, layer: int, kind: str) -> AttentionCache:
        """The cache of layer `layer`'s "self" or "cross" attention (created on first use)."""
        key = (layer, kind)
        if key not in self._caches:
            self._caches[key] = AttentionCache(self.capacity)
        return self._caches[key]

    def reorder(self, rows: Tensor) -> None:
        """Keep rows `rows` (int64 [B']) in this order: beam search moves each beam onto its chosen parent."""
        for cache in self._caches.values():
            cache.reorder(rows)
