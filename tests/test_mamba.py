"""The Mamba mixer (the parallel scan and the sequential recurrence against the recurrence they compute) and
the hybrid decoder it makes with attention: layer pattern, cache bytes, padding."""

from __future__ import annotations

import pytest
import torch

from modules.nn import Decoder, DecoderConfig
from modules.nn.cache import KVCache, cache_bytes
from modules.nn.mamba import MambaMixer, linear_recurrence, selective_scan
from modules.training.pretrain import decay_groups


def naive_scan(decay: torch.Tensor, inputs: torch.Tensor, h0: torch.Tensor) -> torch.Tensor:
    h, out = h0, []
    for t in range(decay.shape[1]):
        h = decay[:, t] * h + inputs[:, t]
        out.append(h)
    return torch.stack(out, 1)


@pytest.mark.parametrize("chunk", [1, 3, 8, 64])
def test_scan_matches_the_recurrence(chunk: int) -> None:
    torch.manual_seed(0)
    decay = torch.rand(2, 21, 5, 4, dtype=torch.float64)
    inputs = torch.randn(2, 21, 5, 4, dtype=torch.float64)
    h0 = torch.randn(2, 5, 4, dtype=torch.float64)
    states, last = selective_scan(decay, inputs, h0, chunk)
    expected = naive_scan(decay, inputs, h0)
    torch.testing.assert_close(states, expected)
    torch.testing.assert_close(last, expected[:, -1])


def mixer() -> MambaMixer:
    torch.manual_seed(0)
    return MambaMixer(16, d_state=4, d_conv=4, expand=2, chunk=5).double()


def test_mixer_scan_equals_step_by_step_decoding() -> None:
    m = mixer()
    u = torch.randn(2, 13, 16, dtype=torch.float64)
    full = m(u)
    state = m.new_state(2, u.device, torch.float64)
    steps = torch.stack([m.step(u[:, t], state) for t in range(13)], 1)
    torch.testing.assert_close(steps, full)


def test_prefill_then_continue_equals_one_pass() -> None:
    m = mixer()
    u = torch.randn(2, 13, 16, dtype=torch.float64)
    state = m.new_state(2, u.device, torch.float64)
    parts = [m(u[:, :6], state), m(u[:, 6:7], state), torch.stack([m.step(u[:, t], state) for t in range(7, 13)], 1)]
    torch.testing.assert_close(torch.cat(parts, 1), m(u))


def test_mixer_is_causal_and_its_state_does_not_grow() -> None:
    m = mixer()
    u = torch.randn(1, 12, 16, dtype=torch.float64)
    changed = u.clone()
    changed[:, 8:] += 1.0
    torch.testing.assert_close(m(changed)[:, :8], m(u)[:, :8])
    assert not torch.allclose(m(changed)[:, 8:], m(u)[:, 8:])
    assert m.state_bytes(1) == 32 * (3 * 4 + 4 * 4)  # conv window and states, whatever the context


def test_delta_starts_in_its_range() -> None:
    m = MambaMixer(32)
    delta = torch.nn.functional.softplus(m.dt_proj.bias)
    assert delta.min() >= 1e-3 * 0.999 and delta.max() <= 0.1 * 1.001


def test_sequential_recurrence_matches_the_scan_in_values_and_gradients() -> None:
    torch.manual_seed(0)
    args = [torch.rand(2, 9, 3, 4, dtype=torch.float64), torch.randn(2, 9, 3, 4, dtype=torch.float64),
            torch.randn(2, 3, 4, dtype=torch.float64)]
    args = [a.requires_grad_() for a in args]
    assert torch.autograd.gradcheck(linear_recurrence, args)
    states, last = linear_recurrence(*args)
    torch.testing.assert_close(states, naive_scan(*args))
    weights = torch.randn_like(states)
    grads = torch.autograd.grad((states * weights).sum() + last.sum(), args)
    ref_states, ref_last = selective_scan(*args, chunk=4)
    ref_grads = torch.autograd.grad((ref_states * weights).sum() + ref_last.sum(), args)
    for got, expected in zip(grads, ref_grads):
        torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("scan", ["parallel", "sequential"])
def test_left_padding_leaves_the_state_of_the_tokens_alone(scan: str) -> None:
    torch.manual_seed(0)
    m = MambaMixer(16, d_state=4, chunk=3, scan=scan).double()
    u = torch.randn(1, 7, 16, dtype=torch.float64)
    padded = torch.cat([torch.randn(1, 4, 16, dtype=torch.float64), u], 1)
    valid = torch.tensor([[False] * 4 + [True] * 7])
    alone, state = m.new_state(1, u.device, torch.float64), m.new_state(1, u.device, torch.float64)
    expected = m(u, alone)
    torch.testing.assert_close(m(padded, state, valid)[:, 4:], expected)
    torch.testing.assert_close(state.ssm, alone.ssm)
    torch.testing.assert_close(state.conv, alone.conv)


def hybrid(**overrides) -> Decoder:
    torch.manual_seed(0)
    config = dict(vocab_size=50, block_size=64, n_layer=8, n_head=2, n_embd=16, layer_pattern="mmmmammm",
                  position="none", mamba_d_state=4)
    return Decoder(DecoderConfig(**{**config, **overrides}))


def test_layer_pattern_places_the_mixers() -> None:
    m = hybrid(moe_experts=4, moe_every=2, mlp="swiglu")
    assert [b.attn is not None for b in m.blocks] == [False] * 4 + [True] + [False] * 3  # Jamba's attention offset 4
    assert [b.mamba is not None for b in m.blocks] == [True] * 4 + [False] + [True] * 3
    assert len(m.moe_layers()) == 4 and m.config.attention_layers == [4]
    assert m.wpe is None and m.rope is None  # no positional encoding
    assert DecoderConfig(layer_pattern="am", n_layer=3).attention_layers == [0, 2]  # cycled
    for bad in ("", "amx"):
        with pytest.raises(ValueError, match="model.layer_pattern=.*a \\(attention\\) or m \\(Mamba\\)"):
            DecoderConfig(layer_pattern=bad)


def test_cache_bytes_computed_equal_the_buffers_and_only_attention_grows() -> None:
    for pattern in ("a", "m", "mmmmammm"):
        m = hybrid(layer_pattern=pattern)
        for context in (8, 64):
            cache = KVCache(m.config, 3, context, torch.device("cpu"), torch.bfloat16)
            assert cache.nbytes() == cache_bytes(m.config, 3, context, torch.bfloat16)
    short, long = (cache_bytes(hybrid(layer_pattern="m").config, 1, n) for n in (8, 64))
    assert short == long == 7 * 0 + 8 * 32 * (3 * 2 + 4 * 4)  # 8 Mamba layers of 32 channels: conv window + states
    transformer, jamba = (cache_bytes(hybrid(layer_pattern=p).config, 1, 64) for p in ("a", "mmmmammm"))
    assert transformer == 8 * 2 * 16 * 64 * 2 and jamba == transformer // 8 + 7 * 32 * (3 * 2 + 4 * 4)


def test_a_hybrid_cache_cannot_roll_back() -> None:
    m = hybrid().eval()
    cache = KVCache(m.config, 1, 16, torch.device("cpu"), torch.float32)
    with torch.no_grad():
        m(torch.tensor([[1, 2, 3, 4]]), cache)
    cache.truncate(4)  # to where it is: nothing to undo
    with pytest.raises(ValueError, match="Mamba state cannot be rolled back"):
        cache.truncate(2)


def test_a_is_not_weight_decayed_and_a_hybrid_learns() -> None:
    m = hybrid()
    decayed, kept = decay_groups(m.parameters(), 0.1)
    a_logs = {id(b.mamba.A_log) for b in m.blocks if b.mamba is not None}
    assert a_logs <= {id(p) for p in kept["params"]} and not a_logs & {id(p) for p in decayed["params"]}
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    start = torch.randint(0, 50, (4, 1), generator=torch.Generator().manual_seed(1))
    batch = (start + 7 * torch.arange(33)) % 50  # each token follows from the one before
    losses = []
    for _ in range(30):
        loss = m.loss(batch[:, :-1], batch[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_parallel_scan_matches_the_cpu_recurrence_in_float64() -> None:
    """The GPU's path (auto: the chunked parallel scan), float32 on CUDA, against the sequential
    recurrence in float64 on the CPU: a hybrid's logits and a Mamba mixer's gradients."""
    m = hybrid(mamba_chunk=16)
    reference = hybrid(mamba_chunk=16).double()
    idx = torch.randint(0, 50, (3, 64), generator=torch.Generator().manual_seed(2))
    cuda = m.cuda()
    torch.testing.assert_close(cuda(idx.cuda()).double().cpu(), reference(idx), atol=1e-4, rtol=1e-4)
    mixer_cpu = MambaMixer(16, d_state=4, chunk=8).double()
    mixer_gpu = MambaMixer(16, d_state=4, chunk=8).cuda()
    mixer_gpu.load_state_dict(mixer_cpu.state_dict())
    u = torch.randn(2, 50, 16, dtype=torch.float64, requires_grad=True)
    u_gpu = u.detach().float().cuda().requires_grad_()
    mixer_cpu(u).pow(2).sum().backward()
    mixer_gpu(u_gpu).pow(2).sum().backward()
    torch.testing.assert_close(u_gpu.grad.double().cpu(), u.grad, atol=1e-4, rtol=1e-3)
    torch.testing.assert_close(mixer_gpu.A_log.grad.double().cpu(), mixer_cpu.A_log.grad, atol=1e-4, rtol=1e-3)
