"""Pretraining's invariants: a uniform model costs ln V, GPT-2 initialisation just above it, the schedule meets its
formula, val/ppl is exp of the token-weighted val/loss."""

from __future__ import annotations

import math

import pytest
import torch

from modules.nn import Decoder
from modules.training.pretrain import OptimConfig, PretrainModule, warmup_cosine

from ._helpers import small_config


def test_uniform_model_loss_is_log_vocab() -> None:
    """With the token table (tied to the LM head) zeroed, every logit is 0: the loss is ln(V) exactly,
    V the padded vocabulary, whose extra rows take part in the training softmax as in nanoGPT."""
    torch.manual_seed(0)
    for pad in (1, 64):
        model = Decoder(small_config(pad_vocab_to=pad)).double()
        with torch.no_grad():
            model.wte.weight.zero_()
        idx = torch.randint(0, 300, (3, 16))
        targets = torch.randint(0, 300, (3, 16))
        loss = model.loss(idx, targets).item()
        assert loss == pytest.approx(math.log(model.config.padded_vocab_size), rel=1e-6), pad  # the loss is taken in fp32


def test_initial_loss_is_near_log_vocab() -> None:
    """GPT-2 initialisation (std 0.02) gives logits of spread about 0.02 * sqrt(n_embd) after the final
    norm: the first loss sits just above ln(V), by about half the logits' variance."""
    torch.manual_seed(0)
    model = Decoder(small_config(n_embd=64))
    idx, targets = torch.randint(0, 300, (8, 16)), torch.randint(0, 300, (8, 16))
    with torch.no_grad():
        logits = model(idx)
        spread = logits.float().var(-1).mean().item()
        loss = model.loss(idx, targets).item()
    assert loss == pytest.approx(math.log(300) + spread / 2, abs=0.02)


def test_schedule_hits_its_formula() -> None:
    """Warmup reaches 1 at its last step; cosine is (1 + min) / 2 half way and `min` at max_steps."""
    assert warmup_cosine(0, 10, 110, 0.1) == pytest.approx(0.1)
    assert warmup_cosine(9, 10, 110, 0.1) == pytest.approx(1.0)
    assert warmup_cosine(60, 10, 110, 0.1) == pytest.approx(0.55)
    assert warmup_cosine(110, 10, 110, 0.1) == pytest.approx(0.1)
    assert warmup_cosine(500, 10, 110, 0.1) == pytest.approx(0.1)


def test_validation_perplexity_is_exp_loss() -> None:
    """val/loss is the token-weighted mean over batches of unequal size, and val/ppl its exponential."""
    module = PretrainModule(small_config(), OptimConfig(), max_steps=1)
    logged: dict[str, torch.Tensor] = {}
    module.log_dict = lambda values, **_: logged.update(values)
    torch.manual_seed(0)
    batches = [torch.randint(0, 300, (b, 17)) for b in (3, 1, 2)]
    with torch.no_grad():
        for i, batch in enumerate(batches):
            module.validation_step(batch, i)
        module.on_validation_epoch_end()
        whole = torch.cat([module.model.loss(b[:, :-1], b[:, 1:]).repeat(b.shape[0]) for b in batches]).mean()
    assert logged["val/loss"].item() == pytest.approx(whole.item(), rel=1e-6)
    assert logged["val/ppl"].item() == pytest.approx(math.exp(logged["val/loss"].item()), rel=1e-6)
