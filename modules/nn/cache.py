"""A static, preallocated key/value cache for incremental decoding."""

from __future__ import annotations

import torch

from modules.nn.config import DecoderConfig


class KVCache:
    """Keys and values of every layer in fixed buffers of `max_len` slots, (n_layer, B, n_kv, max_len, hs).

    Slot t holds the t-th token fed to the model for every row; rows of different lengths are
    left-padded, and `valid` (B, max_len) marks the slots that hold real tokens. Attention reads
    all `max_len` slots under a mask, so every decode step has the same shapes (graph-capturable).
    """

    def __init__(self, config: DecoderConfig, batch: int, max_len: int, device: torch.device, dtype: torch.dtype) -> None:
        if max_len > config.block_size:
            raise ValueError(f"cache of {max_len} slots exceeds the model's block_size {config.block_size}")
        shape = (config.n_layer, batch, config.kv_heads, max_len, config.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.valid = torch.zeros(batch, max_len, dtype=torch.bool, device=device)
        self.length = 0  # slots filled so far
        self.max_len = max_len

    def attention_mask(self, valid: torch.Tensor) -> torch.Tensor:
        """Mark `valid` (B, T) for the next T slots; mask (B, 1, T, max_len): causal over slots, no padding."""
        T = valid.shape[1]
        if self.length + T > self.max_len:
            raise ValueError(f"cache full: {self.length} + {T} tokens > {self.max_len} slots")
        self.valid[:, self.length : self.length + T] = valid
        slots = torch.arange(self.max_len, device=valid.device)
        queries = torch.arange(self.length, self.length + T, device=valid.device)
        causal = slots[None, :] <= queries[:, None]  # (T, max_len)
        itself = slots[None, :] == queries[:, None]  # a padding slot sees itself, so no row is all -inf (NaN)
        return ((causal[None] & self.valid[:, None, :]) | itself[None])[:, None]  # (B, 1, T, max_len)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, n_kv, T, hs) at the next T slots of `layer`; return that layer's full buffers."""
        T = k.shape[2]
        self.k[layer, :, :, self.length : self.length + T] = k
        self.v[layer, :, :, self.length : self.length + T] = v
        return self.k[layer], self.v[layer]

    def advance(self, n: int) -> None:
        self.length += n
