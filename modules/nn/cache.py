"""A static, preallocated key/value cache for incremental decoding."""

from __future__ import annotations

import torch

from modules.nn.config import DecoderConfig


class KVCache:
    """Keys and values of every layer in fixed buffers of `max_len` slots, one (B, n_kv, max_len, hs) per layer.

    Slot t holds the t-th token fed to the model for every row; rows of different lengths are
    left-padded, and `valid` (B, max_len) marks the slots that hold real tokens. Attention reads
    all `max_len` slots under a mask, so every decode step has the same shapes (graph-capturable).
    Each layer's buffer is its own tensor, not a view of one, so a compiled step mutates whole
    inputs in place.
    """

    def __init__(self, config: DecoderConfig, batch: int, max_len: int, device: torch.device, dtype: torch.dtype) -> None:
        if max_len > config.block_size:
            raise ValueError(f"cache of {max_len} slots exceeds the model's block_size {config.block_size}")
        shape = (batch, config.kv_heads, max_len, config.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
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
        self.k[layer][:, :, self.length : self.length + T] = k
        self.v[layer][:, :, self.length : self.length + T] = v
        return self.k[layer], self.v[layer]

    def advance(self, n: int) -> None:
        self.length += n

    def truncate(self, length: int) -> None:
        """Forget every slot from `length` on (a rejected speculative draft); the next token goes to slot `length`."""
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot truncate a cache of {self.length} filled slots to {length}")
        self.valid[:, length:] = False
        self.length = length

    def reset(self) -> None:
        """Empty the cache in place, keeping its buffers (a graph captured over them stays valid)."""
        self.valid.zero_()
        self.length = 0


class SlotCache:
    """A `KVCache` written one token per row at the slot held in the device tensor `slot` (1,).

    `KVCache.update` slices at the Python int `length`, so each position is a different program.
    Here no index is a host value: a decode step through this view runs the same kernels with
    the same arguments at every position, so it can be compiled once and captured once as a CUDA
    graph; the caller moves on by writing the next slot into `slot`.
    """

    def __init__(self, cache: KVCache, slot: torch.Tensor) -> None:
        self.cache, self.slot = cache, slot

    def visible(self) -> torch.Tensor:
        """Mark the slot valid for every row; (B, max_len) True where the new token may attend."""
        cache = self.cache
        cache.valid.index_fill_(1, self.slot, True)
        slots = torch.arange(cache.max_len, device=self.slot.device)
        return cache.valid & (slots <= self.slot)[None]  # (B, max_len): causal, no padding

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, n_kv, 1, hs) at the slot of `layer`; return that layer's full buffers."""
        self.cache.k[layer].index_copy_(2, self.slot, k)
        self.cache.v[layer].index_copy_(2, self.slot, v)
        return self.cache.k[layer], self.cache.v[layer]
