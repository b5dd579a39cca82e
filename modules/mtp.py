"""Pretraining with multi-token prediction (DeepSeek-V3, Sec. 2.2; Gloeckle et al. 2024), arms side by side.

Each arm is a decoder (all start from the same initial weights) with or without MTP heads, and
its own AdamW; every arm trains on the same batches, so the arms see equal tokens. An arm's loss
is the decoder's next-token loss plus lambda / D times the sum of its D heads' losses, lambda
following a step schedule (DeepSeek-V3: 0.3 for the first 10T tokens, 0.1 for the last 4.8T).
Validation reports each arm's main-head loss, the number the comparison rests on.
"""

from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torchmetrics import MeanMetric

from modules.nn import Decoder, DecoderConfig
from modules.nn.mtp import MTPHeads
from modules.pretrain import OptimConfig, decay_groups, warmup_cosine


@dataclass
class MTPArm:
    """One arm: `depth` 0 trains next-token prediction only."""

    name: str
    depth: int = 0
    kind: str = "sequential"  # "sequential" (DeepSeek-V3) or "parallel" (Gloeckle et al.)

    def __post_init__(self) -> None:
        if self.depth < 0:
            raise ValueError(f"mtp.arms: arm {self.name!r} has depth {self.depth}; use 0 (next token only) or more")
        if self.kind not in ("sequential", "parallel"):
            raise ValueError(f"mtp.arms: arm {self.name!r} has kind {self.kind!r}; use 'sequential' or 'parallel'")


@dataclass
class MTPSettings:
    """The `mtp.` section: the arms and the loss weight's schedule."""

    arms: list[dict[str, Any]] = field(default_factory=lambda: [
        {"name": "next-token", "depth": 0},
        {"name": "mtp-d1", "depth": 1},
        {"name": "mtp-d2", "depth": 2},
        {"name": "parallel-d1", "depth": 1, "kind": "parallel"},
    ])
    lambdas: list[float] = field(default_factory=lambda: [0.3, 0.1])  # loss weight before and after `switch_at`
    switch_at: float = 10 / 14.8  # share of training at which lambda steps down (DeepSeek-V3: after 10T of 14.8T tokens)
    grad_clip: float = 1.0  # each arm clips its own gradients

    def __post_init__(self) -> None:
        if not self.arms:
            raise ValueError("mtp.arms is empty; name at least one arm")
        names = [a["name"] if isinstance(a, dict) else a.name for a in self.arms]
        if len(set(names)) != len(names):
            raise ValueError(f"mtp.arms: names must differ; got {names}")
        if len(self.lambdas) not in (1, 2):
            raise ValueError(f"mtp.lambdas: one weight, or two (before and after mtp.switch_at); got {self.lambdas}")

    def weight(self, step: int, max_steps: int) -> float:
        """lambda at optimizer step `step`."""
        return self.lambdas[-1] if step >= self.switch_at * max_steps else self.lambdas[0]


def key(name: str) -> str:
    return name.replace(".", "_")


class MTPModule(L.LightningModule):
    """Arms side by side on packed blocks (batch, block_size + 1); `model` is the first arm's decoder."""

    def __init__(self, model: dict[str, Any] | DecoderConfig, optim: dict[str, Any] | OptimConfig,
                 mtp: dict[str, Any] | MTPSettings, max_steps: int) -> None:
        super().__init__()
        model = asdict(model) if isinstance(model, DecoderConfig) else dict(model)
        optim = asdict(optim) if isinstance(optim, OptimConfig) else dict(optim)
        mtp = asdict(mtp) if isinstance(mtp, MTPSettings) else dict(mtp)
        self.save_hyperparameters({"model": model, "optim": optim, "mtp": mtp, "max_steps": max_steps})
        self.automatic_optimization = False
        self.settings, self.optim, self.max_steps = MTPSettings(**mtp), OptimConfig(**optim), max_steps
        self.arms = [MTPArm(**a) for a in self.settings.arms]
        config = DecoderConfig(**model)
        first = Decoder(config)  # every arm's decoder starts from the same weights
        self.decoders = torch.nn.ModuleDict({key(a.name): first if i == 0 else copy.deepcopy(first) for i, a in enumerate(self.arms)})
        self.heads = torch.nn.ModuleDict({key(a.name): MTPHeads(config, a.depth, a.kind) for a in self.arms if a.depth})
        self.model = self.decoders[key(self.arms[0].name)]
        self.val_loss = torch.nn.ModuleDict({key(a.name): MeanMetric() for a in self.arms})
        self.val_head_loss = torch.nn.ModuleDict(
            {f"{key(a.name)}_{k}": MeanMetric() for a in self.arms for k in range(1, a.depth + 1)})
        self.arm_seconds = {a.name: 0.0 for a in self.arms}  # training time per arm (forward, backward, step)
        # per arm: (step, main-head loss) of every training step and every validation, for the report's curves
        self.curves: dict[str, dict[str, list]] = {a.name: {"train/loss": [], "val/loss": []} for a in self.arms}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["mtp_state"] = {"arm_seconds": self.arm_seconds, "curves": self.loss_curves()}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("mtp_state") or {}
        self.arm_seconds = {**self.arm_seconds, **state.get("arm_seconds", {})}
        self.curves = {**self.curves, **state.get("curves", {})}

    def loss_curves(self) -> dict[str, dict[str, list[tuple[int, float]]]]:
        """Per arm, its main-head train and validation losses as (step, value) lists."""
        self.curves = {arm: {k: [(step, float(v)) for step, v in points] for k, points in series.items()}
                       for arm, series in self.curves.items()}
        return self.curves

    def decoder(self, name: str) -> Decoder:
        if key(name) not in self.decoders:
            raise ValueError(f"no arm {name!r}; this run has {', '.join(a.name for a in self.arms)}")
        return self.decoders[key(name)]

    def mtp_heads(self, name: str) -> MTPHeads | None:
        self.decoder(name)
        return self.heads[key(name)] if key(name) in self.heads else None

    def arm_model(self, arm: str | None = None) -> Decoder:
        """The decoder of an arm (the first by default): what lm-eval and generation use."""
        return self.decoder(arm or self.arms[0].name).eval()

    def tokens_in(self, batch: torch.Tensor) -> int:
        return int(batch[:, 1:].numel()) * len(self.arms)

    def arm_losses(self, arm: MTPArm, batch: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(main next-token loss, each head's loss) of `arm` on a block batch (B, T + 1)."""
        decoder = self.decoder(arm.name)
        hidden = decoder.hidden(batch[:, :-1])
        logits = decoder.lm_head(decoder.norm(hidden))
        main = F.cross_entropy(logits.flatten(0, 1).float(), batch[:, 1:].flatten())
        heads = self.mtp_heads(arm.name)
        return main, heads.losses(decoder, hidden, batch) if heads is not None else []

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> None:
        optimizers, schedulers = self.optimizers(), self.lr_schedulers()
        optimizers = optimizers if isinstance(optimizers, list) else [optimizers]
        schedulers = schedulers if isinstance(schedulers, list) else [schedulers]
        weight = self.settings.weight(self.global_step, self.max_steps)
        for index, (arm, opt, sched) in enumerate(zip(self.arms, optimizers, schedulers)):
            start = time.perf_counter()
            main, heads = self.arm_losses(arm, batch)
            loss = main + weight / len(heads) * torch.stack(heads).sum() if heads else main
            opt.zero_grad(set_to_none=True)
            self.manual_backward(loss)
            if self.settings.grad_clip:
                self.clip_gradients(opt, gradient_clip_val=self.settings.grad_clip, gradient_clip_algorithm="norm")
            # the first arm's step is the run's step (global_step counts batches, not arms x batches)
            opt.step() if index == 0 else opt.optimizer.step()
            sched.step()
            self.arm_seconds[arm.name] += time.perf_counter() - start
            self.curves[arm.name]["train/loss"].append((self.global_step, main.detach()))
            self.log_dict({f"{arm.name}/loss": main.detach(), **{f"{arm.name}/mtp{k}": h.detach() for k, h in enumerate(heads, 1)}})
            if index == 0:
                self.log("train/loss", main.detach())
        self.log("mtp/lambda", weight)

    def validation_step(self, batch: torch.Tensor, batch_idx: int) -> None:
        n = batch[:, 1:].numel()
        for arm in self.arms:
            main, heads = self.arm_losses(arm, batch)
            self.val_loss[key(arm.name)].update(main, weight=n)
            for k, h in enumerate(heads, 1):
                self.val_head_loss[f"{key(arm.name)}_{k}"].update(h, weight=n)

    def on_validation_epoch_end(self) -> None:
        for index, arm in enumerate(self.arms):
            metric = self.val_loss[key(arm.name)]
            loss = metric.compute()
            metric.reset()
            values = {f"val/{arm.name}/loss": loss}
            for k in range(1, arm.depth + 1):
                head = self.val_head_loss[f"{key(arm.name)}_{k}"]
                values[f"val/{arm.name}/mtp{k}"] = head.compute()
                head.reset()
            self.log_dict(values)
            if not self.trainer.sanity_checking:
                self.curves[arm.name]["val/loss"].append((self.global_step, float(loss)))
            if index == 0:
                self.log_dict({"val/loss": loss, "val/ppl": loss.exp()}, prog_bar=True)

    def configure_optimizers(self) -> tuple[list, list]:
        o = self.optim
        optimizers, schedulers = [], []
        for arm in self.arms:
            params = list(self.decoder(arm.name).parameters())
            heads = self.mtp_heads(arm.name)
            params += list(heads.parameters()) if heads is not None else []
            opt = torch.optim.AdamW(decay_groups(params, o.weight_decay), lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps)
            optimizers.append(opt)
            schedule = torch.optim.lr_scheduler.LambdaLR(
                opt, lambda step: warmup_cosine(step, o.warmup_steps, self.max_steps, o.min_lr_ratio))
            schedulers.append({"scheduler": schedule, "interval": "step"})
        return optimizers, schedulers
