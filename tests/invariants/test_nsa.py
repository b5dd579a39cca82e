"""Native sparse attention's invariants: the arms start near ln V; the NSA arm is causal."""

from __future__ import annotations

import math

import torch

from modules.training.architectures import ArchitecturesModule
from repro.config import load_preset


def test_arms_start_at_log_vocab_and_stay_causal() -> None:
    """The nsa preset's arms, untrained, cost about ln(V); the NSA arm's outputs at a position ignore every later token."""
    preset = load_preset("nsa", "tiny")
    module = ArchitecturesModule({**preset["model"], "vocab_size": 300}, {}, preset["architectures"], 10)
    batch = torch.randint(0, 300, (2, 257), generator=torch.Generator().manual_seed(0))
    for arm in module.arms:
        with torch.no_grad():
            loss = module.decoder(arm.name).loss(batch[:, :-1], batch[:, 1:]).item()
        assert abs(loss - math.log(300)) < 0.1, (arm.name, loss)
    changed = batch.clone()
    changed[:, 200:] = (changed[:, 200:] + 1) % 300
    with torch.no_grad():
        nsa = module.decoder("nsa")
        torch.testing.assert_close(nsa(batch[:, :256])[:, :200], nsa(changed[:, :256])[:, :200])
