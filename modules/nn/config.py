"""The one decoder's configuration: every architectural switch is a field."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass
class DecoderConfig:
    """Shape and components of a decoder-only transformer.

    Defaults are GPT-2 small (Radford et al. 2019): 12 layers, 12 heads, width 768,
    context 1024, LayerNorm, GELU MLP, learned positions, tied embeddings.
    """

    vocab_size: int = 50257
    block_size: int = 1024
    n_layer: int = 12
    n_head: int = 12
    n_kv_head: int | None = None  # None: multi-head; 1: multi-query; 1 < g < n_head: grouped-query
    n_embd: int = 768
    norm: Literal["layernorm", "rmsnorm"] = "layernorm"
    norm_eps: float = 1e-5
    mlp: Literal["gelu", "swiglu"] = "gelu"
    mlp_hidden: int | None = None  # None: 4 * n_embd for GELU, 8/3 * n_embd rounded up to 64 for SwiGLU
    position: Literal["learned", "rope"] = "learned"
    rope_base: float = 10000.0
    bias: bool = True
    dropout: float = 0.0
    tie_embeddings: bool = True
    pad_vocab_to: int = 1  # round the embedding table up to a multiple of this (64 keeps matmuls aligned)

    def __post_init__(self) -> None:
        if self.n_embd % self.n_head:
            raise ValueError(f"model.n_embd={self.n_embd} must be divisible by model.n_head={self.n_head}")
        if self.n_head % self.kv_heads:
            raise ValueError(f"model.n_head={self.n_head} must be divisible by model.n_kv_head={self.n_kv_head}")
        if self.position == "rope" and self.head_dim % 2:
            raise ValueError(f"RoPE needs an even head size; got n_embd/n_head={self.head_dim}")

    @property
    def kv_heads(self) -> int:
        return self.n_kv_head or self.n_head

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def padded_vocab_size(self) -> int:
        return -(-self.vocab_size // self.pad_vocab_to) * self.pad_vocab_to

    @property
    def hidden_dim(self) -> int:
        if self.mlp_hidden is not None:
            return self.mlp_hidden
        if self.mlp == "swiglu":  # LLaMA: keep 3 matrices at the parameter count of a 4x GELU MLP
            return -(-int(8 * self.n_embd / 3) // 64) * 64
        return 4 * self.n_embd
