"""Parameters and KV-cache bytes of a decoder, computed from its config alone (no weights, any size).

`count(config)` adds up every matrix the decoder of `modules/nn/decoder.py` builds (embeddings,
attention or MLA, dense or mixture-of-experts MLPs, norms, head) and splits them into total and
activated per token; tests check it against the real module's `num_params` on small configs.
`DEEPSEEK_V3` is the published DeepSeek-V3 configuration (its `config.json`: 61 layers, width
7168, MLA with d_c 512 / d_c' 1536 / RoPE 64, 1 shared + 256 routed experts of width 2048, top-8,
the first 3 layers dense at 18432): the calculator gives the report's 671B total and 37B activated.
"""

from __future__ import annotations

from dataclasses import dataclass

from modules.nn.cache import per_token
from modules.nn.config import DecoderConfig

DEEPSEEK_V3 = DecoderConfig(
    vocab_size=129280, block_size=4096, n_layer=61, n_head=128, n_embd=7168, head_size=128, norm="rmsnorm", norm_eps=1e-6,
    mlp="swiglu", mlp_hidden=18432, position="rope", bias=False, tie_embeddings=False, attention="mla", mla_kv_rank=512,
    mla_q_rank=1536, mla_rope_dim=64, moe_experts=256, moe_top_k=8, moe_shared=1, moe_hidden=2048, moe_first_dense=3,
    moe_score="sigmoid", moe_balance="loss_free",
)


@dataclass(frozen=True)
class Counts:
    """Parameter counts of one decoder: `total`, `active` (what one token uses: top-k of the routed experts),
    and the parts they are made of."""

    embedding: int  # token (and learned position) embeddings
    head: int  # the LM head when untied, and the final norm
    attention: int  # every block's token mixer with its norm
    dense_mlp: int  # dense MLPs with their norms
    moe_shared: int  # routers, shared experts and the MoE blocks' norms
    moe_routed: int  # every routed expert
    moe_routed_active: int  # top-k routed experts per MoE block

    @property
    def total(self) -> int:
        return self.embedding + self.head + self.attention + self.dense_mlp + self.moe_shared + self.moe_routed

    @property
    def active(self) -> int:
        return self.total - self.moe_routed + self.moe_routed_active


def norm_params(config: DecoderConfig, dim: int) -> int:
    return dim * (2 if config.norm == "layernorm" and config.bias else 1)


def attention_params(config: DecoderConfig) -> int:
    """One attention block's mixer (projections and MLA's inner norms), without the block's norm."""
    C, H, d = config.n_embd, config.n_head, config.head_dim
    out = H * d * C + (C if config.bias else 0)
    if config.attention == "mla":
        r, dr, rq = config.kv_rank, config.rope_dim, config.mla_q_rank
        query = (C * rq + rq + rq * H * (d + dr)) if rq else C * H * (d + dr)
        return query + C * (r + dr) + r + r * H * 2 * d + out
    qkv = (H + 2 * config.kv_heads) * d
    return C * qkv + (qkv if config.bias else 0) + out


def mlp_params(config: DecoderConfig, hidden: int, bias: bool) -> int:
    matrices = 3 if config.mlp == "swiglu" else 2
    return matrices * config.n_embd * hidden + ((matrices - 1) * hidden + config.n_embd if bias else 0)


def count(config: DecoderConfig) -> Counts:
    """Parameters of `Decoder(config)` (attention blocks only: Mamba blocks are counted by the module itself)."""
    if any(config.mixer(layer) != "attention" for layer in range(config.n_layer)):
        raise ValueError("count: Mamba blocks are not in the calculator; count Decoder(config) on the meta device")
    C, V = config.n_embd, config.padded_vocab_size
    block_norm = norm_params(config, C)
    embedding = V * C + (config.block_size * C if config.position == "learned" else 0)
    head = (0 if config.tie_embeddings else V * C) + norm_params(config, C)
    moe_layers = sum(config.is_moe(layer) for layer in range(config.n_layer))
    dense_layers = config.n_layer - moe_layers
    expert = mlp_params(config, config.moe_hidden_dim, bias=False)
    return Counts(
        embedding=embedding, head=head,
        attention=config.n_layer * (attention_params(config) + block_norm),
        dense_mlp=dense_layers * (mlp_params(config, config.hidden_dim, config.bias) + block_norm),
        moe_shared=moe_layers * (config.moe_experts * C + config.moe_shared * expert + block_norm),
        moe_routed=moe_layers * config.moe_experts * expert,
        moe_routed_active=moe_layers * config.moe_top_k * expert,
    )


def kv_cache_bytes_per_token(config: DecoderConfig, bytes_per_value: int = 2) -> int:
    """Cache bytes one token adds over all attention layers (bf16 by default)."""
    return per_token(config) * len(config.attention_layers) * bytes_per_value
