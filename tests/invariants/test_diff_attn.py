"""Differential attention's invariants: lambda_init follows Ye et al. Eq. 2; the DIFF arm has the softmax arm's size."""

from __future__ import annotations

import math

import pytest

from modules.training.architectures import ArchitecturesModule
from repro.config import load_preset


def test_lambda_init_and_equal_size() -> None:
    """The diff-attn preset: block l's lambda_init is 0.8 - 0.6 exp(-0.3 (l - 1)) (Ye et al. Eq. 2), and the DIFF arm
    (4 heads of 32) has exactly the parameters of the softmax arm (8 heads of 16) but the lambdas and the head norms."""
    preset = load_preset("diff-attn", "tiny")
    module = ArchitecturesModule({**preset["model"], "vocab_size": 300}, {}, preset["architectures"], 10)
    diff, softmax = module.decoder("diff"), module.decoder("softmax")
    for layer, block in enumerate(diff.blocks):
        assert block.attn.lambda_init == pytest.approx(0.8 - 0.6 * math.exp(-0.3 * layer))
    extra = sum(p.numel() for n, p in diff.named_parameters() if "lambdas" in n or "subln" in n)
    assert diff.num_params() - extra == softmax.num_params()
