"""PPO's math against hand-computed values and a float64 reference, and PPO raising a reward it is given."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch

from datamodules.preference import PromptDataModule
from modules.nn import DecoderConfig
from modules.training.ppo import (AdaptiveKLController, PPOConfig, PPOModule, distinct_share, gae, masked_whiten, penalized_rewards,
                         policy_loss, response_mask, value_loss)


def test_gae_matches_hand_computation() -> None:
    # gamma 1, lambda 0.5: deltas 0.1, 0.1, 0.3 -> A = 0.225, 0.25, 0.3; returns = A + V
    advantages, returns = gae(torch.tensor([[0.0, 0.0, 1.0]]), torch.tensor([[0.5, 0.6, 0.7]]), torch.ones(1, 3), 1.0, 0.5)
    torch.testing.assert_close(advantages, torch.tensor([[0.225, 0.25, 0.3]]))
    torch.testing.assert_close(returns, torch.tensor([[0.725, 0.85, 1.0]]))


def test_gae_stops_at_the_end_of_a_short_row() -> None:
    # the row ends at index 1: the value 9.9 past its end must not leak into the advantages
    advantages, returns = gae(torch.tensor([[0.0, 1.0, 0.0]]), torch.tensor([[0.5, 0.6, 9.9]]),
                              torch.tensor([[1.0, 1.0, 0.0]]), 1.0, 0.5)
    torch.testing.assert_close(advantages, torch.tensor([[0.3, 0.4, 0.0]]))
    torch.testing.assert_close(returns, torch.tensor([[0.8, 1.0, 0.0]]))


def test_gae_matches_the_discounted_sum_of_deltas_in_float64() -> None:
    # an independent formula: A_t = sum_l (gamma lambda)^l delta_{t+l}
    g = torch.Generator().manual_seed(0)
    rewards, values = torch.randn(3, 7, generator=g), torch.randn(3, 7, generator=g)
    lengths = [7, 4, 1]
    mask = torch.tensor([[1.0] * n + [0.0] * (7 - n) for n in lengths])
    gamma, lam = 0.97, 0.9
    advantages, returns = gae(rewards * mask, values, mask, gamma, lam)
    for row, n in enumerate(lengths):
        r, v = rewards[row, :n].double(), values[row, :n].double()
        nxt = torch.cat([v[1:], torch.zeros(1, dtype=torch.float64)])
        delta = r + gamma * nxt - v
        expected = torch.tensor([sum((gamma * lam) ** k * delta[t + k] for k in range(n - t)) for t in range(n)])
        torch.testing.assert_close(advantages[row, :n].double(), expected, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(returns[row, :n].double(), expected + v, rtol=1e-5, atol=1e-6)
        assert (advantages[row, n:] == 0).all()


def test_policy_loss_clips_as_in_the_paper() -> None:
    # ratios 1.5, 0.5, 0.5 with advantages +1, +1, -1 and epsilon 0.2:
    # max(-1.5, -1.2) = -1.2 (clipped), max(-0.5, -0.8) = -0.5, max(0.5, 0.8) = 0.8 (clipped)
    logp = torch.log(torch.tensor([[1.5, 0.5, 0.5]]))
    loss, clip_fraction, approx_kl = policy_loss(logp, torch.zeros(1, 3), torch.tensor([[1.0, 1.0, -1.0]]), torch.ones(1, 3), 0.2)
    assert loss.item() == pytest.approx((-1.2 - 0.5 + 0.8) / 3)
    assert clip_fraction.item() == pytest.approx(2 / 3)
    assert approx_kl.item() == pytest.approx(0.5 * (math.log(1.5) ** 2 + 2 * math.log(0.5) ** 2) / 3)


def test_value_loss_takes_the_worse_of_clipped_and_unclipped() -> None:
    # V 1.0 from 0.5 with clip 0.2 -> clipped 0.7; (0.7 - 2)^2 = 1.69 > (1 - 2)^2 = 1 -> 0.5 * 1.69
    loss, clipped = value_loss(torch.tensor([[1.0]]), torch.tensor([[0.5]]), torch.tensor([[2.0]]), torch.ones(1, 1), 0.2)
    assert loss.item() == pytest.approx(0.845)
    assert clipped.item() == 1.0


def test_penalized_rewards_put_the_score_on_the_last_real_token() -> None:
    rewards, kl = penalized_rewards(torch.tensor([2.0]), torch.tensor([[-1.0, -2.0, -3.0]]), torch.full((1, 3), -1.5),
                                    torch.tensor([[1.0, 1.0, 0.0]]), kl_coef=0.5)
    torch.testing.assert_close(kl, torch.tensor([[0.5, -0.5, 0.0]]))
    torch.testing.assert_close(rewards, torch.tensor([[-0.25, 2.25, 0.0]]))


def test_adaptive_kl_controller_follows_ziegler_et_al() -> None:
    controller = AdaptiveKLController(0.1, target=4.0, horizon=2000)
    assert controller.update(8.0, 64) == pytest.approx(0.1 * (1 + 0.2 * 64 / 2000))  # error clipped at +0.2
    controller = AdaptiveKLController(0.1, target=4.0, horizon=2000)
    assert controller.update(3.0, 64) == pytest.approx(0.1 * (1 - 0.2 * 64 / 2000))  # -0.25 clipped at -0.2
    assert AdaptiveKLController(0.3, target=None, horizon=10).update(100.0, 64) == 0.3  # fixed


def test_masks_whitening_and_distinct_share() -> None:
    torch.testing.assert_close(response_mask(torch.tensor([[5, 0, 7, 0], [5, 6, 7, 8]]), eos_id=0),
                               torch.tensor([[1.0, 1.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]]))
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    white = masked_whiten(torch.tensor([[1.0, 2.0, 3.0, 100.0]]), mask)
    assert white[0, :3].mean().item() == pytest.approx(0.0, abs=1e-6) and white[0, 3] == 0
    assert distinct_share([[1], [1], [2], [3]], group=2) == pytest.approx(0.75)


def test_config_errors_name_the_setting() -> None:
    with pytest.raises(ValueError, match="ppo.reward"):
        PPOConfig(reward="vader")
    with pytest.raises(ValueError, match="kl_target"):
        PPOConfig(kl_target=-1.0)


def test_ppo_raises_a_reward_it_is_given() -> None:
    """A tiny random policy learns to write token 3 when each 3 in its continuation earns reward."""
    L.seed_everything(0, verbose=False)
    config = DecoderConfig(block_size=16, n_layer=1, n_head=2, n_embd=32, vocab_size=8)
    ppo = PPOConfig(reward="true", response_tokens=6, epochs=2, minibatch_size=16, kl_target=None, init_kl_coef=0.01, lr=3e-3)
    module = PPOModule(config, ppo, max_steps=25, true_reward=lambda rows: [sum(t == 3 for t in row) / len(row) for row in rows])
    module.init_from(module.model, None)  # the reference is the starting policy
    prompts = [[1, 2, 4, 5][i % 4 :] + [1, 2, 4, 5][: i % 4] for i in range(32)]
    data = PromptDataModule(prompts, prompts[:8], batch_size=32)
    before = module.evaluate_prompts(torch.tensor(prompts[:8]), seed=1)
    trainer = L.Trainer(max_steps=25, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, accelerator="cpu")
    trainer.fit(module, data)
    after = module.evaluate_prompts(torch.tensor(prompts[:8]), seed=1)
    assert sum(after["true_reward"]) / 32 > sum(before["true_reward"]) / 32 + 0.2
    assert float(trainer.callback_metrics["ppo/kl"]) > 0  # it moved off the reference to get there
