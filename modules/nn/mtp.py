"""Multi-token prediction heads on top of the one decoder: DeepSeek-V3's sequential modules and
Gloeckle et al.'s parallel heads.

Both add D modules, each one transformer block, that predict tokens further ahead than the
decoder's next token, and both score through the decoder's own output head (and, sequentially,
its embedding): the heads hold no vocabulary-sized matrix of their own, and the decoder stays a
plain `Decoder` that generates and evaluates without them.

- sequential (DeepSeek-V3, Sec. 2.2): depth k reads the previous depth's hidden state at i and
  the embedding of token i+k, each RMS-normalised, concatenated and projected back to the width,
  and predicts token i+k+1. The causal chain runs through the depths.
- parallel (Gloeckle et al. 2024): head k reads the decoder's last hidden state at i directly and
  predicts token i+k+1; the heads do not see each other.

Hidden states here are the residual stream before the decoder's final norm (`Decoder.hidden`);
each head has its own final norm in front of the shared output head, as DeepSeek-V3 does.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from modules.nn.cache import KVCache
from modules.nn.config import DecoderConfig
from modules.nn.decoder import Block, Decoder, init_weights
from modules.nn.norm import RMSNorm, build_norm
from modules.nn.position import rope_at

Kind = Literal["sequential", "parallel"]


class MTPHeads(nn.Module):
    """`depth` extra prediction heads for a decoder of `config`; depth k (1-based) predicts token i+k+1 at i."""

    def __init__(self, config: DecoderConfig, depth: int, kind: Kind = "sequential") -> None:
        super().__init__()
        if depth < 1:
            raise ValueError(f"MTP depth must be at least 1; got {depth}")
        if kind not in ("sequential", "parallel"):
            raise ValueError(f"MTP kind must be 'sequential' or 'parallel'; got {kind!r}")
        self.config, self.depth, self.kind = config, depth, kind
        C = config.n_embd
        self.blocks = nn.ModuleList(Block(config) for _ in range(depth))
        self.norms = nn.ModuleList(build_norm(config) for _ in range(depth))  # in front of the shared output head
        if kind == "sequential":
            self.norm_hidden = nn.ModuleList(RMSNorm(C, config.norm_eps) for _ in range(depth))
            self.norm_embed = nn.ModuleList(RMSNorm(C, config.norm_eps) for _ in range(depth))
            self.proj = nn.ModuleList(nn.Linear(2 * C, C, bias=False) for _ in range(depth))
        self.apply(lambda module: init_weights(module, config.n_layer))

    def _input(self, decoder: Decoder, k: int, previous: torch.Tensor, tokens: torch.Tensor | None) -> torch.Tensor:
        """Depth k's block input (B, L, C) from the previous depth's hidden (B, L, C) and tokens i+k (B, L)."""
        if self.kind == "parallel":
            return previous
        embed = decoder.wte(tokens)
        return self.proj[k - 1](torch.cat([self.norm_hidden[k - 1](previous), self.norm_embed[k - 1](embed)], dim=-1))

    def logits(self, decoder: Decoder, k: int, hidden: torch.Tensor) -> torch.Tensor:
        """Depth k's logits through the decoder's output head, from that depth's hidden states."""
        return decoder.lm_head(self.norms[k - 1](hidden))

    def losses(self, decoder: Decoder, hidden: torch.Tensor, tokens: torch.Tensor) -> list[torch.Tensor]:
        """Mean cross-entropy of each depth (k = 1..D), in nats.

        hidden (B, T, C): `decoder.hidden(tokens[:, :T])`; tokens (B, T + 1): the whole block, so
        depth k trains on the T - k positions whose target i+k+1 lies inside it (DeepSeek-V3 drops
        the tail the same way).
        """
        T = hidden.shape[1]
        if tokens.shape[1] != T + 1:
            raise ValueError(f"tokens must be one longer than hidden: {tuple(tokens.shape)} vs {tuple(hidden.shape)}")
        if T <= self.depth:
            raise ValueError(f"a block of {T} positions leaves no target for MTP depth {self.depth}")
        out, previous = [], hidden
        for k in range(1, self.depth + 1):
            L = T - k
            base = previous[:, :L] if self.kind == "sequential" else hidden[:, :L]
            x = self._input(decoder, k, base, tokens[:, k : k + L])
            rope = None if decoder.rope is None else decoder.rope[:, :L]
            previous = self.blocks[k - 1](x, rope)
            logits = self.logits(decoder, k, previous)
            out.append(F.cross_entropy(logits.flatten(0, 1).float(), tokens[:, k + 1 : k + 1 + L].flatten()))
        return out

    def caches(self, batch: int, max_len: int, device: torch.device, dtype: torch.dtype) -> list[KVCache]:
        """One key/value cache per depth (each depth is one block) for drafting."""
        one = replace(self.config, n_layer=1)
        return [KVCache(one, batch, max_len, device, dtype) for _ in range(self.depth)]

    def step(self, decoder: Decoder, k: int, previous: torch.Tensor, tokens: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Depth k's hidden states (1, n, C) for the next n positions of its cache: `previous` (1, n, C)
        holds the previous depth's hidden states there and `tokens` (1, n) the tokens i+k."""
        n = previous.shape[1]
        mask = cache.attention_mask(n)
        rope = None if decoder.rope is None else rope_at(decoder.rope, cache.positions(n))
        x = self._input(decoder, k, previous, tokens)
        out = self.blocks[k - 1](x, rope, cache, 0, mask)
        cache.advance(n)
        return out

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs per token the heads add (6 N per matmul parameter, PaLM's count, with each
        depth's pass through the shared output head and its attention)."""
        cfg = self.config
        seq_len = seq_len or cfg.block_size
        head = cfg.padded_vocab_size * cfg.n_embd
        return self.depth * 6 * head + 6 * self.num_params() + self.depth * 12 * cfg.n_head * cfg.head_dim * seq_len
