"""The one manual multi-arm optimizer step (`modules.training.arms.step_arm`): global_step counts batches, every arm learns.

Lightning's wrapped optimizer counts `trainer.global_step` on each `step()`; a training step that
updates several arms (or one optimizer several times, as PPO's minibatches) must step through the
wrapper once. Were every arm's step counted, max_steps would stop a run of two arms after half its
batches, and checkpoints, validation and logged steps would drift with the number of arms.
"""

from __future__ import annotations

import lightning as L
import pytest
import torch

from modules.training.arms import arm_optimizers, step_arm


class TwoArms(L.LightningModule):
    """Two linear arms on the same batches, each with its own SGD and a schedule halving its rate every step;
    `updates` extra updates of each arm per batch stand in for minibatches."""

    def __init__(self, grad_clip: float = 0.0, updates: int = 1) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.arms = torch.nn.ModuleList([torch.nn.Linear(4, 1), torch.nn.Linear(4, 1)])
        self.grad_clip, self.updates = grad_clip, updates
        self.raw_steps = [0, 0]  # torch-level steps of each arm's optimizer
        self.steps_seen: list[list[int]] = []  # global_step after each arm's updates, per batch

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> None:
        seen = []
        for index, (arm, (opt, sched)) in enumerate(zip(self.arms, arm_optimizers(self), strict=True)):
            for update in range(self.updates):
                last = update == self.updates - 1
                loss = (arm(batch) - 1).pow(2).mean()
                step_arm(self, opt, loss, self.grad_clip, counts=index == 0 and last, scheduler=sched if last else None)
            seen.append(self.global_step)
        self.steps_seen.append(seen)

    def configure_optimizers(self) -> tuple[list, list]:
        optimizers = [torch.optim.SGD(arm.parameters(), lr=0.1) for arm in self.arms]
        for index, opt in enumerate(optimizers):
            opt.register_step_post_hook(lambda *_, index=index: self.raw_steps.__setitem__(index, self.raw_steps[index] + 1))
        schedulers = [torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5**step) for opt in optimizers]
        return optimizers, [{"scheduler": s, "interval": "step"} for s in schedulers]


def fit(module: L.LightningModule, batches: int, max_steps: int) -> L.Trainer:
    torch.manual_seed(0)
    data = torch.utils.data.DataLoader(torch.randn(batches * 2, 4), batch_size=2)
    trainer = L.Trainer(max_steps=max_steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, accelerator="cpu")
    trainer.fit(module, data)
    return trainer


@pytest.mark.parametrize("updates", [1, 3])
def test_global_step_counts_batches_and_every_arm_learns(updates: int) -> None:
    module = TwoArms(updates=updates)
    torch.manual_seed(1)
    before = [{k: v.clone() for k, v in arm.state_dict().items()} for arm in module.arms]
    trainer = fit(module, batches=8, max_steps=4)
    assert trainer.global_step == 4
    # one count per batch, taken at the first arm's step: both arms of batch k see step k + 1
    assert module.steps_seen == [[1, 1], [2, 2], [3, 3], [4, 4]]
    assert module.raw_steps == [4 * updates, 4 * updates]  # every update of every arm reached its optimizer
    for arm, start in zip(module.arms, before):
        assert all(not torch.equal(arm.state_dict()[k], v) for k, v in start.items())
    for opt in trainer.optimizers:  # each schedule stepped once per batch: lr = 0.1 * 0.5^4
        assert opt.param_groups[0]["lr"] == pytest.approx(0.1 * 0.5**4)


def test_gradient_norm_is_clipped_before_the_step() -> None:
    module = TwoArms(grad_clip=1e-3)
    torch.manual_seed(1)
    before = [torch.cat([p.detach().flatten().clone() for p in arm.parameters()]) for arm in module.arms]
    fit(module, batches=1, max_steps=1)
    for arm, start in zip(module.arms, before):
        moved = torch.cat([p.detach().flatten() for p in arm.parameters()]) - start
        # SGD at lr 0.1 moves by 0.1 x the gradient, whose norm is clipped to 1e-3
        assert moved.norm().item() == pytest.approx(0.1 * 1e-3, rel=1e-4)


def test_dpo_arms_keep_their_checkpoint_keys_and_headline_metrics() -> None:
    """DPO's arms are an ArmsModule's: their weights stay under policies.<arm> (and model., the first arm),
    and validation's headline is loss and accuracy."""
    from modules.training.dpo import DPOModule, DPOSettings

    config = {"vocab_size": 32, "block_size": 12, "n_layer": 1, "n_head": 2, "n_embd": 16}
    arms = [{"name": "dpo-b0.1", "loss": "dpo"}, {"name": "ipo", "loss": "ipo", "lora": True}]
    module = DPOModule(config, DPOSettings(arms=arms), max_steps=2)
    assert {k.split(".")[0] for k in module.state_dict()} == {"policies", "model"}
    assert {k.split(".")[1] for k in module.state_dict() if k.startswith("policies.")} == {"dpo-b0_1", "ipo"}
    logged: dict[str, torch.Tensor] = {}
    module.log_dict = lambda values, **_: logged.update(values)
    torch.manual_seed(0)
    batch = {"ids": torch.randint(1, 32, (4, 10)), "last": torch.tensor([9, 8, 9, 7]), "prompt_len": torch.tensor([3, 3, 4, 4])}
    batch["ref_logps"] = torch.zeros(4)
    module.trainer = L.Trainer(logger=False, accelerator="cpu")  # on_validation_epoch_end reads sanity_checking
    with torch.no_grad():
        module.validation_step(batch, 0)
        module.on_validation_epoch_end()
    assert set(logged) == {"val/dpo-b0.1/loss", "val/dpo-b0.1/accuracy", "val/ipo/loss", "val/ipo/accuracy", "val/loss", "val/accuracy"}
    torch.testing.assert_close(logged["val/loss"], logged["val/dpo-b0.1/loss"])
