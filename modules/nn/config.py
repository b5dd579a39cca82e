"""The one decoder's configuration: every architectural switch is a field."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


@dataclass
class DecoderConfig:
    """Shape and components of a decoder-only transformer.

    Defaults are GPT-2 small (Radford et al. 2019): 12 layers, 12 heads, width 768,
    context 1024, LayerNorm, GELU MLP, learned positions, tied embeddings.
    """

    vocab_size: int = field(default=50257, metadata={"min": 1})
    block_size: int = field(default=1024, metadata={"min": 1})
    n_layer: int = field(default=12, metadata={"min": 1})
    n_head: int = field(default=12, metadata={"min": 1})
    n_kv_head: int | None = field(default=None, metadata={"min": 1})  # None: multi-head; 1: multi-query; 1 < g < n_head: grouped-query
    n_embd: int = field(default=768, metadata={"min": 1})
    head_size: int | None = field(default=None, metadata={"min": 1})  # width of a head; None: n_embd // n_head (DeepSeek-V3: 128 at width 7168, 128 heads)
    norm: Literal["layernorm", "rmsnorm"] = "layernorm"
    norm_eps: float = field(default=1e-5, metadata={"gt": 0})
    mlp: Literal["gelu", "swiglu"] = "gelu"
    mlp_hidden: int | None = field(default=None, metadata={"min": 1})  # None: 4 * n_embd for GELU, 8/3 * n_embd rounded up to 64 for SwiGLU
    position: Literal["learned", "rope", "none"] = "learned"  # "none": no positional encoding (Jamba's hybrid)
    rope_base: float = field(default=10000.0, metadata={"gt": 0})
    bias: bool = True
    dropout: float = field(default=0.0, metadata={"min": 0, "lt": 1})
    tie_embeddings: bool = True
    pad_vocab_to: int = field(default=1, metadata={"min": 1})  # round the embedding table up to a multiple of this (64 keeps matmuls aligned)
    # tokens per chunk of the loss fused with the LM head (modules/nn/linear_cross_entropy.py): the (tokens, padded_vocab)
    # logits never exist, a chunk's at a time; 0: the plain head and F.cross_entropy over all logits at once
    loss_chunk: int = field(default=0, metadata={"min": 0})
    # "mla": DeepSeek-V2's multi-head latent attention (modules/nn/attention.py): keys and values from a
    # joint low-rank latent (the only thing cached, with one shared RoPE key), queries optionally low-rank too
    # "diff": differential attention (Ye et al. 2025): two softmax maps per head, subtracted with a learned lambda
    # "nsa": native sparse attention (Yuan et al. 2025, modules/nn/nsa.py): compressed, selected and sliding-window
    # branches with learned gates; no KV-cache decoding
    attention: Literal["standard", "mla", "diff", "nsa"] = "standard"
    mla_kv_rank: int | None = None  # latent width d_c; None: 4 x head_dim (DeepSeek-V2/V3: 512 at head_dim 128)
    mla_q_rank: int = 0  # query latent width d_c'; 0: queries projected directly (DeepSeek-V2-Lite); V2/V3: 1536
    mla_rope_dim: int | None = None  # width of the decoupled RoPE query/key per head; None: head_dim // 2 (64 of 128)
    nsa_block: int = 32  # NSA: tokens per compressed block l (the paper: 32)
    nsa_stride: int = 16  # NSA: stride d between compressed blocks (16)
    nsa_select_block: int = 64  # NSA: tokens per selection block l' (64), a multiple of the stride
    nsa_select: int = 16  # NSA: selection blocks per query n (16), the first and the two local ones included
    nsa_window: int = 512  # NSA: sliding window w (512)
    # token mixers, one letter per block, cycled over n_layer: "a" attention, "m" Mamba (modules/nn/mamba.py);
    # "a" is a transformer, "m" pure Mamba, "mmmmammm" Jamba's 1 attention : 7 Mamba (attention 5th of 8)
    layer_pattern: str = "a"
    mamba_d_state: int = field(default=16, metadata={"min": 1})  # N, states per channel
    mamba_d_conv: int = field(default=4, metadata={"min": 1})  # width of the causal depthwise convolution
    mamba_expand: int = field(default=2, metadata={"min": 1})  # inner width = expand * n_embd
    mamba_dt_rank: int | None = None  # rank of Delta's projection; None: ceil(n_embd / 16)
    mamba_chunk: int = field(default=64, metadata={"min": 1})  # chunk of the parallel scan
    mamba_scan: Literal["auto", "parallel", "sequential"] = "auto"  # auto: sequential on a CPU, parallel elsewhere
    # mixture of experts (modules/nn/moe.py): 0 routed experts keeps every block's MLP dense
    moe_experts: int = field(default=0, metadata={"min": 0})  # routed experts per MoE layer
    moe_top_k: int = 2  # routed experts per token
    moe_shared: int = field(default=1, metadata={"min": 0})  # shared experts, seen by every token
    moe_hidden: int | None = None  # width of one expert; None: hidden_dim / (top_k + shared), the dense MLP's active size
    moe_every: int = 1  # MoE in every k-th block (the k-th, 2k-th, ...); 2 is Jamba's "every other layer"
    moe_first_dense: int = field(default=0, metadata={"min": 0})  # the first k blocks keep a dense MLP (DeepSeek-V3: 3)
    moe_score: Literal["softmax", "sigmoid"] = "sigmoid"  # affinity (DeepSeekMoE: softmax; DeepSeek-V3: sigmoid)
    moe_balance: Literal["none", "aux", "loss_free", "loss_free_seq"] = "loss_free"
    moe_aux_alpha: float = 0.001  # weight of the auxiliary balance loss ("aux")
    moe_seq_alpha: float = 0.0001  # weight of DeepSeek-V3's sequence-wise loss ("loss_free_seq")
    moe_bias_rate: float = 0.001  # u of the loss-free bias update

    def __post_init__(self) -> None:
        if self.head_size is None and self.n_embd % self.n_head:
            raise ValueError(f"model.n_embd={self.n_embd} must be divisible by model.n_head={self.n_head}")
        if self.n_head % self.kv_heads:
            raise ValueError(f"model.n_head={self.n_head} must be divisible by model.n_kv_head={self.n_kv_head}")
        if self.position not in ("learned", "rope", "none"):
            raise ValueError(f"model.position={self.position!r}: use learned, rope or none")
        if not self.layer_pattern or set(self.layer_pattern) - {"a", "m"}:
            raise ValueError(f"model.layer_pattern={self.layer_pattern!r}: one letter per block, a (attention) or m (Mamba), "
                             "e.g. mmmmammm for Jamba")
        if self.mamba_scan not in ("auto", "parallel", "sequential"):
            raise ValueError(f"model.mamba_scan={self.mamba_scan!r}: use auto, parallel or sequential")
        if self.attention not in ("standard", "mla", "diff", "nsa"):
            raise ValueError(f"model.attention={self.attention!r}: use standard, mla, diff or nsa")
        if self.attention == "nsa":
            if min(self.nsa_block, self.nsa_stride, self.nsa_select_block, self.nsa_select, self.nsa_window) < 1:
                raise ValueError("model.nsa_block, nsa_stride, nsa_select_block, nsa_select and nsa_window must be positive")
            if self.nsa_block % self.nsa_stride or self.nsa_select_block % self.nsa_stride:
                raise ValueError(f"model.nsa_block={self.nsa_block} and model.nsa_select_block={self.nsa_select_block} must be "
                                 f"multiples of model.nsa_stride={self.nsa_stride} (the paper: 32, 64 and 16)")
            if self.nsa_select < 3:
                raise ValueError(f"model.nsa_select={self.nsa_select}: at least 3 blocks (the first and two local ones are always read)")
        if self.attention == "diff" and (self.head_dim % 2 or (self.position == "rope" and self.head_dim % 4)):
            raise ValueError(f"model.attention=diff splits each head's queries and keys in two: head size {self.head_dim} must be "
                             "even (a multiple of 4 with RoPE)")
        if self.attention == "mla":
            if self.position != "rope":
                raise ValueError(f"model.attention=mla carries its positions in a decoupled RoPE key: set model.position=rope "
                                 f"(got {self.position!r})")
            if self.n_kv_head not in (None, self.n_head):
                raise ValueError("model.attention=mla: every head has its own key and value from the latent; leave model.n_kv_head unset")
            if self.kv_rank < 1 or self.rope_dim < 2 or self.rope_dim % 2:
                raise ValueError(f"model.mla_kv_rank={self.mla_kv_rank} must be positive and model.mla_rope_dim={self.mla_rope_dim} "
                                 "even and at least 2")
        if self.position == "rope" and self.rope_dim % 2:
            raise ValueError(f"RoPE needs an even head size; got n_embd/n_head={self.head_dim}")
        if self.moe_experts:
            if not 1 <= self.moe_top_k <= self.moe_experts:
                raise ValueError(f"model.moe_top_k={self.moe_top_k} must be between 1 and model.moe_experts={self.moe_experts}")
            if self.moe_every < 1:
                raise ValueError(f"model.moe_every={self.moe_every} must be at least 1")
            if self.moe_balance not in ("none", "aux", "loss_free", "loss_free_seq"):
                raise ValueError(f"model.moe_balance={self.moe_balance!r}: use none, aux, loss_free or loss_free_seq")
            if self.moe_score not in ("softmax", "sigmoid"):
                raise ValueError(f"model.moe_score={self.moe_score!r}: use softmax or sigmoid")

    @property
    def kv_heads(self) -> int:
        return self.n_kv_head or self.n_head

    @property
    def head_dim(self) -> int:
        return self.head_size or self.n_embd // self.n_head

    @property
    def kv_rank(self) -> int:
        """MLA's latent width d_c."""
        return self.mla_kv_rank or 4 * self.head_dim

    @property
    def rope_dim(self) -> int:
        """Width RoPE rotates per head: the whole head, or MLA's decoupled part."""
        if self.attention == "mla":
            return self.mla_rope_dim or self.head_dim // 2
        if self.attention == "diff":  # each half of a head's queries and keys is rotated on its own
            return self.head_dim // 2
        return self.head_dim

    @property
    def padded_vocab_size(self) -> int:
        return -(-self.vocab_size // self.pad_vocab_to) * self.pad_vocab_to

    def mixer(self, layer: int) -> Literal["attention", "mamba"]:
        """The token mixer of block `layer` (0-based)."""
        return "attention" if self.layer_pattern[layer % len(self.layer_pattern)] == "a" else "mamba"

    @property
    def attention_layers(self) -> list[int]:
        return [layer for layer in range(self.n_layer) if self.mixer(layer) == "attention"]

    def is_moe(self, layer: int) -> bool:
        """Whether block `layer` (0-based) has a mixture of experts instead of a dense MLP."""
        return self.moe_experts > 0 and layer >= self.moe_first_dense and (layer + 1) % self.moe_every == 0

    @property
    def moe_hidden_dim(self) -> int:
        return self.moe_hidden or max(1, self.hidden_dim // (self.moe_top_k + self.moe_shared))

    @property
    def hidden_dim(self) -> int:
        if self.mlp_hidden is not None:
            return self.mlp_hidden
        if self.mlp == "swiglu":  # LLaMA: keep 3 matrices at the parameter count of a 4x GELU MLP
            return -(-int(8 * self.n_embd / 3) // 64) * 64
        return 4 * self.n_embd
