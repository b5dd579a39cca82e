"""Hybrid decoders against their pure relatives, arms side by side (Jamba, Lieber et al. 2024, Sec. 6).

Each arm is the base decoder config with the arm's own fields (`model:` overrides): a transformer
("a"), pure Mamba ("m"), the 1 attention : 7 Mamba hybrid ("mmmmammm"), with or without MoE every
other layer. They train on the same batches; a preset keeps their parameter counts equal (the
active ones, where an arm has experts), which `check_equal_params` enforces at config time.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from modules.training.arms import ConfigArm, DecoderArms, check_arm_names
from modules.nn import Decoder, DecoderConfig
from modules.training.pretrain import OptimConfig

@dataclass
class HybridSettings:
    """The `hybrid.` section: the arms and how close their parameter counts must be."""

    arms: list[dict[str, Any]] = field(default_factory=lambda: [
        {"name": "transformer", "model": {"layer_pattern": "a", "position": "rope"}},
        {"name": "mamba", "model": {"layer_pattern": "m", "position": "none"}},
        {"name": "hybrid", "model": {"layer_pattern": "mmmmammm", "position": "none"}},
    ])
    param_tolerance: float = 0.05  # largest relative gap of an arm's (active) parameters to the first arm's
    grad_clip: float = 1.0

    def __post_init__(self) -> None:
        check_arm_names("hybrid", [a["name"] if isinstance(a, dict) else a.name for a in self.arms])


def arm_config(config: DecoderConfig, arm: ConfigArm) -> DecoderConfig:
    return arm.config(config)


def arm_params(config: DecoderConfig) -> int:
    """Non-embedding parameters one token uses (all of a dense decoder), counted on the meta device: no memory."""
    with torch.device("meta"):
        return Decoder(config).num_params(exclude_embeddings=True, active=True)


def check_equal_params(config: DecoderConfig, settings: HybridSettings) -> dict[str, int]:
    """Each arm's active non-embedding parameters; raises if one is off the first arm's by more than the tolerance."""
    arms = [ConfigArm(**a) for a in settings.arms]
    counts = {arm.name: arm_params(arm_config(config, arm)) for arm in arms}
    first = arms[0].name
    for name, count in counts.items():
        gap = count / counts[first] - 1
        if abs(gap) > settings.param_tolerance:
            raise ValueError(
                f"hybrid.arms: arm {name!r} has {count:,} active non-embedding parameters, {gap:+.1%} against "
                f"{first!r}'s {counts[first]:,} (hybrid.param_tolerance={settings.param_tolerance}); compare at equal "
                "size: change its model.mlp_hidden (or n_layer), or raise the tolerance")
    return counts


class HybridModule(DecoderArms):
    """Arms side by side on packed blocks (batch, block_size + 1); `model` is the first arm's decoder."""

    def __init__(self, model: dict[str, Any] | DecoderConfig, optim: dict[str, Any] | OptimConfig,
                 hybrid: dict[str, Any] | HybridSettings, max_steps: int) -> None:
        model = asdict(model) if isinstance(model, DecoderConfig) else dict(model)
        optim = asdict(optim) if isinstance(optim, OptimConfig) else dict(optim)
        hybrid = asdict(hybrid) if isinstance(hybrid, HybridSettings) else dict(hybrid)
        self.settings = HybridSettings(**hybrid)
        super().__init__(DecoderConfig(**model), [ConfigArm(**a) for a in self.settings.arms], OptimConfig(**optim),
                         max_steps, self.settings.grad_clip)
        self.save_hyperparameters({"model": model, "optim": optim, "hybrid": hybrid, "max_steps": max_steps})

    def arm_config(self, arm: ConfigArm) -> DecoderConfig:
        return arm_config(self.config, arm)
