"""SFT's invariants: both arms start as the base, new token rows are the mean of their sources, the loss counts only
supervised tokens, a LoRA step moves only adapters and new rows."""

from __future__ import annotations

import pytest
import torch

from modules.nn import Decoder
from modules.nn.decoder import IGNORE
from modules.training.sft import LoraSettings, SFTModule, SFTOptimConfig

from ._helpers import small_config


def sft_module() -> tuple[SFTModule, Decoder]:
    torch.manual_seed(0)
    base = Decoder(small_config())
    module = SFTModule(small_config(vocab_size=304), SFTOptimConfig(), max_steps=1, lora=LoraSettings(r=4))
    module.init_from_base(base, {300: [1, 2], 301: [3], 302: [4, 5, 6], 303: [0]})
    return module, base


def test_arms_start_equal_to_the_base() -> None:
    """LoRA's B starts at zero and both arms copy the base: at step 0 every arm's logits are the base's
    on the base's tokens, exactly."""
    module, base = sft_module()
    idx = torch.randint(0, 300, (2, 16))
    with torch.no_grad():
        expected = base.eval()(idx)[..., :300]
        for model in module.arms.values():
            assert torch.equal(model.eval()(idx)[..., :300], expected)


def test_new_token_rows_are_the_mean_of_their_sources() -> None:
    module, base = sft_module()
    table, old = module.model.wte.weight, base.wte.weight
    assert torch.equal(table[:300], old[:300]) and torch.equal(module.model.lm_head.weight, table)
    torch.testing.assert_close(table[302], old[[4, 5, 6]].mean(0), rtol=0, atol=0)


def test_loss_counts_only_supervised_tokens() -> None:
    """With one supervised label in a batch, the loss is -log p of that one token (float64 reference)."""
    module, _ = sft_module()
    ids = torch.randint(0, 304, (2, 9))
    labels = torch.full_like(ids, IGNORE)
    labels[1, 5] = ids[1, 5]
    with torch.no_grad():
        loss = module.model.loss(ids[:, :-1], labels[:, 1:]).item()
        logits = module.model.double()(ids[:, :-1])
    assert loss == pytest.approx(-logits[1, 4].log_softmax(-1)[ids[1, 5]].item(), rel=1e-5)


def test_lora_arm_moves_only_adapters_and_new_token_rows() -> None:
    """One LoRA step changes the adapters and the new tokens' rows of the tied table, and no other weight."""
    torch.manual_seed(0)
    base = Decoder(small_config())
    module = SFTModule(small_config(vocab_size=304), SFTOptimConfig(lora_lr=1e-2, warmup_steps=0), max_steps=10,
                       lora=LoraSettings(r=4), new_tokens=[300, 301, 302, 303])
    module.init_from_base(base, {300: [1], 301: [2], 302: [3], 303: [0]})
    before = {k: v.clone() for k, v in module.lora_model.state_dict().items()}
    optimizers, _ = module.configure_optimizers()
    ids = torch.randint(0, 304, (4, 12))
    loss = module.lora_model.loss(ids[:, :-1], ids[:, 1:])
    loss.backward()
    optimizers[1].step()
    after = module.lora_model.state_dict()
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    assert moved and all("lora_" in k or k in ("wte.weight", "lm_head.weight") for k in moved)
    table_moved = (before["wte.weight"] != after["wte.weight"]).any(-1).nonzero().flatten().tolist()
    assert table_moved == [300, 301, 302, 303]
    assert module.trained_params("lora") == sum(p.numel() for n, p in module.lora_model.named_parameters() if "lora_" in n) + 4 * 32
