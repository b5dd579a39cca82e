"""The Mamba mixer: the parallel scan against the recurrence it computes."""

from __future__ import annotations

import pytest
import torch

from modules.nn.mamba import MambaMixer, selective_scan


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
