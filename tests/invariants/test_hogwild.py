"""Hogwild!'s invariants: with nothing to finish on, W workers take exactly max_new_tokens forward passes and write
W x max_new_tokens tokens into a shared cache of P + W n slots; a model whose logits are all equal writes its first
token everywhere; the claims' step ratio is the workers' passes over one worker's."""

from __future__ import annotations

import pytest
import torch

from modules.decoding.hogwild import hogwild_generate
from modules.nn import Decoder
from repro.config import build_config
from repro.techniques.hogwild import HogwildConfig, claims

from ._helpers import small_config


@pytest.mark.parametrize("workers", [1, 2, 4])
def test_uniform_model_runs_every_round_and_fills_the_shared_cache(workers: int) -> None:
    torch.manual_seed(0)
    model = Decoder(small_config(block_size=32)).eval()
    with torch.no_grad():
        model.wte.weight.zero_()  # tied head: every logit is 0, greedy picks token 0, no stop ever fires
    prompt, n = [5, 6, 7, 8], 6
    result = hogwild_generate(model, prompt, workers, n, stop=lambda tokens: False)
    assert result.steps == n and result.finisher is None
    assert result.tokens == [[0] * n] * workers and result.total_tokens == workers * n
    assert len(result.shared) == len(prompt) + workers * n and result.shared[: len(prompt)] == prompt


def test_claims_step_ratio_is_the_workers_passes_over_one_workers() -> None:
    config = build_config(HogwildConfig, {"sums": {"workers": [1, 2, 8]}})
    metrics = {"workers/1/steps": 8.0, "workers/8/steps": 2.0, "workers/1/accuracy": 0.5, "workers/8/accuracy": 0.5}
    steps, valid = claims(config, metrics)
    assert steps.measured == pytest.approx(0.25) and steps.verdict == "reproduced"
    assert valid.verdict == "reproduced" and valid.limit == pytest.approx(0.45)  # 0.9 x one worker's 0.5
    assert claims(config, {**metrics, "workers/8/accuracy": 0.4})[1].verdict == "not reproduced"
    assert claims(config, {**metrics, "workers/1/accuracy": 0.1})[1].verdict == "not measured"  # the model cannot add
