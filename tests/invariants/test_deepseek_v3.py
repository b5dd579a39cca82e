"""DeepSeek-V3's invariants: the calculator counts 671B parameters in the published config, and the module agrees."""

from __future__ import annotations

import torch

from modules.nn import Decoder, DecoderConfig
from modules.nn.calculator import DEEPSEEK_V3, count
from repro.config import load_preset


def test_published_config_counts_671b() -> None:
    """The calculator on DeepSeek-V3's config.json: 671B parameters; the tiny preset's model as the module counts it."""
    assert round(count(DEEPSEEK_V3).total / 1e9) == 671
    config = DecoderConfig(**{**load_preset("deepseek-v3", "tiny")["model"], "vocab_size": 300})
    with torch.device("meta"):
        assert Decoder(config).num_params() == count(config).total
