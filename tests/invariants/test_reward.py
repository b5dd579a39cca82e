"""Reward modelling's invariants: equal scores cost ln 2; the trunk starts as the base and reads up to the last token."""

from __future__ import annotations

import math

import pytest
import torch

from modules.nn import Decoder
from modules.training.pretrain import OptimConfig
from modules.training.reward import RewardModule, bradley_terry_loss

from ._helpers import small_config


def test_equal_scores_cost_ln2() -> None:
    """Bradley-Terry with r_chosen = r_rejected is -log sigmoid(0) = ln 2, whatever the scores."""
    scores = torch.randn(7, dtype=torch.float64)
    assert bradley_terry_loss(scores, scores).item() == pytest.approx(math.log(2))


def test_trunk_starts_as_the_base_and_reads_the_last_token() -> None:
    """After `init_from_base` the trunk is the base; a row's reward depends only on tokens up to `last`."""
    torch.manual_seed(0)
    base = Decoder(small_config())
    module = RewardModule(small_config(), OptimConfig(), max_steps=1)
    module.init_from_base(base)
    ids = torch.randint(0, 300, (2, 10))
    torch.testing.assert_close(module.model.trunk(ids), base(ids))
    changed = ids.clone()
    changed[:, 6:] = 7  # after `last`
    last = torch.tensor([5, 5])
    torch.testing.assert_close(module.model(ids, last), module.model(changed, last))
