"""Causal self-attention: multi-head, grouped-query and multi-query, and DeepSeek-V2's multi-head latent attention."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention.flex_attention import flex_attention

from modules.nn.cache import KVCache
from modules.nn.config import DecoderConfig
from modules.nn.norm import RMSNorm
from modules.nn.nsa import NativeSparseAttention
from modules.nn.position import apply_rope


def build_attention(config: DecoderConfig, layer: int | None = None) -> nn.Module:
    """The token mixer `config.attention` names; `layer` (0-based, None for an MTP module's block) sets
    differential attention's lambda_init."""
    if config.attention == "mla":
        return LatentAttention(config)
    if config.attention == "diff":
        return DifferentialAttention(config, 0 if layer is None else layer)
    if config.attention == "nsa":
        return NativeSparseAttention(config)
    return CausalSelfAttention(config)


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
        self.proj = nn.Linear(config.n_head * config.head_dim, config.n_embd, bias=config.bias)
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
        B, T, _ = x.shape
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
        if cache is not None and cache.kernel == "flex":
            y = flex_attend(q, k, v, mask)  # GQA inside the kernel: no repeated keys
        else:
            if self.n_kv_head != self.n_head:
                # each group of n_head // n_kv_head query heads reads the same key/value head
                repeats = self.n_head // self.n_kv_head
                k, v = k.repeat_interleave(repeats, dim=1), v.repeat_interleave(repeats, dim=1)  # (B, nh, S, hs)
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, is_causal=mask is None, dropout_p=self.dropout if self.training else 0.0
            )  # (B, nh, T, hs)
        return self.proj(y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim))


def flex_attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """SDPA's result for q (B, nh, T, hs) over k, v (B, nkv, S, hs) under the additive mask (B, 1, T, S), through
    FlexAttention: compiled, a pass of few queries runs its decoding kernel (split over the keys, scores, softmax and
    values in one kernel, the mask read inside it) instead of SDPA's three kernels or its training kernels. Eager, it
    is FlexAttention's unfused reference (the CPU path, and the tests' check against SDPA)."""

    def add_mask(score: torch.Tensor, b: torch.Tensor, h: torch.Tensor, q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
        return score + mask[b, 0, q_idx, kv_idx]

    return flex_attention(q, k, v, score_mod=add_mask, enable_gqa=q.shape[1] != k.shape[1])


class LatentAttention(nn.Module):
    """Multi-head latent attention (DeepSeek-V2, Liu et al. 2024, Sec. 2.1).

    Keys and values come from one latent c = RMSNorm(W_DKV x) of width d_c per token: k_C = W_UK c,
    v = W_UV c, per head. Positions enter through a decoupled part: a RoPE query per head and one
    RoPE key k_R = RoPE(W_KR x) shared by all heads, concatenated to the content parts. Queries may be
    low-rank too (q = W_UQ RMSNorm(W_DQ x), d_c' = `mla_q_rank`). A cache holds only c and k_R:
    (d_c + d_R) values per token and layer (`KVCache`: c in `k`, k_R in `v`).

    Decoding reads the cache in the absorbed form (`absorb`, Sec. 2.1.2): W_UK folds into the query
    (q_C W_UK per head, width d_c) and W_UV into the output, so attention runs over the latents
    themselves and no per-head key or value is ever expanded; it equals the plain form (tested).
    """

    def __init__(self, config: DecoderConfig) -> None:
        super().__init__()
        H, d, r, dr = config.n_head, config.head_dim, config.kv_rank, config.rope_dim
        self.n_head, self.head_dim, self.kv_rank, self.rope_dim = H, d, r, dr
        if config.mla_q_rank:
            self.q_down = nn.Linear(config.n_embd, config.mla_q_rank, bias=False)
            self.q_norm = RMSNorm(config.mla_q_rank, config.norm_eps)
            self.q_up = nn.Linear(config.mla_q_rank, H * (d + dr), bias=False)
        else:
            self.q_down = self.q_norm = None
            self.q_up = nn.Linear(config.n_embd, H * (d + dr), bias=False)
        self.kv_down = nn.Linear(config.n_embd, r + dr, bias=False)  # the latent and the shared RoPE key
        self.kv_norm = RMSNorm(r, config.norm_eps)
        self.kv_up = nn.Linear(r, H * 2 * d, bias=False)  # per head: content key, then value
        self.proj = nn.Linear(H * d, config.n_embd, bias=config.bias)
        self.proj.residual = True
        self.dropout = config.dropout
        self.scale = 1 / math.sqrt(d + dr)
        self.absorb = True  # read a cache in the absorbed form

    def forward(
        self,
        x: torch.Tensor,
        rope: torch.Tensor | None = None,
        cache: KVCache | None = None,
        layer: int = 0,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x (B, T, C) -> (B, T, C); the cache and mask as `CausalSelfAttention`'s."""
        B, T, _ = x.shape
        H, d, r, dr = self.n_head, self.head_dim, self.kv_rank, self.rope_dim
        q = self.q_up(self.q_norm(self.q_down(x)) if self.q_down is not None else x)
        q_c, q_r = q.view(B, T, H, d + dr).transpose(1, 2).split([d, dr], dim=-1)  # (B, H, T, d), (B, H, T, dr)
        c, k_r = self.kv_down(x).split([r, dr], dim=-1)
        c, k_r = self.kv_norm(c)[:, None], k_r[:, None]  # (B, 1, T, r), (B, 1, T, dr)
        q_r, k_r = apply_rope(q_r, rope), apply_rope(k_r, rope)
        if cache is not None:
            c, k_r = cache.update(layer, c, k_r)  # (B, 1, S, r), (B, 1, S, dr)
        dropout = self.dropout if self.training else 0.0
        w_k, w_v = self.kv_up.weight.view(H, 2 * d, r).split([d, d], dim=1)  # (H, d, r) each
        if cache is not None and self.absorb:
            q_lat = torch.einsum("bhtd,hdr->bhtr", q_c, w_k)  # the query read in latent space
            keys = torch.cat([c, k_r], dim=-1).expand(B, H, -1, r + dr)
            out = F.scaled_dot_product_attention(torch.cat([q_lat, q_r], dim=-1), keys, c.expand(B, H, -1, r),
                                                 attn_mask=mask, is_causal=mask is None, dropout_p=dropout,
                                                 scale=self.scale)  # (B, H, T, r)
            y = torch.einsum("bhtr,hdr->bhtd", out, w_v)
        else:
            k_c = torch.einsum("bxsr,hdr->bhsd", c, w_k)  # (B, H, S, d)
            v = torch.einsum("bxsr,hdr->bhsd", c, w_v)
            k = torch.cat([k_c, k_r.expand(B, H, -1, dr)], dim=-1)
            y = F.scaled_dot_product_attention(torch.cat([q_c, q_r], dim=-1), k, v, attn_mask=mask,
                                               is_causal=mask is None, dropout_p=dropout, scale=self.scale)
        return self.proj(y.transpose(1, 2).reshape(B, T, H * d))


def lambda_init(layer: int) -> float:
    """Differential attention's lambda_init for 0-based block `layer`: 0.8 - 0.6 exp(-0.3 (l - 1)), l = layer + 1."""
    return 0.8 - 0.6 * math.exp(-0.3 * layer)


class DifferentialAttention(CausalSelfAttention):
    """Differential attention (Ye et al., ICLR 2025): each head's queries and keys split in halves,
    two softmax maps subtracted, softmax(Q1 K1^T / sqrt(d)) - lambda softmax(Q2 K2^T / sqrt(d)), times V
    of the full head width 2d. lambda = exp(lq1 . lk1) - exp(lq2 . lk2) + lambda_init, per layer;
    each head's output is RMS-normalised and scaled by (1 - lambda_init).

    A head here is one of the paper's heads: `n_head` heads of `head_dim` = 2d hold the same projections
    as a softmax transformer of 2 n_head heads of d (the paper's equal-size comparison). The cache holds
    keys and values as multi-head attention's, so decoding works unchanged.
    """

    def __init__(self, config: DecoderConfig, layer: int) -> None:
        if config.kv_heads != config.n_head:
            raise ValueError("model.attention=diff: grouped-query keys are not supported; leave model.n_kv_head unset")
        super().__init__(config)
        half = self.head_dim // 2
        self.lambda_init = lambda_init(layer)
        self.lambdas = nn.Parameter(torch.zeros(4, half))  # lq1, lk1, lq2, lk2 (re-parametrised lambda)
        self.subln = RMSNorm(self.head_dim, 1e-5)

    def reset_lambdas(self) -> None:
        nn.init.normal_(self.lambdas, mean=0.0, std=0.1)

    def lam(self) -> torch.Tensor:
        q1, k1, q2, k2 = self.lambdas.float()
        return torch.exp((q1 * k1).sum()) - torch.exp((q2 * k2).sum()) + self.lambda_init

    def forward(
        self,
        x: torch.Tensor,
        rope: torch.Tensor | None = None,
        cache: KVCache | None = None,
        layer: int = 0,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x (B, T, C) -> (B, T, C); the cache and mask as `CausalSelfAttention`'s."""
        B, T, _ = x.shape
        H, D = self.n_head, self.head_dim
        q, k, v = self.qkv(x).split([H * D, H * D, H * D], dim=-1)
        # queries and keys as 2H half-heads of D / 2 (RoPE on each), values as H heads of D
        q = q.view(B, T, 2 * H, D // 2).transpose(1, 2)
        k = k.view(B, T, 2 * H, D // 2).transpose(1, 2)
        v = v.view(B, T, H, D).transpose(1, 2)
        if rope is not None:
            q, k = apply_rope(q, rope), apply_rope(k, rope)
        q, k = q.reshape(B, H, 2, T, D // 2), k.reshape(B, H, 2, T, D // 2)  # half-head 2h, 2h+1 -> head h, halves 0, 1
        k = k.transpose(2, 3).reshape(B, H, T, D)  # cached as a head of width D: both halves side by side
        if cache is not None:
            k, v = cache.update(layer, k, v)
        k = k.view(B, H, -1, 2, D // 2).transpose(2, 3)  # (B, H, 2, S, D/2)
        dropout = self.dropout if self.training else 0.0
        maps = [F.scaled_dot_product_attention(q[:, :, i], k[:, :, i], v, attn_mask=mask, is_causal=mask is None,
                                               dropout_p=dropout) for i in (0, 1)]  # each (B, H, T, D)
        y = maps[0] - self.lam().to(v.dtype) * maps[1]
        y = self.subln(y) * (1 - self.lambda_init)
        return self.proj(y.transpose(1, 2).reshape(B, T, H * D))
