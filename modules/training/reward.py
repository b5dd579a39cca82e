"""A Bradley-Terry reward model (Stiennon et al. 2020; Ouyang et al. 2022).

The suite's decoder, started from the base, with its LM head replaced by a scalar head that reads
the final hidden state of a sequence's last token. Trained on pairs to maximise
log sigmoid(r(x, y_chosen) - r(x, y_rejected)); it never sees a reward value, only which of two
responses was preferred.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.optim.lr_scheduler import LambdaLR
from torchmetrics import MeanMetric

from modules.nn import Decoder, DecoderConfig
from modules.parallel.plan import TechniqueModule
from modules.training.pretrain import OptimConfig, decay_groups, warmup_cosine


def bradley_terry_loss(chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
    """Mean -log sigmoid(r_chosen - r_rejected): the negative log-likelihood of the observed preferences."""
    return -F.logsigmoid(chosen - rejected).mean()


def concordance(scores: torch.Tensor, truth: torch.Tensor) -> float:
    """Harrell's C: over all pairs whose true rewards differ, the share the scores order the same way
    (a tie in the scores counts one half). 0.5 is chance, 1 perfect; ties in the truth, which cap
    a rank correlation below 1, are left out instead of counted against the scorer."""
    scores, truth = scores.double().flatten(), truth.double().flatten()
    differ = truth[:, None] > truth[None, :]  # i truly above j
    gap = torch.sign(scores[:, None] - scores[None, :])[differ]
    return float(((gap > 0).double() + 0.5 * (gap == 0).double()).mean())


class RewardModel(torch.nn.Module):
    """Decoder trunk + scalar head: `forward(ids, last)` gives one reward per row, read at index `last`."""

    def __init__(self, config: DecoderConfig) -> None:
        super().__init__()
        self.trunk = Decoder(config)
        self.head = torch.nn.Linear(config.n_embd, 1)
        torch.nn.init.normal_(self.head.weight, std=1 / (config.n_embd + 1) ** 0.5)
        torch.nn.init.zeros_(self.head.bias)

    def forward(self, ids: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
        hidden = self.trunk.features(ids)  # (B, T, C)
        return self.head(hidden[torch.arange(ids.shape[0], device=ids.device), last]).squeeze(-1).float()

    @torch.no_grad()
    def score(self, rows: list[list[int]], batch: int = 256) -> torch.Tensor:
        """Rewards (N,) of token-id rows of any lengths, right-padded per batch."""
        device = next(self.parameters()).device
        out = []
        for start in range(0, len(rows), batch):
            chunk = rows[start : start + batch]
            ids = torch.zeros(len(chunk), max(map(len, chunk)), dtype=torch.long, device=device)
            for i, row in enumerate(chunk):
                ids[i, : len(row)] = torch.tensor(row, device=device)
            out.append(self(ids, torch.tensor([len(r) - 1 for r in chunk], device=device)))
        return torch.cat(out)


class RewardModule(TechniqueModule):
    """Batches from `collate_pairs`: chosen rows then rejected rows; logs loss, accuracy and margin."""

    def __init__(self, model: dict[str, Any] | DecoderConfig, optim: dict[str, Any] | OptimConfig, max_steps: int,
                 base_dir: Path | None = None) -> None:
        super().__init__()
        model = asdict(model) if isinstance(model, DecoderConfig) else dict(model)
        optim = asdict(optim) if isinstance(optim, OptimConfig) else dict(optim)
        self.save_hyperparameters({"model": model, "optim": optim, "max_steps": max_steps})
        self.optim, self.max_steps = OptimConfig(**optim), max_steps
        self.model = RewardModel(DecoderConfig(**model))
        self.val_loss, self.val_accuracy = MeanMetric(), MeanMetric()
        self.base_dir = base_dir  # the pretrain run the trunk starts from, for the report; not a hyperparameter

    def init_from_base(self, base: Decoder) -> None:
        self.model.trunk.load_state_dict(base.state_dict())

    def tokens_in(self, batch: dict[str, torch.Tensor]) -> int:
        return int(batch["ids"].numel())

    def _rewards(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        rewards = self.model(batch["ids"], batch["last"])
        return rewards.chunk(2)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        chosen, rejected = self._rewards(batch)
        loss = bradley_terry_loss(chosen, rejected)
        self.log_dict({"train/loss": loss.detach(), "train/accuracy": (chosen > rejected).float().mean(),
                       "train/margin": (chosen - rejected).mean().detach()}, prog_bar=False)
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        chosen, rejected = self._rewards(batch)
        self.val_loss.update(bradley_terry_loss(chosen, rejected), weight=chosen.numel())
        self.val_accuracy.update((chosen > rejected).float().mean(), weight=chosen.numel())

    def on_validation_epoch_end(self) -> None:
        self.log_dict({"val/loss": self.val_loss.compute(), "val/accuracy": self.val_accuracy.compute()}, prog_bar=True)
        self.val_loss.reset()
        self.val_accuracy.reset()

    def configure_optimizers(self) -> dict[str, Any]:
        o = self.optim
        opt = torch.optim.AdamW(decay_groups(self.parameters(), o.weight_decay), lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps)
        schedule = LambdaLR(opt, lambda step: warmup_cosine(step, o.warmup_steps, self.max_steps, o.min_lr_ratio))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}
