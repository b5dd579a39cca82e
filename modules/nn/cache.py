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


KERNELS = ("sdpa", "flex")  # how attention reads a `SlotCache`


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
        self.pending: list[tuple[torch.Tensor, torch.Tensor]] = []  # (slots, values) written at `advance`
        self.padded = False  # some slot holds padding: positions count real tokens per row
        self.max_len, self.dtype = max_len, dtype
        self.kernel = "sdpa"  # attention reads a KVCache through SDPA (see `SlotCache`)

    def nbytes(self) -> int:
        """Bytes of the keys, values and Mamba states held (what `cache_bytes` computes), measured on the buffers."""
        tensors = [t for t in self.k + self.v if t is not None]
        tensors += [t for state in self.mamba if state is not None for t in (state.conv, state.ssm)]
        return sum(t.nbytes for t in tensors)

    def new_valid(self, T: int) -> torch.Tensor:
        """(B, T): which of the T tokens being fed are real (set by `attention_mask` first)."""
        return self.valid[:, self.length : self.length + T]

    def attention_mask(self, T: int, valid: torch.Tensor | None = None) -> torch.Tensor | None:
        """Mark the next T slots real where `valid` (B, T) says (default: every row's tokens are real).

        Returns the mask (B, 1, T, length + T) over the slots filled so far, causal, no padding, or
        None for causal attention over the T new tokens alone: the first tokens of an unpadded batch,
        which then run the causal kernel (flash) as a pass without a cache does.
        """
        if self.length + T > self.max_len:
            raise ValueError(f"cache full: {self.length} + {T} tokens > {self.max_len} slots")
        end = self.length + T
        if valid is None:
            self.valid[:, self.length : end] = True
            if self.length == 0:
                return None
        else:
            self.valid[:, self.length : end] = valid
            self.padded = True
        slots = torch.arange(end, device=self.valid.device)
        queries = slots[self.length :]
        causal = slots[None, :] <= queries[:, None]  # (T, end)
        itself = slots[None, :] == queries[:, None]  # a padding slot sees itself, so no row is all -inf (NaN)
        return ((causal[None] & self.valid[:, None, :end]) | itself[None])[:, None]  # (B, 1, T, end)

    def positions(self, T: int) -> torch.Tensor:
        """Positions of the next T tokens, after `attention_mask`: (T,) when no row is padded, else (B, T)
        counting each row's real tokens, so a left-padded row gets the positions of its prompt alone."""
        if not self.padded:
            return torch.arange(self.length, self.length + T, device=self.valid.device)
        return (self.valid[:, : self.length + T].cumsum(-1)[:, self.length :] - 1).clamp(min=0)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, n_kv, T, hs) at the next T slots of `layer`; return that layer's slots filled so far.

        Into an empty, unpadded cache the write waits for `advance`, which makes every layer's in one
        multi-tensor copy, and attention reads k, v themselves (the same values, in the layout a pass
        without a cache reads): an eager prefill then costs what the same pass without a cache does,
        not two more launches per layer.
        """
        end = self.length + k.shape[2]
        slots_k, slots_v = self.k[layer][:, :, self.length : end], self.v[layer][:, :, self.length : end]
        if self.length == 0 and not self.padded:
            self.pending += [(slots_k, k), (slots_v, v)]
            return k, v
        slots_k.copy_(k)
        slots_v.copy_(v)
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def advance(self, n: int) -> None:
        if self.pending:
            slots, values = zip(*self.pending)
            torch._foreach_copy_(list(slots), list(values))  # casts to the buffers' dtype, as copy_ does
            self.pending = []
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
        self.padded = False
        self.pending = []
        for state in self.mamba:
            if state is not None:
                state.conv.zero_()
                state.ssm.zero_()
        self.length = 0


class SlotCache:
    """A `KVCache` fed T real tokens per row at slots slot .. slot + T - 1, `slot` a device tensor (1,).

    `KVCache` slices at the Python int `length`, so each position is a different program. Here no
    index is a host value: a forward pass through this view runs the same kernels with the same
    arguments at every position, so it is compiled once and captured once as a CUDA graph. Attention
    reads all `max_len` slots under the mask. The owner moves on: it writes the next slot into
    `slot` before each pass and advances the cache's `length` after (`advance` here does nothing,
    so no host value changes inside a traced pass). `kernel` is how a standard attention block reads it:
    "sdpa" (PyTorch's scaled_dot_product_attention under the mask) or "flex" (FlexAttention, whose compiled
    form for a few queries is one decoding kernel per layer; `modules.nn.attention.flex_attend`).
    """

    def __init__(self, cache: KVCache, slot: torch.Tensor | None = None, kernel: str = "sdpa") -> None:
        if kernel not in KERNELS:
            raise ValueError(f"attention kernel {kernel!r}: use one of {KERNELS}")
        self.cache, self.kernel = cache, kernel
        self.slot = torch.zeros(1, dtype=torch.long, device=cache.valid.device) if slot is None else slot
        self.mamba = cache.mamba
        self.max_len = cache.max_len

    def new_valid(self, T: int) -> None:
        """Every row's new tokens are real: no mask for the Mamba blocks."""
        return None

    def _new(self, T: int) -> torch.Tensor:
        return self.slot + torch.arange(T, device=self.slot.device)  # (T,): the slots being written

    def attention_mask(self, T: int, valid: None = None) -> torch.Tensor:
        """Mark the T slots real for every row; the additive mask (B, 1, T, max_len), 0 where a query
        may attend (causal, no padding) and -inf elsewhere, built once for all layers."""
        if valid is not None:
            raise ValueError("a slot cache is fed real tokens only: prefill padded prompts through the KVCache")
        cache = self.cache
        new = self._new(T)
        cache.valid.index_fill_(1, new, True)
        slots = torch.arange(cache.max_len, device=new.device)
        visible = cache.valid[:, None, :] & (slots[None, :] <= new[:, None])[None]  # (B, T, max_len)
        mask = torch.zeros(visible.shape, dtype=cache.dtype, device=new.device).masked_fill(~visible, float("-inf"))
        return mask[:, None]

    def positions(self, T: int) -> torch.Tensor:
        """(B, T): each row's real tokens before each new one, as `KVCache.positions` counts."""
        cache = self.cache
        slots = torch.arange(cache.max_len, device=self.slot.device)
        before = (cache.valid & (slots < self.slot)[None]).sum(-1, keepdim=True)  # (B, 1)
        return before + torch.arange(T, device=self.slot.device)[None]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, n_kv, T, hs) at the slots of `layer`; return that layer's full buffers."""
        k_buffer, v_buffer = self.cache.k[layer], self.cache.v[layer]
        new = self._new(k.shape[2])
        # in the buffers' dtype, as `KVCache.update`'s slice assignment casts (autocast may hand bf16 to a float32 cache)
        k_buffer.index_copy_(2, new, k.to(k_buffer.dtype))
        v_buffer.index_copy_(2, new, v.to(v_buffer.dtype))
        return k_buffer, v_buffer

    def advance(self, n: int) -> None:
        """Nothing: the owner advances the cache after the pass."""
