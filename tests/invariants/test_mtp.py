"""Multi-token prediction's invariants: zeroed heads cost ln V at every depth; at lambda 0 MTP trains the decoder as
next-token prediction does."""

from __future__ import annotations

import math

import lightning as L
import torch

from modules.nn import Decoder
from modules.nn.mtp import MTPHeads
from modules.training.mtp import MTPModule, MTPSettings
from modules.training.pretrain import OptimConfig

from ._helpers import small_config


def test_uniform_heads_cost_log_vocab() -> None:
    """With the shared token table (and so the output head) zeroed, every head's logits are 0: each
    depth's loss is ln(V) exactly, V the padded vocabulary."""
    torch.manual_seed(0)
    for kind in ("sequential", "parallel"):
        config = small_config()
        decoder, heads = Decoder(config), MTPHeads(config, 2, kind)
        with torch.no_grad():
            decoder.wte.weight.zero_()
        tokens = torch.randint(0, 300, (3, 17))
        losses = heads.losses(decoder, decoder.hidden(tokens[:, :16]), tokens)
        assert [round(x.item(), 5) for x in losses] == [round(math.log(config.padded_vocab_size), 5)] * 2, kind


def test_zero_weight_leaves_the_decoder_as_next_token_training() -> None:
    """At lambda 0 the heads add nothing to the decoder's gradient: after a step, an MTP arm's decoder
    equals the next-token arm's (same start, same batch, same optimizer)."""
    torch.manual_seed(0)
    settings = MTPSettings(arms=[{"name": "ntp"}, {"name": "mtp", "depth": 2}], lambdas=[0.0])
    module = MTPModule(small_config(), OptimConfig(lr=1e-2, warmup_steps=1), settings, max_steps=2)
    start = module.decoder("ntp").wte.weight.detach().clone()
    batch = torch.randint(0, 300, (4, 17))
    trainer = L.Trainer(max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, accelerator="cpu")
    trainer.fit(module, torch.utils.data.DataLoader([b for b in batch.repeat(2, 1)], batch_size=4))
    ntp, mtp = module.decoder("ntp").state_dict(), module.decoder("mtp").state_dict()
    # Adam turns float noise in a gradient that is 0 analytically (the key bias) into steps of
    # up to 1e-5; a real difference moves weights by about the learning rate, 1e-2
    assert max((ntp[k] - mtp[k]).abs().max().item() for k in ntp) < 1e-4
    assert (ntp["wte.weight"] - start).abs().max().item() > 1e-3
