"""Pretraining with multi-token prediction (DeepSeek-V3, Sec. 2.2; Gloeckle et al. 2024), arms side by side.

Each arm is a decoder (all start from the same initial weights) with or without MTP heads, and
its own AdamW; every arm trains on the same batches, so the arms see equal tokens. An arm's loss
is the decoder's next-token loss plus lambda / D times the sum of its D heads' losses, lambda
following a step schedule (DeepSeek-V3: 0.3 for the first 10T tokens, 0.1 for the last 4.8T).
Validation reports each arm's main-head loss, the number the comparison rests on.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from modules.training.arms import DecoderArms, check_arm_names
from modules.nn import Decoder, DecoderConfig
from modules.nn.mtp import MTPHeads
from modules.training.pretrain import OptimConfig


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
        check_arm_names("mtp", [a["name"] if isinstance(a, dict) else a.name for a in self.arms])
        if len(self.lambdas) not in (1, 2):
            raise ValueError(f"mtp.lambdas: one weight, or two (before and after mtp.switch_at); got {self.lambdas}")

    def weight(self, step: int, max_steps: int) -> float:
        """lambda at optimizer step `step`."""
        return self.lambdas[-1] if step >= self.switch_at * max_steps else self.lambdas[0]


class MTPModule(DecoderArms):
    """Arms side by side on packed blocks (batch, block_size + 1); `model` is the first arm's decoder. A decoder
    with experts (DeepSeek-V3's shape) balances them as `DecoderArms` does."""

    def __init__(self, model: dict[str, Any] | DecoderConfig, optim: dict[str, Any] | OptimConfig,
                 mtp: dict[str, Any] | MTPSettings, max_steps: int) -> None:
        model = asdict(model) if isinstance(model, DecoderConfig) else dict(model)
        optim = asdict(optim) if isinstance(optim, OptimConfig) else dict(optim)
        mtp = asdict(mtp) if isinstance(mtp, MTPSettings) else dict(mtp)
        self.settings = MTPSettings(**mtp)
        super().__init__(DecoderConfig(**model), [MTPArm(**a) for a in self.settings.arms], OptimConfig(**optim), max_steps,
                         self.settings.grad_clip)
        self.save_hyperparameters({"model": model, "optim": optim, "mtp": mtp, "max_steps": max_steps})

    def build_arm(self, arm: MTPArm) -> tuple[Decoder, MTPHeads | None]:
        # every arm's decoder starts from the first one's weights
        first = next(iter(self.decoders.values()), None)
        decoder = Decoder(self.config) if first is None else copy.deepcopy(first)
        return decoder, MTPHeads(self.config, arm.depth, arm.kind) if arm.depth else None

    def mtp_heads(self, name: str) -> MTPHeads | None:
        return self.extra(name)

    def arm_losses(self, arm: MTPArm, batch: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(main next-token loss, each head's loss) of `arm` on a block batch (B, T + 1)."""
        decoder = self.decoder(arm.name)
        hidden = decoder.hidden(batch[:, :-1])
        logits = decoder.lm_head(decoder.norm(hidden))
        main = F.cross_entropy(logits.flatten(0, 1).float(), batch[:, 1:].flatten())
        heads = self.mtp_heads(arm.name)
        return main, heads.losses(decoder, hidden, batch) if heads is not None else []

    def arm_loss(self, arm: MTPArm, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        weight = self.settings.weight(self.global_step, self.max_steps)
        main, heads = self.arm_losses(arm, batch)
        loss = main + weight / len(heads) * torch.stack(heads).sum() if heads else main
        self.log("mtp/lambda", weight)
        logs = {f"mtp{k}": h for k, h in enumerate(heads, 1)}
        balance = [m.aux_loss for m in self.decoder(arm.name).moe_layers() if m.aux_loss is not None]
        if balance:
            logs["balance_loss"] = torch.stack(balance).sum()
            loss = loss + logs["balance_loss"]
        return loss, main, logs

    def arm_metrics(self, arm: MTPArm, batch: torch.Tensor) -> dict[str, tuple[torch.Tensor, int]]:
        n = batch[:, 1:].numel()
        main, heads = self.arm_losses(arm, batch)
        self.record_val_loads(arm)
        return {"loss": (main, n), **{f"mtp{k}": (h, n) for k, h in enumerate(heads, 1)}}
