"""A static, preallocated decoding cache: keys and values of attention blocks, states of Mamba blocks."""

from __future__ import annotations

import torch

from modules.nn.config import DecoderConfig
from modules.nn.mamba import MambaState


def per_token(config: DecoderConfig) -> int:
    """Values an attention layer caches per token: keys and values of every KV head, or MLA's latent and
    its shared RoPE key (DeepSeek-V2, Table 1: (d_c + d_h^R) l, against 2 n_h d_h l for multi-head)."""
    if config.attention == "mla":
        return config.kv_rank + config.rope_dim
    if config.attention == "nsa":  # each branch its own keys and values (the compressed ones add 1 per stride)
        return 3 * 2 * config.kv_heads * config.head_dim
    return 2 * config.kv_heads * config.head_dim


def cache_bytes(config: DecoderConfig, batch: int, context: int, dtype: torch.dtype = torch.bfloat16) -> int:
    """Bytes a decoding cache of `context` tokens holds for `batch` sequences, from the config alone.

    Attention keeps `per_token(config)` values of every token per layer (keys and values, or MLA's latent).
    Mamba keeps a fixed state whatever the context: d_conv - 1 conv inputs (in `dtype`) and N SSM
    states (float32) per inner channel.
    """
    size = torch.finfo(dtype).bits // 8
    attention = len(config.attention_layers)
    kv = batch * per_token(config) * context * size * attention
    inner = config.mamba_expand * config.n_embd
    state = batch * inner * ((config.mamba_d_conv - 1) * size + config.mamba_d_state * 4) * (config.n_layer - attention)
    return kv + state


class KVCache:
    """Keys and values of every attention block in fixed buffers of `max_len` slots, one (B, n_kv, max_len, hs)
    per block, and the `MambaState` of every Mamba block.

    Slot t holds the t-th token fed to the model for every row; rows of different lengths are
    left-padded, and `valid` (B, max_len) marks the slots that hold real tokens. Attention reads
    all `max_len` slots under a mask, so every decode step has the same shapes (graph-capturable).
    Each layer's buffer is its own tensor, not a view of one, so a compiled step mutates whole
    inputs in place; Mamba states are updated in place too. `k[layer]` and `v[layer]` are None for
    a Mamba block, `mamba[layer]` None for an attention block.
    """

    def __init__(self, config: DecoderConfig, batch: int, max_len: int, device: torch.device, dtype: torch.dtype) -> None:
        if max_len > config.block_size:
            raise ValueError(f"cache of {max_len} slots exceeds the model's block_size {config.block_size}")
        # MLA caches its latent c (in `k`) and the shared RoPE key (in `v`), one "head" each
        mla = config.attention == "mla"
        k_shape = (batch, 1, max_len, config.kv_rank) if mla else (batch, config.kv_heads, max_len, config.head_dim)
        v_shape = (batch, 1, max_len, config.rope_dim) if mla else k_shape
        attention = [config.mixer(layer) == "attention" for layer in range(config.n_layer)]
        self.k = [torch.zeros(k_shape, device=device, dtype=dtype) if a else None for a in attention]
        self.v = [torch.zeros(v_shape, device=device, dtype=dtype) if a else None for a in attention]
        inner = config.mamba_expand * config.n_embd
        self.mamba = [None if a else MambaState(
            torch.zeros(batch, inner, config.mamba_d_conv - 1, device=device, dtype=dtype),
            torch.zeros(batch, inner, config.mamba_d_state, device=device, dtype=torch.float32)) for a in attention]
        self.valid = torch.zeros(batch, max_len, dtype=torch.bool, device=device)
        self.length = 0  # slots filled so far
        self.max_len, self.dtype = max_len, dtype

    def nbytes(self) -> int:
        """Bytes of the keys, values and Mamba states held (what `cache_bytes` computes), measured on the buffers."""
        tensors = [t for t in self.k + self.v if t is not None]
        tensors += [t for state in self.mamba if state is not None for t in (state.conv, state.ssm)]
        return sum(t.nbytes for t in tensors)

    def new_valid(self, T: int) -> torch.Tensor:
        """(B, T): which of the T tokens being fed are real (set by `attention_mask` first)."""
        return self.valid[:, self.length : self.length + T]

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
        if length < self.length and any(state is not None for state in self.mamba):
            raise ValueError("a Mamba state cannot be rolled back to an earlier token: speculative decoding needs "
                             "a decoder of attention blocks only (model.layer_pattern=a)")
        self.valid[:, length:] = False
        self.length = length

    def reset(self) -> None:
        """Empty the cache in place, keeping its buffers (a graph captured over them stays valid)."""
        self.valid.zero_()
        for state in self.mamba:
            if state is not None:
                state.conv.zero_()
                state.ssm.zero_()
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
        self.mamba = cache.mamba

    def new_valid(self, T: int) -> None:
        """Every row's new token is real: no mask for the Mamba blocks."""
        return None

    def visible(self) -> torch.Tensor:
        """Mark the slot valid for every row; (B, max_len) True where the new token may attend."""
        cache = self.cache
        cache.valid.index_fill_(1, self.slot, True)
        slots = torch.arange(cache.max_len, device=self.slot.device)
        return cache.valid & (slots <= self.slot)[None]  # (B, max_len): causal, no padding

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, n_kv, 1, hs) at the slot of `layer`; return that layer's full buffers."""
        k_buffer, v_buffer = self.cache.k[layer], self.cache.v[layer]
        # in the buffers' dtype, as `KVCache.update`'s slice assignment casts (autocast may hand bf16 to a float32 cache)
        k_buffer.index_copy_(2, self.slot, k.to(k_buffer.dtype))
        v_buffer.index_copy_(2, self.slot, v.to(v_buffer.dtype))
        return k_buffer, v_buffer
