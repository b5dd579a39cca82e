"""The data ablation's invariants: every arm starts from the same weights and reads its own corpus."""

from __future__ import annotations

import torch

from modules.training.corpus_arms import CorpusArmsModule


def test_arms_start_equal_and_read_their_own_corpus() -> None:
    """Every arm starts from the same weights; each arm's loss reads its own corpus's rows of a zipped batch."""
    module = CorpusArmsModule({"vocab_size": 64, "block_size": 16, "n_layer": 2, "n_head": 2, "n_embd": 16}, {}, {}, 10)
    first, *others = (module.decoder(a.name) for a in module.arms)
    for other in others:
        for (name, a), b in zip(first.state_dict().items(), other.state_dict().values()):
            assert torch.equal(a, b), name
    gen = torch.Generator().manual_seed(0)
    batch = {arm.corpus: torch.randint(0, 64, (2, 17), generator=gen) for arm in module.arms}
    for arm in module.arms:
        _, main, _ = module.arm_loss(arm, batch)
        rows = batch[arm.corpus]
        torch.testing.assert_close(main, first.loss(rows[:, :-1], rows[:, 1:]))
    assert module.tokens_in(batch) == len(module.arms) * 2 * 16
