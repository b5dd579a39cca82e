"""Arms side by side: several decoders trained on the same batches, each with its own AdamW.

The comparisons of the suite (MTP against next-token prediction, balancing schemes of a mixture of
experts) need arms that see the same tokens in the same order from the same start. `ArmsModule`
holds one decoder (and any extra trained modules) per arm, steps each arm's optimizer once per
batch, times each arm, and keeps each arm's main loss per step and per validation for the report.
A subclass says what an arm is (`build_arm`), what it minimises (`arm_loss`), what validation
measures (`arm_metrics`), and may act after each arm's step (`after_step`).
"""

from __future__ import annotations

import time
from typing import Any

import lightning as L
import torch
from torchmetrics import MeanMetric

from modules.nn import Decoder
from modules.pretrain import OptimConfig, decay_groups, warmup_cosine


def key(name: str) -> str:
    """A module name for an arm (module names cannot hold ".")."""
    return name.replace(".", "_")


def check_arm_names(section: str, names: list[str]) -> None:
    """An `arms` list of a preset section names at least one arm and each arm once."""
    if not names:
        raise ValueError(f"{section}.arms: name at least one arm")
    if len(set(names)) != len(names):
        raise ValueError(f"{section}.arms: arm names must differ, got {names}")


class ArmsModule(L.LightningModule):
    """Base of multi-arm techniques; `self.arms` has `.name`; `model` is the first arm's decoder."""

    def __init__(self, arms: list[Any], optim: OptimConfig, max_steps: int, grad_clip: float) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.arms, self.optim, self.max_steps, self.grad_clip = arms, optim, max_steps, grad_clip
        self.decoders = torch.nn.ModuleDict()
        self.extras = torch.nn.ModuleDict()  # per arm, trained modules beside its decoder (MTP heads)
        for arm in arms:
            decoder, extra = self.build_arm(arm)
            self.decoders[key(arm.name)] = decoder
            if extra is not None:
                self.extras[key(arm.name)] = extra
        self.model = self.decoders[key(arms[0].name)]
        self.val_metrics = torch.nn.ModuleDict()  # "<arm>__<metric>" -> MeanMetric, made on first use
        self.arm_seconds = {a.name: 0.0 for a in arms}  # training time per arm (forward, backward, step)
        # per arm: (step, main loss) of every training step and every validation, for the report's curves
        self.curves: dict[str, dict[str, list]] = {a.name: {"train/loss": [], "val/loss": []} for a in arms}

    # what a subclass defines
    def build_arm(self, arm: Any) -> tuple[Decoder, torch.nn.Module | None]:
        raise NotImplementedError

    def arm_loss(self, arm: Any, batch: Any) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """(loss to minimise, main loss for the curves, other values to log) of `arm` on a batch."""
        raise NotImplementedError

    def arm_metrics(self, arm: Any, batch: Any) -> dict[str, tuple[torch.Tensor, int]]:
        """Validation values of `arm` on a batch, each with its weight; "loss" is the main loss."""
        raise NotImplementedError

    def after_step(self, arm: Any) -> None:
        """Called after each optimizer step of `arm`."""

    # shared machinery
    def decoder(self, name: str) -> Decoder:
        if key(name) not in self.decoders:
            raise ValueError(f"no arm {name!r}; this run has {', '.join(a.name for a in self.arms)}")
        return self.decoders[key(name)]

    def extra(self, name: str) -> torch.nn.Module | None:
        self.decoder(name)
        return self.extras[key(name)] if key(name) in self.extras else None

    def arm_model(self, arm: str | None = None) -> Decoder:
        """The decoder of an arm (the first by default): what lm-eval and generation use."""
        return self.decoder(arm or self.arms[0].name).eval()

    def tokens_in(self, batch: torch.Tensor) -> int:
        return int(batch[:, 1:].numel()) * len(self.arms)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["arms_state"] = {"arm_seconds": self.arm_seconds, "curves": self.loss_curves()}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("arms_state") or {}
        self.arm_seconds = {**self.arm_seconds, **state.get("arm_seconds", {})}
        self.curves = {**self.curves, **state.get("curves", {})}

    def loss_curves(self) -> dict[str, dict[str, list[tuple[int, float]]]]:
        """Per arm, its main train and validation losses as (step, value) lists."""
        self.curves = {arm: {k: [(step, float(v)) for step, v in points] for k, points in series.items()}
                       for arm, series in self.curves.items()}
        return self.curves

    def _sync(self) -> None:
        if self.device.type == "cuda":  # time the GPU's work, not the launches
            torch.cuda.synchronize(self.device)

    def training_step(self, batch: Any, batch_idx: int) -> None:
        optimizers, schedulers = self.optimizers(), self.lr_schedulers()
        optimizers = optimizers if isinstance(optimizers, list) else [optimizers]
        schedulers = schedulers if isinstance(schedulers, list) else [schedulers]
        for index, (arm, opt, sched) in enumerate(zip(self.arms, optimizers, schedulers)):
            self._sync()
            start = time.perf_counter()
            loss, main, logs = self.arm_loss(arm, batch)
            opt.zero_grad(set_to_none=True)
            self.manual_backward(loss)
            if self.grad_clip:
                self.clip_gradients(opt, gradient_clip_val=self.grad_clip, gradient_clip_algorithm="norm")
            # the first arm's step is the run's step (global_step counts batches, not arms x batches)
            opt.step() if index == 0 else opt.optimizer.step()
            sched.step()
            self.after_step(arm)
            self._sync()
            self.arm_seconds[arm.name] += time.perf_counter() - start
            self.curves[arm.name]["train/loss"].append((self.global_step, main.detach()))
            self.log_dict({f"{arm.name}/loss": main.detach(), **{f"{arm.name}/{k}": v.detach() for k, v in logs.items()}})
            if index == 0:
                self.log("train/loss", main.detach())

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        for arm in self.arms:
            for name, (value, weight) in self.arm_metrics(arm, batch).items():
                slot = f"{key(arm.name)}__{name}"
                if slot not in self.val_metrics:
                    self.val_metrics[slot] = MeanMetric().to(self.device)
                self.val_metrics[slot].update(value, weight=weight)

    def on_validation_epoch_end(self) -> None:
        for index, arm in enumerate(self.arms):
            values = {}
            for slot, metric in self.val_metrics.items():
                arm_key, name = slot.split("__", 1)
                if arm_key == key(arm.name) and metric.update_called:
                    values[f"val/{arm.name}/{name}"] = metric.compute()
                    metric.reset()
            self.log_dict(values)
            loss = values.get(f"val/{arm.name}/loss")
            if loss is not None and not self.trainer.sanity_checking:
                self.curves[arm.name]["val/loss"].append((self.global_step, float(loss)))
            if index == 0 and loss is not None:
                self.log_dict({"val/loss": loss, "val/ppl": loss.exp()}, prog_bar=True)

    def configure_optimizers(self) -> tuple[list, list]:
        o = self.optim
        optimizers, schedulers = [], []
        for arm in self.arms:
            params = list(self.decoder(arm.name).parameters())
            extra = self.extra(arm.name)
            params += list(extra.parameters()) if extra is not None else []
            opt = torch.optim.AdamW(decay_groups(params, o.weight_decay), lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps)
            optimizers.append(opt)
            schedule = torch.optim.lr_scheduler.LambdaLR(
                opt, lambda step: warmup_cosine(step, o.warmup_steps, self.max_steps, o.min_lr_ratio))
            schedulers.append({"scheduler": schedule, "interval": "step"})
        return optimizers, schedulers
