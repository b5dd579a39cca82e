"""Differential attention (Ye et al., ICLR 2025) against its formula, through the cache, and at equal size."""

from __future__ import annotations

import math

import pytest
import torch

from modules.nn import Decoder, DecoderConfig
from modules.nn.attention import DifferentialAttention, lambda_init
from modules.nn.cache import KVCache


def config(**overrides) -> DecoderConfig:
    return DecoderConfig(**{**dict(vocab_size=50, block_size=24, n_layer=3, n_head=2, n_embd=32, position="rope",
                                   norm="rmsnorm", attention="diff"), **overrides})


def reference(m: DifferentialAttention, x: torch.Tensor) -> torch.Tensor:
    """The paper's Eq. 1-3 with the softmax maps written out (no RoPE), float64."""
    B, T, _ = x.shape
    H, D = m.n_head, m.head_dim
    d = D // 2
    q, k, v = m.qkv(x).split(H * D, dim=-1)
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    lq1, lk1, lq2, lk2 = m.lambdas
    lam = math.exp((lq1 * lk1).sum()) - math.exp((lq2 * lk2).sum()) + m.lambda_init
    heads = []
    for h in range(H):
        # head h owns the paper's half-heads 2h and 2h + 1
        q1, q2 = q[..., (2 * h) * d : (2 * h + 1) * d], q[..., (2 * h + 1) * d : (2 * h + 2) * d]
        k1, k2 = k[..., (2 * h) * d : (2 * h + 1) * d], k[..., (2 * h + 1) * d : (2 * h + 2) * d]

        def softmax(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            return torch.softmax((a @ b.transpose(-1, -2) / math.sqrt(d)).masked_fill(~causal, -math.inf), dim=-1)

        out = (softmax(q1, k1) - lam * softmax(q2, k2)) @ v[..., h * D : (h + 1) * D]
        rms = out.pow(2).mean(-1, keepdim=True).add(1e-5).rsqrt()
        heads.append(out * rms * m.subln.weight * (1 - m.lambda_init))
    return m.proj(torch.cat(heads, dim=-1))


def test_lambda_init_follows_the_papers_schedule() -> None:
    assert lambda_init(0) == pytest.approx(0.2)
    assert [round(lambda_init(layer), 4) for layer in (1, 5, 27)] == [0.3555, 0.6661, 0.7998]
    blocks = Decoder(config()).blocks
    assert [b.attn.lambda_init for b in blocks] == [lambda_init(i) for i in range(3)]


def test_differential_attention_equals_its_formula() -> None:
    torch.manual_seed(0)
    m = DifferentialAttention(config(position="learned"), layer=2).double()
    for p in m.parameters():
        torch.nn.init.normal_(p, std=0.3)
    x = torch.randn(2, 9, 32, dtype=torch.float64)
    torch.testing.assert_close(m(x), reference(m, x))


def test_cached_decoding_equals_the_full_forward() -> None:
    torch.manual_seed(0)
    m = Decoder(config()).double().eval()
    idx = torch.randint(0, 50, (2, 12))
    cache = KVCache(m.config, 2, 24, torch.device("cpu"), torch.float64)
    steps = [m(idx[:, :5], cache), *[m(idx[:, t : t + 1], cache) for t in range(5, 12)]]
    torch.testing.assert_close(torch.cat(steps, 1), m(idx))


def test_equal_size_to_a_softmax_transformer_of_twice_the_heads() -> None:
    """The paper's comparison: DIFF with h heads of 2d against softmax attention with 2h heads of d; only the
    lambdas and the per-head norm are extra."""
    diff, softmax = Decoder(config()), Decoder(config(attention="standard", n_head=4))
    extra = sum(b.attn.lambdas.numel() + b.attn.subln.weight.numel() for b in diff.blocks)
    assert diff.num_params() == softmax.num_params() + extra


def test_bad_settings_say_what_to_change() -> None:
    with pytest.raises(ValueError, match="head size"):
        config(n_head=16)  # head size 2: halves of 1, which RoPE cannot rotate
    with pytest.raises(ValueError, match="n_kv_head unset"):
        Decoder(config(n_kv_head=1))
