"""A preallocated key/value cache: no allocation per decoded token."""

from __future__ import annotations

import torch


class KVCache:
    """Keys and values of every layer, [batch, kv_heads, max_length, head_dim] each.

    All rows share one write position (`length`): generation left-pads prompts to a
    common length, so a batch advances in lockstep and the write is a plain slice.
    """

    def __init__(
        self,
        num_layers: int,
        batch_size: int,
        num_kv_heads: int,
        max_length: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> None:
        shape = (batch_size, num_kv_heads, max_length, head_dim)
        self.keys = [torch.empty(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.empty(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        # The cached tokens' positions (rows are left-padded, so they differ by row): what a
        # layer with a sliding window measures its keys' distance by.
        self.key_positions = torch.zeros(batch_size, max_length, dtype=torch.long, device=device)
        self.length = 0

    @property
    def max_length(self) -> int:
        return self.keys[0].shape[2]

    @property
    def batch_size(self) -> int:
        return self.keys[0].shape[0]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this step's k/v after the cached ones; return all keys/values so far."""
        end = self.length + k.shape[2]
        if end > self.max_length:
            raise ValueError(f"KV cache overflow: {end} > {self.max_length} positions")
        self.keys[layer][:, :, self.length:end] = k
        self.values[layer][:, :, self.length:end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]

    def advance(self, num_tokens: int, positions: torch.Tensor) -> None:
        """Count the `num_tokens` just stored, at `positions` [batch, num_tokens]."""
        self.key_positions[:, self.length:self.length + num_tokens] = positions
        self.length += num_tokens

    def positions(self) -> torch.Tensor:
        """[batch, length]: the positions of the cached tokens."""
        return self.key_positions[:, :self.length]

    def select_rows(self, rows: torch.Tensor) -> None:
        """Keep only `rows` (and their order): drops finished sequences, or repeats a
        prefilled prompt for each of its samples. Copies only the filled part."""
        for cache in (self.keys, self.values):
            for i, layer in enumerate(cache):
                shrunk = layer.new_empty((len(rows),) + layer.shape[1:])
                shrunk[:, :, : self.length] = layer[rows, :, : self.length]
                cache[i] = shrunk
        self.key_positions = self.key_positions[rows]
