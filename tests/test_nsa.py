"""Native sparse attention: the module against a per-query float64 loop written from the paper's
equations, FlexAttention against the plain-PyTorch path, causality, training, and config errors."""

from __future__ import annotations

import math

import pytest
import torch

from modules.nn import Decoder, DecoderConfig
from modules.nn.cache import KVCache
from modules.nn.nsa import NativeSparseAttention

SMALL = dict(vocab_size=64, block_size=32, n_layer=2, n_head=4, n_kv_head=2, n_embd=32, attention="nsa", position="rope",
             norm="rmsnorm", mlp="swiglu", nsa_block=4, nsa_stride=2, nsa_select_block=4, nsa_select=3, nsa_window=6)


def attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax(q k / sqrt(d)) v for one query over a list of keys; (output, probabilities)."""
    if len(keys) == 0:
        return torch.zeros_like(q), torch.zeros(0, dtype=q.dtype)
    p = torch.softmax(keys @ q / math.sqrt(q.numel()), dim=0)
    return p @ values, p


def slow_nsa(module: NativeSparseAttention, x: torch.Tensor) -> torch.Tensor:
    """One query at a time, Eq. 5-12 of Yuan et al. 2025, in float64 loops (x: (T, C), no RoPE)."""
    T = x.shape[0]
    H, Hkv, hs, G = module.n_head, module.n_kv_head, module.head_dim, module.n_head // module.n_kv_head
    size, d, lp, n, w = module.block, module.stride, module.select_block, module.select, module.window
    q = module.q(x).view(T, H, hs)
    kc, vc, ks, vs, kw, vw = (t.view(T, Hkv, hs) for t in module.kv(x).chunk(6, dim=-1))
    gates = torch.sigmoid(module.gate(x)).view(T, H, 3)
    starts = list(range(0, T - size + 1, d))  # compressed block i covers tokens [i d, i d + size)
    ck = [[module.compress_k((kc[s : s + size, g] + module.block_pos[0]).flatten()) for s in starts] for g in range(Hkv)]
    cv = [[module.compress_v((vc[s : s + size, g] + module.block_pos[1]).flatten()) for s in starts] for g in range(Hkv)]
    out = torch.zeros(T, H, hs, dtype=x.dtype)
    for t in range(T):
        seen = [i for i, s in enumerate(starts) if s + size - 1 <= t]
        o_cmp, p_cmp = {}, {}
        for h in range(H):
            g = h // G
            o_cmp[h], p_cmp[h] = attention(q[t, h], torch.stack([ck[g][i] for i in seen]) if seen else torch.zeros(0, hs),
                                           torch.stack([cv[g][i] for i in seen]) if seen else torch.zeros(0, hs))
        for h in range(H):
            g = h // G
            blocks = range(t // lp + 1)
            importance = {j: sum(float(p_cmp[hh][m]) for hh in range(g * G, (g + 1) * G) for m, i in enumerate(seen)
                                 if starts[i] < (j + 1) * lp and starts[i] + size > j * lp) for j in blocks}
            forced = {0, t // lp, t // lp - 1} & set(blocks)
            ranked = sorted(forced) + sorted((j for j in blocks if j not in forced), key=lambda j: -importance[j])
            chosen = set(ranked[:n])
            sel = [s for s in range(t + 1) if s // lp in chosen]
            win = [s for s in range(t + 1) if t - s < w]
            o_sel, _ = attention(q[t, h], ks[sel, g], vs[sel, g])
            o_win, _ = attention(q[t, h], kw[win, g], vw[win, g])
            out[t, h] = gates[t, h, 0] * o_cmp[h] + gates[t, h, 1] * o_sel + gates[t, h, 2] * o_win
    return module.proj(out.reshape(T, H * hs))


def module(**overrides) -> NativeSparseAttention:
    torch.manual_seed(0)
    config = DecoderConfig(**{**SMALL, "position": "none", **overrides})
    m = NativeSparseAttention(config)
    with torch.no_grad():  # ties in the block ranking would make the order of equal scores matter
        m.block_pos.normal_(0, 0.5)
    return m


@pytest.mark.parametrize("T", [3, 13, 24])
def test_the_module_is_the_papers_equations(T: int) -> None:
    m = module().double()
    x = torch.randn(1, T, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(T))
    with torch.no_grad():
        torch.testing.assert_close(m(x)[0], slow_nsa(m, x[0]), rtol=1e-9, atol=1e-9)


def test_flex_attention_computes_what_the_plain_path_does() -> None:
    """Forward only: FlexAttention has no backward on a CPU (benchmarks/nsa.py compares gradients on a GPU)."""
    m = module()
    x = torch.randn(2, 24, 32, generator=torch.Generator().manual_seed(1))
    outputs = []
    with torch.no_grad():
        for kernel in ("reference", "flex"):
            m.kernel = kernel
            outputs.append(m(x))
    torch.testing.assert_close(outputs[1], outputs[0], rtol=1e-5, atol=1e-5)


def test_the_compressed_key_bias_gets_no_gradient() -> None:
    """b adds q . b to every compressed score of a query, which the softmax ignores: its exact gradient is
    zero (why benchmarks/nsa.py's per-parameter gradient comparison is noise for it)."""
    m = module().double()
    x = torch.randn(2, 24, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    m(x).square().mean().backward()
    assert m.compress_k.bias.grad.abs().max() < 1e-12 * m.compress_k.weight.grad.abs().max().clamp(min=1.0)
    assert m.compress_k.weight.grad.abs().max() > 1e-6


def test_auto_is_the_plain_path_on_a_cpu_and_for_short_contexts() -> None:
    from modules.nn import nsa

    m = module()
    x = torch.randn(1, 24, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        m.kernel = "reference"
        plain = m(x)
        m.kernel = "auto"
        torch.testing.assert_close(m(x), plain, rtol=0, atol=0)
    assert nsa.FLEX_FROM > 24


def test_every_query_reads_its_first_and_local_blocks_and_nothing_ahead() -> None:
    m = module()
    p = torch.softmax(torch.randn(1, 4, 24, 11), -1)  # any compressed scores
    chosen = m.selection(p, 24)  # (B, Hkv, T, blocks)
    own = torch.arange(24) // 4
    assert chosen[..., 0].all()
    assert chosen.gather(-1, own.view(1, 1, 24, 1).expand(1, 2, 24, 1)).all()
    assert not (chosen & (torch.arange(6)[None, :] > own[:, None])).any()  # no block after the query's own
    assert (chosen.sum(-1) == (own + 1).clamp(max=3)).all()  # nsa_select blocks once there are that many


def test_a_decoder_with_nsa_is_causal_and_learns() -> None:
    torch.manual_seed(0)
    model = Decoder(DecoderConfig(**SMALL))
    x = torch.randint(0, 64, (2, 24))
    changed = x.clone()
    changed[:, 15:] = (changed[:, 15:] + 1) % 64
    with torch.no_grad():
        torch.testing.assert_close(model(x)[:, :15], model(changed)[:, :15])
    batch = torch.randint(0, 8, (8, 1)).repeat(1, 25)  # each row one repeated token: learnable at once
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(20):
        loss = model.loss(batch[:, :-1], batch[:, 1:])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss))
    assert losses[-1] < 0.5 * losses[0]


def test_decoding_with_a_cache_and_bad_settings_are_refused() -> None:
    model = Decoder(DecoderConfig(**SMALL))
    cache = KVCache(model.config, 1, 8, torch.device("cpu"), torch.float32)
    with pytest.raises(NotImplementedError, match="no KV-cache decoding path"):
        model(torch.zeros(1, 4, dtype=torch.long), cache)
    with pytest.raises(ValueError, match="multiples of model.nsa_stride"):
        DecoderConfig(**{**SMALL, "nsa_block": 5})
    with pytest.raises(ValueError, match="at least 3 blocks"):
        DecoderConfig(**{**SMALL, "nsa_select": 2})


def test_the_speed_verdict_compares_the_longest_context_both_were_timed_at() -> None:
    from benchmarks.nsa import claims

    def rec(tokens: int, attention: str, fwd: float | None, both: float | None) -> dict:
        return {"tokens": tokens, "attention": attention, "fwd_ms": fwd, "fwd_bwd_ms": both}

    records = [rec(1024, "full (SDPA)", 1.0, 3.0), rec(1024, "NSA (flex)", 4.0, 6.0), rec(1024, "NSA (plain)", 2.0, 9.0),
               rec(8192, "full (SDPA)", 8.0, 24.0), rec(8192, "NSA (flex)", 2.0, None), rec(16384, "full (SDPA)", 30.0, 90.0)]
    fwd, both = claims({"records": records})
    assert fwd["measured"] == 4.0 and fwd["verdict"] == "reproduced" and "8192 tokens" in fwd["metric"]
    assert both["measured"] == 0.5 and both["verdict"] == "not reproduced" and "1024 tokens" in both["metric"]  # faster NSA path: 6 ms
    assert [c["verdict"] for c in claims({"records": records[-1:]})] == ["not measured"] * 2
