"""Multi-head latent attention (DeepSeek-V2) and the parameter / KV-cache calculator (DeepSeek-V3)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from modules.nn import Decoder, DecoderConfig
from modules.nn.attention import LatentAttention
from modules.nn.cache import KVCache, cache_bytes
from modules.nn.calculator import DEEPSEEK_V3, count, kv_cache_bytes_per_token
from modules.nn.position import rope_cache


def config(**overrides) -> DecoderConfig:
    base = dict(vocab_size=50, block_size=24, n_layer=2, n_head=4, n_embd=32, position="rope", norm="rmsnorm",
                attention="mla", mla_q_rank=12, mla_kv_rank=20, mla_rope_dim=6)
    return DecoderConfig(**{**base, **overrides})


def reference(m: LatentAttention, x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """DeepSeek-V2 Eq. 37-47 written out token by token and head by head, in float64."""
    H, d, r, dr = m.n_head, m.head_dim, m.kv_rank, m.rope_dim
    B, T, _ = x.shape

    def rotate(v: torch.Tensor, t: int) -> torch.Tensor:  # RoPE at position t on the last dim (rotate-half form)
        cos, sin = angles[0, t], angles[1, t]
        half = v.shape[-1] // 2
        return v * cos + torch.cat([-v[..., half:], v[..., :half]], -1) * sin

    out = torch.zeros(B, T, H * d, dtype=x.dtype)
    for b in range(B):
        c_q = m.q_norm(m.q_down(x[b]))  # (T, d_c')
        q = m.q_up(c_q).view(T, H, d + dr)
        latent = m.kv_down(x[b])
        c_kv, k_rope = m.kv_norm(latent[:, :r]), latent[:, r:]
        kv = m.kv_up(c_kv).view(T, H, 2 * d)
        for t in range(T):
            for h in range(H):
                q_t = torch.cat([q[t, h, :d], rotate(q[t, h, d:], t)])
                keys = torch.stack([torch.cat([kv[j, h, :d], rotate(k_rope[j], j)]) for j in range(t + 1)])
                weights = torch.softmax(keys @ q_t / math.sqrt(d + dr), dim=0)
                out[b, t, h * d : (h + 1) * d] = weights @ kv[: t + 1, h, d:]
    return m.proj(out)


def test_latent_attention_follows_the_papers_equations() -> None:
    torch.manual_seed(0)
    cfg = config()
    m = LatentAttention(cfg).double()
    for p in m.parameters():  # away from the init's ones and zeros, so every term matters
        torch.nn.init.normal_(p, std=0.3)
    x = torch.randn(2, 7, cfg.n_embd, dtype=torch.float64)
    angles = rope_cache(cfg.block_size, cfg.rope_dim, cfg.rope_base).double()
    torch.testing.assert_close(m(x, angles[:, :7]), reference(m, x, angles))


@pytest.mark.parametrize("q_rank", [0, 12])
def test_absorbed_decoding_equals_the_full_forward(q_rank: int) -> None:
    """Prefill then one token at a time through the cache: absorbed and plain reads both give the full
    forward's logits; a left-padded row gets the same logits as its prompt alone."""
    torch.manual_seed(0)
    m = Decoder(config(mla_q_rank=q_rank)).double().eval()
    idx = torch.randint(0, 50, (2, 12))
    full = m(idx)
    for absorb in (True, False):
        for block in m.blocks:
            block.attn.absorb = absorb
        cache = KVCache(m.config, 2, 24, torch.device("cpu"), torch.float64)
        steps = [m(idx[:, :5], cache), *[m(idx[:, t : t + 1], cache) for t in range(5, 12)]]
        torch.testing.assert_close(torch.cat(steps, 1), full)
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), idx[:1]], 1)
    valid = torch.cat([torch.zeros(1, 3, dtype=torch.bool), torch.ones(1, 12, dtype=torch.bool)], 1)
    cache = KVCache(m.config, 1, 24, torch.device("cpu"), torch.float64)
    torch.testing.assert_close(m(padded, cache, valid)[:, 3:], full[:1])


def test_the_cache_holds_the_latent_and_one_rope_key_per_token() -> None:
    """(d_c + d_R) values per token and layer (DeepSeek-V2, Table 1), measured on the buffers."""
    cfg = config()
    cache = KVCache(cfg, 3, 24, torch.device("cpu"), torch.bfloat16)
    assert cache.nbytes() == cache_bytes(cfg, 3, 24, torch.bfloat16) == 3 * 24 * cfg.n_layer * (20 + 6) * 2
    # DeepSeek-V2's choice d_c = 4 d_h, d_R = d_h / 2 caches as much as GQA with 2.25 groups
    v2 = config(mla_kv_rank=None, mla_rope_dim=None)
    assert cache_bytes(v2, 1, 1) / (2 * v2.head_dim * v2.n_layer * 2) == 2.25


def test_mla_trains() -> None:
    torch.manual_seed(0)
    m = Decoder(config())
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    data = torch.randint(0, 50, (4, 17))
    losses = []
    for _ in range(30):
        loss = m.loss(data[:, :-1], data[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_calculator_counts_what_the_decoder_builds() -> None:
    for attention, norm, mlp, bias, tie, experts in itertools.product(
            ["standard", "mla"], ["layernorm", "rmsnorm"], ["gelu", "swiglu"], [True, False], [True, False], [0, 4]):
        extra = {"n_kv_head": 2} if attention == "standard" else {"mla_q_rank": 12}
        cfg = DecoderConfig(vocab_size=50, block_size=16, n_layer=3, n_head=4, n_embd=32, attention=attention, norm=norm,
                            mlp=mlp, bias=bias, tie_embeddings=tie, moe_experts=experts, moe_first_dense=1,
                            position="rope" if attention == "mla" else "learned", **extra)
        with torch.device("meta"):
            decoder = Decoder(cfg)
        counts = count(cfg)
        assert (counts.total, counts.active) == (decoder.num_params(), decoder.num_params(active=True)), cfg


def test_deepseek_v3_has_671b_parameters_and_37b_activated() -> None:
    """The report's figures from the published config; the decoder built on the meta device agrees."""
    counts = count(DEEPSEEK_V3)
    assert round(counts.total / 1e9) == 671
    # activated: what a token's compute touches; the input embedding is a lookup (DeepSeek's 37B leaves it out)
    assert round((counts.active - DEEPSEEK_V3.padded_vocab_size * DEEPSEEK_V3.n_embd) / 1e9) == 37
    with torch.device("meta"):
        decoder = Decoder(DEEPSEEK_V3)
    assert decoder.num_params() == counts.total and decoder.num_params(active=True) == counts.active
    # the cache: (512 + 64) values per token and layer, 61 layers, bf16
    assert kv_cache_bytes_per_token(DEEPSEEK_V3) == (512 + 64) * 61 * 2


def test_mla_config_errors_say_what_to_set() -> None:
    with pytest.raises(ValueError, match="model.position=rope"):
        config(position="learned")
    with pytest.raises(ValueError, match="n_kv_head unset"):
        config(n_kv_head=2)
    with pytest.raises(ValueError, match="model.attention='flash'"):
        config(attention="flash")
