"""DPO's invariants: a policy equal to its reference costs ln 2 with margin 0; IPO is zero at its target margin."""

from __future__ import annotations

import math

import pytest
import torch

from modules.nn import Decoder
from modules.training.dpo import DPOModule, DPOSettings, ipo_loss, reference_logps

from ._helpers import small_config


def test_policy_equal_to_reference_costs_ln2() -> None:
    """At the start every arm is the reference: DPO's loss is ln 2 and every implicit reward is 0, whatever the pair."""
    torch.manual_seed(0)
    base = Decoder(small_config())
    arms = [{"name": "dpo", "loss": "dpo", "beta": 0.3}, {"name": "lora", "loss": "dpo", "beta": 0.3, "lora": True}]
    module = DPOModule(small_config(), DPOSettings(arms=arms), max_steps=1)
    module.init_from(base)
    ids = torch.randint(1, 300, (4, 9))
    batch = {"ids": ids, "last": torch.tensor([8, 6, 8, 7]), "prompt_len": torch.tensor([3, 3, 3, 3])}
    batch["ref_logps"] = reference_logps(base, [batch])
    for arm in module.arms:
        loss, stats = module._arm_terms(arm, batch)
        assert loss.item() == pytest.approx(math.log(2), abs=1e-6)
        assert stats["margin"].abs().item() < 1e-5


def test_ipo_is_zero_at_its_target_margin() -> None:
    """IPO's loss vanishes exactly when the log-ratio margin equals 1 / (2 beta)."""
    beta = 0.25
    loss = ipo_loss(torch.tensor([2.0], dtype=torch.float64), torch.tensor([0.0], dtype=torch.float64),
                    torch.tensor([0.0], dtype=torch.float64), torch.tensor([0.0], dtype=torch.float64), beta)
    assert loss.item() == 0.0
