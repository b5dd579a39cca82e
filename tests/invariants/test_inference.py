"""Speculative inference's invariants: the target is frozen, the drafters start near ln V, a draft that always agrees
yields gamma + 1 tokens a pass."""

from __future__ import annotations

import math

import torch

from modules.decoding.draft import expected_speedup, expected_tokens_per_round
from modules.training.inference import InferenceModule


def test_target_frozen_and_drafters_start_at_log_vocab() -> None:
    """The target takes no gradient; the untrained draft costs about ln(V); a draft that always agrees (alpha 1)
    yields gamma + 1 tokens a pass and, at zero cost, a (gamma + 1)x speedup (Leviathan et al. Eq. 1, Thm. 3.8)."""
    module = InferenceModule({"vocab_size": 300, "block_size": 32, "n_layer": 2, "n_head": 2, "n_embd": 32}, {}, {}, 10)
    assert not any(p.requires_grad for p in module.target.parameters())
    batch = torch.randint(0, 300, (4, 33), generator=torch.Generator().manual_seed(0))
    losses = module.drafter_losses(batch)
    assert abs(float(losses["draft"]) - math.log(300)) < 0.1
    losses["eagle"].backward()
    assert all(p.grad is None for p in module.target.parameters())
    for gamma in (1, 3, 5):
        assert expected_tokens_per_round(1.0, gamma) == gamma + 1 == expected_speedup(1.0, gamma, 0.0)
