"""Pretraining a decoder on next-token prediction (GPT-2, Radford et al. 2019)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from collections.abc import Iterable
from typing import Any

import torch
from torchmetrics import MeanMetric

from modules.nn import Decoder, DecoderConfig
from modules.parallel.plan import TechniqueModule


@dataclass
class OptimConfig:
    """AdamW with linear warmup then cosine decay to `min_lr_ratio * lr` (GPT-3, Brown et al. 2020)."""

    lr: float = field(default=6e-4, metadata={"gt": 0})
    min_lr_ratio: float = field(default=0.1, metadata={"min": 0, "max": 1})
    warmup_steps: int = field(default=100, metadata={"min": 0})
    weight_decay: float = field(default=0.1, metadata={"min": 0})
    beta1: float = field(default=0.9, metadata={"min": 0, "lt": 1})
    beta2: float = field(default=0.95, metadata={"min": 0, "lt": 1})
    eps: float = field(default=1e-8, metadata={"gt": 0})


def warmup_cosine(step: int, warmup_steps: int, max_steps: int, min_ratio: float) -> float:
    """Learning-rate multiplier at `step`: linear warmup to 1, cosine down to `min_ratio` at `max_steps`."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def decay_groups(params: Iterable[torch.nn.Parameter], weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups that decay matrices only; biases, norm gains, other 1-d parameters and any marked
    `no_weight_decay` (Mamba's A) are left alone (GPT-2)."""
    params = [p for p in params if p.requires_grad]
    decayed = [p.dim() >= 2 and not getattr(p, "no_weight_decay", False) for p in params]
    return [
        {"params": [p for p, d in zip(params, decayed) if d], "weight_decay": weight_decay},
        {"params": [p for p, d in zip(params, decayed) if not d], "weight_decay": 0.0},
    ]


class PretrainModule(TechniqueModule):
    """Next-token prediction on packed blocks of shape (batch, block_size + 1)."""

    def __init__(
        self,
        model: dict[str, Any] | DecoderConfig,
        optim: dict[str, Any] | OptimConfig,
        max_steps: int,
        compile: bool = False,
    ) -> None:
        super().__init__()
        model = asdict(model) if isinstance(model, DecoderConfig) else dict(model)
        optim = asdict(optim) if isinstance(optim, OptimConfig) else dict(optim)
        self.save_hyperparameters({"model": model, "optim": optim, "max_steps": max_steps, "compile": compile})
        self.model = Decoder(DecoderConfig(**model))
        self.optim = OptimConfig(**optim)
        self.max_steps = max_steps
        self.compile = compile
        self.val_loss = MeanMetric()
        self._loss_fn = self.model.loss

    def configure_model(self) -> None:
        super().configure_model()  # activation checkpointing and FSDP2 sharding, as the run says
        # Compile the loss (forward + cross-entropy) rather than the module, so that
        # checkpoint keys stay those of the plain model.
        if self.compile and self._loss_fn == self.model.loss:
            self._loss_fn = torch.compile(self.model.loss)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.model(idx)

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        loss = self._loss_fn(batch[:, :-1], batch[:, 1:])
        self.log("train/loss", loss)  # shown by the progress bar at its refresh, not read back every step
        return loss

    def validation_step(self, batch: torch.Tensor, batch_idx: int) -> None:
        loss = self._loss_fn(batch[:, :-1], batch[:, 1:])
        self.val_loss.update(loss, weight=batch[:, 1:].numel())

    def on_validation_epoch_end(self) -> None:
        loss = self.val_loss.compute()
        self.val_loss.reset()
        self.log_dict({"val/loss": loss, "val/ppl": loss.exp()}, prog_bar=True, sync_dist=False)

    def _grad_scaler(self) -> Any:
        return getattr(self.trainer.precision_plugin, "scaler", None)

    def configure_gradient_clipping(
        self, optimizer: torch.optim.Optimizer, gradient_clip_val: float | None = None, gradient_clip_algorithm: str | None = None
    ) -> None:
        # Lightning refuses to clip for fused optimizers because they unscale fp16 gradients
        # internally; with bf16 or fp32 there is no scaler, so plain norm clipping is exact. (A DeepSpeed
        # optimizer has no `defaults`: DeepSpeed clips itself.)
        if getattr(optimizer, "defaults", {}).get("fused") and self._grad_scaler() is None and gradient_clip_val:
            torch.nn.utils.clip_grad_norm_(self.parameters(), gradient_clip_val)
        else:
            super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def _offloaded(self) -> bool:
        zero = getattr(self.trainer.strategy, "config", None) or {} if self._trainer is not None else {}
        return bool(zero.get("zero_optimization", {}).get("offload_optimizer"))

    def configure_optimizers(self) -> dict[str, Any]:
        optimizer = torch.optim.AdamW(
            decay_groups(self.parameters(), self.optim.weight_decay),
            lr=self.optim.lr,
            betas=(self.optim.beta1, self.optim.beta2),
            eps=self.optim.eps,
            # fused needs CUDA tensors: not where ZeRO-Offload keeps the optimizer state on the host
            fused=self.device.type == "cuda" and self._grad_scaler() is None and not self._offloaded(),
        )
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer,
            lambda step: warmup_cosine(step, self.optim.warmup_steps, self.max_steps, self.optim.min_lr_ratio),
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}
