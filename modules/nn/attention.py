"""Causal self-attention with multi-head, grouped-query and multi-query variants."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from modules.nn.cache import KVCache
from modules.nn.config import DecoderConfig
from modules.nn.position import apply_rope


class CausalSelfAttention(nn.Module):
    """Attention with `n_kv_head` key/value heads shared by groups of `n_head` query heads.

    n_kv_head == n_head is multi-head (Vaswani et al. 2017), 1 is multi-query (Shazeer 2019),
    anything between is grouped-query (Ainslie et al. 2023). The kernel is PyTorch's
    `scaled_dot_product_attention` (FlashAttention where the device has it).
    """

    def __init__(self, config: DecoderConfig) -> None:
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.kv_heads, config.head_dim
        qkv_dim = (config.n_head + 2 * config.kv_heads) * config.head_dim
        self.qkv = nn.Linear(config.n_embd, qkv_dim, bias=config.bias)
        self.proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.proj.residual = True
        self.dropout = config.dropout

    def forward(
        self,
        x: torch.Tensor,
        rope: torch.Tensor | None = None,
        cache: KVCache | None = None,
        layer: int = 0,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x (B, T, C) -> (B, T, C). With a cache, k/v go to its next T slots and `mask`
        (B, 1, T, max_len) says which slots each query sees; without, attention is causal."""
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(
            [self.n_head * self.head_dim, self.n_kv_head * self.head_dim, self.n_kv_head * self.head_dim], dim=-1
        )
        q = q.view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, nkv, T, hs)
        v = v.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, nkv, T, hs)
        if rope is not None:
            q, k = apply_rope(q, rope), apply_rope(k, rope)
        if cache is not None:
            k, v = cache.update(layer, k, v)  # (B, nkv, max_len, hs)
        if self.n_kv_head != self.n_head:
            # each group of n_head // n_kv_head query heads reads the same key/value head
            repeats = self.n_head // self.n_kv_head
            k, v = k.repeat_interleave(repeats, dim=1), v.repeat_interleave(repeats, dim=1)  # (B, nh, S, hs)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=mask is None, dropout_p=self.dropout if self.training else 0.0
        )  # (B, nh, T, hs)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))
