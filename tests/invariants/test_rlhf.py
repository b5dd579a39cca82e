"""RLHF's invariants: an untrained policy has zero KL from its reference; perfect values leave zero advantage."""

from __future__ import annotations

import torch

from modules.nn import Decoder
from modules.training.ppo import PPOConfig, PPOModule, gae

from ._helpers import small_config


def test_policy_starts_at_zero_kl_from_its_reference() -> None:
    """Before any update the policy is the reference: the sampled KL of every rollout is exactly 0."""
    torch.manual_seed(0)
    module = PPOModule(small_config(), PPOConfig(reward="true", response_tokens=5), max_steps=1)
    module.init_from(Decoder(small_config()), None)
    rollout = module.rollout(torch.randint(1, 300, (4, 3)), seed=0)
    assert ((rollout["logp"] - rollout["ref_logp"]) * rollout["mask"]).abs().max().item() == 0.0


def test_perfect_values_leave_no_advantage() -> None:
    """A constant final reward with values equal to it gives zero advantage everywhere (gamma = lambda = 1)."""
    rewards = torch.zeros(3, 5)
    rewards[:, -1] = 0.7
    advantages, returns = gae(rewards, torch.full((3, 5), 0.7), torch.ones(3, 5), 1.0, 1.0)
    assert advantages.abs().max().item() < 1e-7
    torch.testing.assert_close(returns, torch.full((3, 5), 0.7))
