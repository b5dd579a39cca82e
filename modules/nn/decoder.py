"""One decoder-only transformer, assembled from a `DecoderConfig`."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from modules.nn.attention import DifferentialAttention, build_attention
from modules.nn.cache import KVCache
from modules.nn.config import DecoderConfig
from modules.nn.linear_cross_entropy import linear_cross_entropy
from modules.nn.mamba import MambaMixer
from modules.nn.mlp import build_mlp
from modules.nn.moe import MoE
from modules.nn.norm import build_norm
from modules.nn.position import rope_at, rope_cache

IGNORE = -100  # the label of a position the loss skips (a prompt's tokens, padding): F.cross_entropy's ignore_index


def init_weights(module: nn.Module, n_layer: int) -> None:
    """GPT-2's initialisation of one module: N(0, 0.02) everywhere, residual projections scaled by
    1/sqrt(2 * n_layer) so the residual stream's variance does not grow with depth."""
    if isinstance(module, nn.Linear):
        std = 0.02 / math.sqrt(2 * n_layer) if getattr(module, "residual", False) else 0.02
        nn.init.normal_(module.weight, mean=0.0, std=std)
        if module.bias is not None and not getattr(module, "keep_bias", False):
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, mean=0.0, std=0.02)
    elif isinstance(module, MoE):
        module.reset_parameters(0.02, 0.02 / math.sqrt(2 * n_layer))
    elif isinstance(module, DifferentialAttention):
        module.reset_lambdas()


class Block(nn.Module):
    """Pre-norm residual block: x + mixer(norm(x)), then x + mlp(norm(x)); the mixer is attention
    (`attn`) or Mamba (`mamba`), the MLP dense or a mixture of experts, as the config says for `layer`
    (None: attention and a dense MLP, whatever the pattern, as an MTP module's block)."""

    def __init__(self, config: DecoderConfig, layer: int | None = None) -> None:
        super().__init__()
        self.norm_attn = build_norm(config)  # the mixer's norm, attention or Mamba
        if layer is None or config.mixer(layer) == "attention":
            self.attn, self.mamba = build_attention(config, layer), None
        else:
            self.attn, self.mamba = None, MambaMixer(
                config.n_embd, config.mamba_d_state, config.mamba_d_conv, config.mamba_expand, config.mamba_dt_rank,
                chunk=config.mamba_chunk, scan=config.mamba_scan)
        self.norm_mlp = build_norm(config)
        self.mlp = MoE(config) if layer is not None and config.is_moe(layer) else build_mlp(config)

    def forward(
        self,
        x: torch.Tensor,
        rope: torch.Tensor | None = None,
        cache: KVCache | None = None,
        layer: int = 0,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if self.mamba is None:
            x = x + self.attn(self.norm_attn(x), rope, cache, layer, mask)
        elif cache is None:
            x = x + self.mamba(self.norm_attn(x))
        else:
            valid, state = cache.new_valid(x.shape[1]), cache.mamba[layer]
            if valid is None and x.shape[1] == 1:  # a decode step: the recurrence, no scan
                x = x + self.mamba.step(self.norm_attn(x)[:, 0], state)[:, None]
            else:
                x = x + self.mamba(self.norm_attn(x), state, valid)
        return x + self.mlp(self.norm_mlp(x))


class Decoder(nn.Module):
    """Token embedding (+ positions) -> blocks -> final norm -> language-model head."""

    def __init__(self, config: DecoderConfig) -> None:
        super().__init__()
        self.config = config
        vocab = config.padded_vocab_size
        self.wte = nn.Embedding(vocab, config.n_embd)
        self.wpe = nn.Embedding(config.block_size, config.n_embd) if config.position == "learned" else None
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config, layer) for layer in range(config.n_layer))
        self.norm = build_norm(config)
        self.lm_head = nn.Linear(config.n_embd, vocab, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.wte.weight
        if config.position == "rope":
            self.register_buffer(
                "rope", rope_cache(config.block_size, config.rope_dim, config.rope_base), persistent=False
            )
        else:
            self.rope = None
        self.apply(lambda module: init_weights(module, config.n_layer))

    def forward(
        self, idx: torch.Tensor, cache: KVCache | None = None, valid: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Logits (B, T, padded_vocab) for token ids idx (B, T); see `features` for the cache."""
        return self.lm_head(self.features(idx, cache, valid))

    def features(
        self, idx: torch.Tensor, cache: KVCache | None = None, valid: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Final hidden states (B, T, C), after the last norm: what the LM head (or a scalar head) reads."""
        return self.norm(self.hidden(idx, cache, valid))

    def hidden(
        self, idx: torch.Tensor, cache: KVCache | None = None, valid: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The residual stream after the last block (B, T, C), before the final norm (what MTP modules read).

        With a cache, idx fills its next T slots; `valid` (B, T) marks real tokens (False for left
        padding, default all True) and positions count real tokens only, so a left-padded row
        gets the same positions as the same prompt alone.
        """
        B, T = idx.shape
        if cache is None:
            if T > self.config.block_size:
                raise ValueError(f"sequence length {T} exceeds the model's block_size {self.config.block_size}")
            positions, mask = torch.arange(T, device=idx.device), None  # (T,)
        else:
            mask = cache.attention_mask(T, valid)
            positions = cache.positions(T)  # (T,) or (B, T)
        x = self.wte(idx)  # (B, T, C)
        if self.wpe is not None:
            x = x + self.wpe(positions)
        x = self.drop(x)
        rope = None if self.rope is None else rope_at(self.rope, positions)
        for layer, block in enumerate(self.blocks):
            x = block(x, rope, cache, layer, mask)
        if cache is not None:
            cache.advance(T)
        return x

    def loss(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean next-token cross-entropy (nats) of targets (B, T) given idx (B, T), over the targets that are not IGNORE.

        With `config.loss_chunk` the head's matmul and the loss run fused, that many tokens at a time, so the
        (B * T, padded_vocab) logits never exist; the same value (and gradients) up to rounding.
        """
        if not self.config.loss_chunk:
            logits = self(idx)
            return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE)
        head = self.lm_head
        if type(head) is not nn.Linear or head.bias is not None:
            # the fused loss reads lm_head.weight only: an adapter (LoRA on the head) or a bias would be skipped silently
            kind = f"{type(head).__module__}.{type(head).__qualname__}" + (" with a bias" if type(head) is nn.Linear else "")
            raise ValueError(f"model.loss_chunk={self.config.loss_chunk} fuses the loss with a bias-free nn.Linear head; "
                             f"this decoder's lm_head is a {kind}: set model.loss_chunk=0")
        hidden = self.features(idx).flatten(0, 1)  # (B * T, C)
        return linear_cross_entropy(hidden, head.weight, targets.flatten(), IGNORE, self.config.loss_chunk)

    def moe_layers(self) -> list[MoE]:
        """The blocks' mixture-of-experts layers, first to last (none in a dense decoder)."""
        return [block.mlp for block in self.blocks if isinstance(block.mlp, MoE)]

    def num_params(self, exclude_embeddings: bool = False, active: bool = False) -> int:
        """Parameter count (tied weights once); optionally without token/position embeddings, and
        optionally only those one token uses (`active`: top_k of each layer's routed experts)."""
        n = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            n -= self.wte.weight.numel() + (self.wpe.weight.numel() if self.wpe is not None else 0)
        if active:
            for moe in self.moe_layers():
                routed = sum(p.numel() for p in moe.experts.parameters())
                n -= routed * (moe.n_experts - moe.top_k) // moe.n_experts
        return n

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs per token, forward + backward (PaLM, Chowdhery et al. 2022, App. B).

        6 N for the matmuls with the N non-embedding parameters a token uses (a mixture of experts:
        the shared experts, the router and top_k routed experts) plus the LM head (2 FLOPs per
        multiply-add, x3 for backward), and 12 L H Q T for attention scores and values with
        L attention layers, H heads, Q head size and context T. A Mamba layer's scan adds about
        9 D N per token (decay, input, state update and readout over D inner channels x N states),
        x3 for backward: no term in T.
        """
        cfg = self.config
        seq_len = seq_len or cfg.block_size
        n_matmul = self.num_params(exclude_embeddings=True, active=True) + cfg.padded_vocab_size * cfg.n_embd
        attention = len(cfg.attention_layers)
        scan = 27 * cfg.mamba_expand * cfg.n_embd * cfg.mamba_d_state * (cfg.n_layer - attention)
        # scores over query/key width (MLA: head + decoupled RoPE part), values over the head
        width = (2 * cfg.head_dim + cfg.rope_dim) / 2 if cfg.attention == "mla" else cfg.head_dim
        return 6 * n_matmul + 12 * attention * cfg.n_head * width * seq_len + scan
