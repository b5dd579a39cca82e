"""Hybrid's invariants: a forgetful Mamba mixer is its per-token formula; the arms start at equal size and near ln V."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from modules.nn import DecoderConfig
from modules.nn.mamba import MambaMixer
from modules.training.hybrid import HybridModule, HybridSettings, check_equal_params
from repro.config import load_preset


def test_forgetful_ssm_reduces_to_its_per_token_formula() -> None:
    """With A -> -inf every state decays to 0 in one step and with a 1-wide conv nothing mixes tokens:
    Mamba's output at t is then out(silu(z_t) * (Delta_t (B_t . C_t) x_t + D x_t)), x_t = silu(conv(x_t)),
    computed here by hand in float64."""
    torch.manual_seed(0)
    m = MambaMixer(8, d_state=4, d_conv=1, expand=2).double()
    with torch.no_grad():
        m.A_log.fill_(50.0)  # A = -e^50: exp(Delta A) underflows to 0 for any Delta > 0
    u = torch.randn(2, 6, 8, dtype=torch.float64)
    x, z = m.in_proj(u).chunk(2, dim=-1)
    x = F.silu(x * m.conv.weight[:, 0, 0] + m.conv.bias)
    dt, Bm, Cm = m.x_proj(x).split([m.dt_rank, 4, 4], dim=-1)
    delta = F.softplus(m.dt_proj(dt))
    y = delta * (Bm * Cm).sum(-1, keepdim=True) * x + m.D * x
    torch.testing.assert_close(m(u), m.out_proj(y * F.silu(z)))


def test_arms_start_at_equal_size_and_log_vocab() -> None:
    """The tiny preset's arms hold parameter counts within its tolerance, and each untrained arm's loss
    is near ln(V) (GPT-2 initialisation keeps the logits near 0 whatever the mixers)."""
    preset = load_preset("hybrid", "tiny")
    config = DecoderConfig(**{**preset["model"], "vocab_size": 300})
    counts = check_equal_params(config, HybridSettings(**preset["hybrid"]))
    assert max(counts.values()) / min(counts.values()) < 1.05
    module = HybridModule({**preset["model"], "vocab_size": 300, "n_layer": 8}, {}, preset["hybrid"], 10)
    batch = torch.randint(0, 300, (2, 33))
    for arm in module.arms:
        with torch.no_grad():
            loss = module.decoder(arm.name).loss(batch[:, :-1], batch[:, 1:]).item()
        assert abs(loss - math.log(300)) < 0.1, (arm.name, loss)
