"""DPO and its variants against hand-computed values and their papers' formulas; sequence log-probs against a loop."""

from __future__ import annotations

import math

import pytest
import torch

from modules.training.dpo import dpo_loss, implicit_rewards, ipo_loss, sequence_logps, simpo_loss


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def test_dpo_loss_matches_its_formula() -> None:
    # h_c = -1 - (-2) = 1, h_r = -3 - (-2.5) = -0.5; beta 0.1 -> logits 0.15
    loss = dpo_loss(torch.tensor([-1.0]), torch.tensor([-3.0]), torch.tensor([-2.0]), torch.tensor([-2.5]), beta=0.1)
    assert loss.item() == pytest.approx(-math.log(sigmoid(0.15)), rel=1e-6)
    # equal log-ratios: ln 2 whatever beta
    assert dpo_loss(torch.tensor([0.3]), torch.tensor([0.3]), torch.zeros(1), torch.zeros(1), beta=5.0).item() == pytest.approx(math.log(2))


def test_conservative_dpo_mixes_both_labels() -> None:
    eps, logits = 0.2, 0.15
    loss = dpo_loss(torch.tensor([-1.0]), torch.tensor([-3.0]), torch.tensor([-2.0]), torch.tensor([-2.5]), beta=0.1, label_smoothing=eps)
    assert loss.item() == pytest.approx(-(1 - eps) * math.log(sigmoid(logits)) - eps * math.log(sigmoid(-logits)), rel=1e-6)


def test_ipo_regresses_the_margin_to_one_over_two_beta() -> None:
    # margin 1.5, beta 0.5 -> target 1 -> (1.5 - 1)^2
    assert ipo_loss(torch.tensor([-1.0]), torch.tensor([-3.0]), torch.tensor([-2.0]), torch.tensor([-2.5]), beta=0.5).item() == pytest.approx(0.25)
    assert ipo_loss(torch.tensor([0.0]), torch.tensor([-1.0]), torch.zeros(1), torch.zeros(1), beta=0.5).item() == 0.0


def test_simpo_uses_length_normalized_logps_and_a_margin() -> None:
    # means -0.5 and -1.0, beta 2, gamma 0.5 -> -log sigmoid(2 * 0.5 - 0.5)
    assert simpo_loss(torch.tensor([-0.5]), torch.tensor([-1.0]), beta=2.0, gamma=0.5).item() == pytest.approx(-math.log(sigmoid(0.5)), rel=1e-6)


def test_implicit_reward() -> None:
    torch.testing.assert_close(implicit_rewards(torch.tensor([-1.0, -4.0]), torch.tensor([-2.0, -2.0]), 0.1), torch.tensor([0.1, -0.2]))


def test_sequence_logps_sum_the_response_tokens_only() -> None:
    torch.manual_seed(0)
    ids = torch.tensor([[5, 6, 7, 8, 0], [1, 2, 3, 0, 0]])
    prompt_len, last = torch.tensor([2, 1]), torch.tensor([3, 2])
    logits = torch.randn(2, 4, 10, dtype=torch.float64)
    total, count = sequence_logps(logits, ids, prompt_len, last)
    logp = torch.log_softmax(logits, -1)
    expected = [sum(logp[b, t - 1, ids[b, t]].item() for t in range(int(prompt_len[b]), int(last[b]) + 1)) for b in range(2)]
    assert total.tolist() == pytest.approx(expected)
    assert count.tolist() == [2, 2]


def test_frontier_kinds_and_domination() -> None:
    from modules.training.dpo import Arm
    from repro.techniques.dpo import kind_of, undominated

    kinds = [kind_of(Arm("a", "dpo", 0.1)), kind_of(Arm("b", "dpo", 0.1, label_smoothing=0.1)), kind_of(Arm("c", "dpo", 0.1, lora=True)),
             kind_of(Arm("d", "ipo", 0.1)), kind_of(Arm("e", "simpo", 2.0, gamma=0.5))]
    assert kinds == ["DPO", "cDPO", "LoRA-DPO", "IPO", "SimPO"]  # only plain DPO arms make DPO's frontier
    dpo = [{"kl": 1.0, "reward": 0.2}, {"kl": 3.0, "reward": 0.5}]
    ppo = [{"kl": 1.5, "reward": 0.1}, {"kl": 3.0, "reward": 0.5}, {"kl": 2.0, "reward": 0.3}, {"kl": 0.5, "reward": 0.0}]
    # (1.5, 0.1) and (3.0, 0.5) are matched; (2.0, 0.3) beats every DPO point at KL <= 2; nothing sits at KL <= 0.5
    assert undominated(dpo, ppo) == [{"kl": 2.0, "reward": 0.3}, {"kl": 0.5, "reward": 0.0}]


def test_frontier_claim_reads_its_points_from_the_metrics_and_its_arms_from_the_config() -> None:
    from repro.config import build_config
    from repro.techniques.dpo import DPOConfig, claims

    arms = [{"name": "dpo-beta0.1", "beta": 0.1}, {"name": "lora", "beta": 0.1, "lora": True}, {"name": "ipo", "loss": "ipo"}]
    config = build_config(DPOConfig, {"dpo": {"arms": arms}, "frontier": {"kl_targets": [2.0, 4.0]}})
    points = {"dpo-beta0.1": (1.0, 0.4), "lora": (0.1, 0.9), "ipo": (0.1, 0.9), "ppo-kl2": (2.0, 0.3), "ppo-kl4": (4.0, 0.6)}
    metrics = {k: v for name, (kl, reward) in points.items()
               for k, v in ((f"frontier/{name}/kl", kl), (f"frontier/{name}/true_reward", reward))}
    frontier, accuracy = claims(config, {**metrics, "val/dpo-beta0.1/accuracy": 0.7})
    # only the plain DPO arm is a DPO point: it matches PPO at KL 2 but not at KL 4, whatever the LoRA and IPO arms reach
    assert (frontier.measured, frontier.verdict) == (1, "not reproduced")
    assert frontier.detail == "1 DPO points (betas 0.1), 2 PPO points (KL targets 2, 4), the same 64 held-out prompts"
    assert accuracy.verdict == "reproduced"
    without_ppo = {k: v for k, v in metrics.items() if "ppo-kl" not in k}
    assert [c.verdict for c in claims(config, without_ppo)] == ["not measured", "not measured"]
