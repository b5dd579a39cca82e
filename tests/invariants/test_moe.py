"""MoE's invariants: an even split has MaxVio 0 and both balance losses equal their alpha."""

from __future__ import annotations

import pytest
import torch

from modules.nn.moe import MoE, max_violation

from ._helpers import small_config


def test_even_split_has_no_violation_and_aux_loss_alpha() -> None:
    """A router that splits tokens evenly over the experts has MaxVio 0, and both balance losses equal
    their alpha there (f_i = 1 and P_i = 1 / E for every expert); a lopsided split costs more."""
    assert max_violation(torch.full((3, 8), 5.0)).abs().max().item() == 0
    for balance in ("aux", "loss_free_seq"):
        config = small_config(mlp="swiglu", moe_experts=4, moe_top_k=2, moe_balance=balance, moe_aux_alpha=0.01, moe_seq_alpha=0.01)
        moe = MoE(config)
        affinity = torch.full((32, 4), 0.5)
        even = torch.stack([torch.arange(32) % 4, (torch.arange(32) + 1) % 4], -1)  # every expert takes 16 of 64 slots
        assert moe._balancing_loss(affinity, even, 2, 16).item() == pytest.approx(0.01, rel=1e-6), balance
        lopsided = torch.tensor([[0, 1]] * 32)
        skewed = torch.tensor([[0.9, 0.9, 0.1, 0.1]] * 32)
        assert moe._balancing_loss(skewed, lopsided, 2, 16).item() > 0.01, balance
