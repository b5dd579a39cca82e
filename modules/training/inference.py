"""Drafters for speculative decoding, trained for a frozen pretrained target.

One module holds the target (frozen, from the pretrain stage) and trains two drafters side by side on
the same batches of the target's corpus: a small independent draft decoder (Leviathan et al. 2023),
trained on the corpus by next-token prediction, and an EAGLE head (`modules/nn/eagle.py`) that reads
the target's features. Each has its own AdamW, warm-up and cosine schedule and gradient clipping
(manual optimisation). What they buy at decoding time, and what quantizing the target costs, is
measured after training (`repro/techniques/inference.py`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from torch.optim.lr_scheduler import LambdaLR
from torchmetrics import MeanMetric

from modules.training.arms import arm_optimizers, step_arm
from modules.nn import Decoder, DecoderConfig
from modules.nn.eagle import EagleConfig, EagleHead, fusion_layers
from modules.parallel.plan import TechniqueModule
from modules.training.pretrain import OptimConfig, decay_groups, warmup_cosine

DRAFTERS = ("draft", "eagle")


@dataclass
class DrafterSettings:
    """The `drafters.` section: the draft model's shape (overrides of the target's config) and the EAGLE head."""

    draft: dict[str, Any] = field(default_factory=lambda: {"n_layer": 2})  # DecoderConfig fields changed from the target's
    eagle3: bool = True  # EAGLE-3 (fused low/middle/last features, token loss, training-time test); False: EAGLE-1
    ttt_steps: int = 3  # EAGLE-3's unrolled training steps (its paper: 7)
    grad_clip: float = 1.0

    def __post_init__(self) -> None:
        unknown = sorted(set(self.draft) - {f.name for f in fields(DecoderConfig)})
        if unknown:
            raise ValueError(f"drafters.draft: unknown model fields {unknown}")
        fixed = {"vocab_size", "block_size"} & set(self.draft)
        if fixed:
            raise ValueError(f"drafters.draft sets {sorted(fixed)}: the draft shares the target's vocabulary and context")
        if self.ttt_steps < 1:
            raise ValueError(f"drafters.ttt_steps={self.ttt_steps} must be at least 1")

    def draft_config(self, target: DecoderConfig) -> DecoderConfig:
        return DecoderConfig(**{**asdict(target), **self.draft})

    def eagle_config(self, target: DecoderConfig) -> EagleConfig:
        if self.eagle3:  # a target of fewer than 3 blocks fuses the ones it has
            return EagleConfig(fuse_layers=tuple(dict.fromkeys(fusion_layers(target.n_layer))), feature_weight=0.0,
                               token_weight=1.0, ttt_steps=self.ttt_steps)
        return EagleConfig()


class InferenceModule(TechniqueModule):
    """The frozen `target`, the `draft` decoder and the `eagle` head; `val/loss` is the draft's (the EAGLE head's
    loss is `val/eagle_loss`)."""

    def __init__(self, model: DecoderConfig | dict, optim: OptimConfig | dict, drafters: DrafterSettings | dict,
                 max_steps: int, base_dir: Path | None = None) -> None:
        super().__init__()
        model = asdict(model) if isinstance(model, DecoderConfig) else dict(model)
        optim = asdict(optim) if isinstance(optim, OptimConfig) else dict(optim)
        drafters = asdict(drafters) if isinstance(drafters, DrafterSettings) else dict(drafters)
        self.save_hyperparameters({"model": model, "optim": optim, "drafters": drafters, "max_steps": max_steps})
        self.automatic_optimization = False
        self.settings = DrafterSettings(**drafters)
        self.optim, self.max_steps = OptimConfig(**optim), max_steps
        self.target = Decoder(DecoderConfig(**model)).requires_grad_(False)
        self.draft = Decoder(self.settings.draft_config(self.target.config))
        self.eagle = EagleHead(self.target.config, self.settings.eagle_config(self.target.config))
        self.val_loss = torch.nn.ModuleDict({name: MeanMetric() for name in DRAFTERS})
        self.base_dir = base_dir  # the target's pretrain run (its tokenizer, for the report's scores); not a hyperparameter

    @property
    def model(self) -> Decoder:
        """The run's main model (what `repro.checkpoints.load_model` and lm-eval read): the target."""
        return self.target

    def init_from(self, base: Decoder) -> None:
        self.target.load_state_dict(base.state_dict())

    def drafter_losses(self, batch: torch.Tensor) -> dict[str, torch.Tensor]:
        self.target.eval()  # no dropout in the frozen target's features
        idx, targets = batch[:, :-1], batch[:, 1:]
        return {"draft": self.draft.loss(idx, targets), "eagle": self.eagle.loss(self.target, idx)}

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> None:
        losses = self.drafter_losses(batch)
        for name, (optimizer, schedule) in zip(DRAFTERS, arm_optimizers(self), strict=True):
            step_arm(self, optimizer, losses[name], self.settings.grad_clip, counts=name == "draft", scheduler=schedule)
        self.log_dict({f"train/{name}_loss": loss.detach() for name, loss in losses.items()})
        self.log("train/loss", losses["draft"].detach())

    def validation_step(self, batch: torch.Tensor, batch_idx: int) -> None:
        for name, loss in self.drafter_losses(batch).items():
            self.val_loss[name].update(loss, weight=batch[:, 1:].numel())

    def on_validation_epoch_end(self) -> None:
        losses = {name: metric.compute() for name, metric in self.val_loss.items()}
        for metric in self.val_loss.values():
            metric.reset()
        self.log_dict({"val/loss": losses["draft"], "val/eagle_loss": losses["eagle"]}, prog_bar=True)

    def configure_optimizers(self) -> tuple[list, list]:
        o = self.optim
        optimizers, schedulers = [], []
        for model in (self.draft, self.eagle):
            groups = decay_groups((p for p in model.parameters() if p.requires_grad), o.weight_decay)
            opt = torch.optim.AdamW([g for g in groups if g["params"]], lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps)
            optimizers.append(opt)
            schedule = LambdaLR(opt, lambda step: warmup_cosine(step, o.warmup_steps, self.max_steps, o.min_lr_ratio))
            schedulers.append({"scheduler": schedule, "interval": "step"})
        return optimizers, schedulers

    def arm_model(self, arm: str | None = None) -> Decoder:
        """The decoder of `arm`: "target" (default) or "draft", in eval mode."""
        if arm in (None, "target"):
            return self.target.eval()
        if arm == "draft":
            return self.draft.eval()
        raise ValueError(f"no arm {arm!r} in this checkpoint; it has target and draft (the EAGLE head is not a decoder)")
