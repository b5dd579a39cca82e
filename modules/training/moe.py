"""Balancing a mixture of experts, arms side by side (Wang et al. 2024, arXiv 2408.15664; DeepSeek-V3).

Arms train on the same batches: a dense decoder of the MoE's active size, and the same MoE decoder
(identical initial weights) under each balancing scheme of `modules/nn/moe.py`. After every step
of a loss-free arm each MoE layer's bias moves by u * sign(mean load - load_i), the loads summed
over every process first (`strategy.reduce`), so all replicas keep one bias. Every arm records
its expert loads per step: MaxVio per batch, and the heat map of the report.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any

from modules.training.arms import DecoderArms, check_arm_names
from modules.nn import DecoderConfig
from modules.nn.moe import BALANCING
from modules.training.pretrain import OptimConfig


@dataclass
class MoEArm:
    """One arm: `balance` picks the scheme (modules/nn/moe.py); "dense" swaps every MoE for the dense
    MLP of the same active width."""

    name: str
    balance: str = "loss_free"

    def __post_init__(self) -> None:
        if self.balance != "dense" and self.balance not in BALANCING:
            raise ValueError(f"moe.arms: arm {self.name!r} has balance {self.balance!r}; use dense, {', '.join(BALANCING)}")


@dataclass
class MoESettings:
    """The `moe.` section: the arms."""

    arms: list[dict[str, Any]] = field(default_factory=lambda: [
        {"name": "dense", "balance": "dense"},
        {"name": "no-balancing", "balance": "none"},
        {"name": "aux-loss", "balance": "aux"},
        {"name": "loss-free", "balance": "loss_free"},
        {"name": "loss-free+seq", "balance": "loss_free_seq"},
    ])
    grad_clip: float = 1.0

    def __post_init__(self) -> None:
        check_arm_names("moe", [a["name"] if isinstance(a, dict) else a.name for a in self.arms])


def check_has_experts(config: DecoderConfig) -> None:
    if not config.moe_experts:
        raise ValueError("model.moe_experts is 0: the MoE technique needs routed experts (e.g. model.moe_experts=8)")


def arm_config(config: DecoderConfig, arm: MoEArm) -> DecoderConfig:
    """The decoder of an arm: the MoE config with the arm's balancing, or its dense twin."""
    if arm.balance == "dense":
        return replace(config, moe_experts=0, mlp_hidden=config.moe_hidden_dim * (config.moe_top_k + config.moe_shared))
    return replace(config, moe_balance=arm.balance)


class MoEModule(DecoderArms):
    """Arms side by side on packed blocks (batch, block_size + 1); `model` is the first arm's decoder."""

    def __init__(self, model: dict[str, Any] | DecoderConfig, optim: dict[str, Any] | OptimConfig,
                 moe: dict[str, Any] | MoESettings, max_steps: int) -> None:
        model = asdict(model) if isinstance(model, DecoderConfig) else dict(model)
        optim = asdict(optim) if isinstance(optim, OptimConfig) else dict(optim)
        moe = asdict(moe) if isinstance(moe, MoESettings) else dict(moe)
        self.settings, config = MoESettings(**moe), DecoderConfig(**model)
        check_has_experts(config)
        super().__init__(config, [MoEArm(**a) for a in self.settings.arms], OptimConfig(**optim), max_steps,
                         self.settings.grad_clip)
        self.save_hyperparameters({"model": model, "optim": optim, "moe": moe, "max_steps": max_steps})

    def arm_config(self, arm: MoEArm) -> DecoderConfig:  # every MoE arm starts from the same weights
        return arm_config(self.config, arm)
