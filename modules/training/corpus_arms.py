"""The same decoder trained on several corpora side by side: raw, deduplicated, filtered (the data-pipeline ablation).

Each arm reads its own corpus (a batch is `{arm name: blocks}`), the same number of tokens per step
from the same initial weights, and both are validated on the same held-out blocks, so their
validation losses compare what the data did, at equal tokens.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from modules.training.arms import DecoderArms, check_arm_names
from modules.nn import DecoderConfig
from modules.training.pretrain import OptimConfig


@dataclass
class CorpusArm:
    """One arm: a name and the corpus it trains on ("raw", "deduped" or "filtered")."""

    name: str
    corpus: str = "filtered"

    def __post_init__(self) -> None:
        if self.corpus not in CORPORA:
            raise ValueError(f"ablation.arms: arm {self.name!r} has corpus {self.corpus!r}; use {', '.join(CORPORA)}")


CORPORA = ("raw", "deduped", "filtered")


@dataclass
class AblationSettings:
    """The `ablation.` section: the arms."""

    arms: list[dict[str, Any]] = field(default_factory=lambda: [{"name": "raw", "corpus": "raw"},
                                                                {"name": "deduped", "corpus": "deduped"},
                                                                {"name": "filtered", "corpus": "filtered"}])
    grad_clip: float = 1.0

    def __post_init__(self) -> None:
        check_arm_names("ablation", [a["name"] if isinstance(a, dict) else a.name for a in self.arms])
        for arm in self.arms:
            CorpusArm(**arm)  # raises on a corpus that is not raw or filtered, before any run folder exists


class CorpusArmsModule(DecoderArms):
    """Arms of one decoder config (identical initial weights), each on its corpus's blocks."""

    def __init__(self, model: dict[str, Any] | DecoderConfig, optim: dict[str, Any] | OptimConfig,
                 ablation: dict[str, Any] | AblationSettings, max_steps: int) -> None:
        model = asdict(model) if isinstance(model, DecoderConfig) else dict(model)
        optim = asdict(optim) if isinstance(optim, OptimConfig) else dict(optim)
        ablation = asdict(ablation) if isinstance(ablation, AblationSettings) else dict(ablation)
        self.settings = AblationSettings(**ablation)
        super().__init__(DecoderConfig(**model), [CorpusArm(**a) for a in self.settings.arms], OptimConfig(**optim),
                         max_steps, self.settings.grad_clip)
        self.save_hyperparameters({"model": model, "optim": optim, "ablation": ablation, "max_steps": max_steps})

    def arm_config(self, arm: CorpusArm) -> DecoderConfig:
        return self.config

    def arm_loss(self, arm: CorpusArm, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        return super().arm_loss(arm, batch[arm.corpus])

    def tokens_in(self, batch: dict[str, torch.Tensor] | torch.Tensor) -> int:
        if isinstance(batch, torch.Tensor):  # a validation batch, shared by the arms
            return super().tokens_in(batch)
        return sum(int(batch[arm.corpus][:, 1:].numel()) for arm in self.arms)
