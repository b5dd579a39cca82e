"""Balancing a mixture of experts, arms side by side (Wang et al. 2024, arXiv 2408.15664; DeepSeek-V3).

Arms train on the same batches: a dense decoder of the MoE's active size, and the same MoE decoder
(identical initial weights) under each balancing scheme of `modules/nn/moe.py`. After every step
of a loss-free arm each MoE layer's bias moves by u * sign(mean load - load_i), the loads summed
over every process first (`strategy.reduce`), so all replicas keep one bias. Every arm records
its expert loads per step: MaxVio per batch, and the heat map of the report.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any, Callable

import torch

from modules.arms import ArmsModule, check_arm_names
from modules.nn import Decoder, DecoderConfig
from modules.nn.moe import BALANCING, max_violation, update_biases
from modules.pretrain import OptimConfig


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


class MoEModule(ArmsModule):
    """Arms side by side on packed blocks (batch, block_size + 1); `model` is the first arm's decoder."""

    def __init__(self, model: dict[str, Any] | DecoderConfig, optim: dict[str, Any] | OptimConfig,
                 moe: dict[str, Any] | MoESettings, max_steps: int) -> None:
        model = asdict(model) if isinstance(model, DecoderConfig) else dict(model)
        optim = asdict(optim) if isinstance(optim, OptimConfig) else dict(optim)
        moe = asdict(moe) if isinstance(moe, MoESettings) else dict(moe)
        self.settings, self.config = MoESettings(**moe), DecoderConfig(**model)
        check_has_experts(self.config)
        self._rng = torch.get_rng_state()
        super().__init__([MoEArm(**a) for a in self.settings.arms], OptimConfig(**optim), max_steps, self.settings.grad_clip)
        self.save_hyperparameters({"model": model, "optim": optim, "moe": moe, "max_steps": max_steps})
        # per arm, per training step: each MoE layer's expert loads (layers, E), summed over processes
        self.loads: dict[str, list[list[list[int]]]] = {a.name: [] for a in self.arms}
        self._val_loads: dict[str, torch.Tensor] = {}

    def build_arm(self, arm: MoEArm) -> tuple[Decoder, None]:
        torch.set_rng_state(self._rng)  # every MoE arm starts from the same weights
        return Decoder(arm_config(self.config, arm)), None

    def _reduce(self) -> Callable[[torch.Tensor], torch.Tensor]:
        strategy = self.trainer.strategy if self._trainer is not None else None
        if strategy is None or self.trainer.world_size == 1:
            return lambda t: t
        return lambda t: strategy.reduce(t, reduce_op="sum")

    def arm_loss(self, arm: MoEArm, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        decoder = self.decoder(arm.name)
        main = decoder.loss(batch[:, :-1], batch[:, 1:])
        extra = [m.aux_loss for m in decoder.moe_layers() if m.aux_loss is not None]
        balance = torch.stack(extra).sum() if extra else None
        return (main + balance if balance is not None else main), main, ({"balance_loss": balance} if balance is not None else {})

    def after_step(self, arm: MoEArm) -> None:
        layers = self.decoder(arm.name).moe_layers()
        if not layers:
            return
        rate = self.config.moe_bias_rate if arm.balance.startswith("loss_free") else 0.0
        loads = update_biases(layers, rate, self._reduce())  # (layers, E), this step's loads; zeroes the counts
        self.loads[arm.name].append(loads.tolist())
        self.log(f"{arm.name}/maxvio_batch", max_violation(loads.float()).mean())

    def arm_metrics(self, arm: MoEArm, batch: torch.Tensor) -> dict[str, tuple[torch.Tensor, int]]:
        decoder = self.decoder(arm.name)
        loss = decoder.loss(batch[:, :-1], batch[:, 1:])
        layers = decoder.moe_layers()
        if layers:
            load = torch.stack([m.last_load for m in layers])
            self._val_loads[arm.name] = self._val_loads.get(arm.name, torch.zeros_like(load)) + load
        return {"loss": (loss, batch[:, 1:].numel())}

    def on_validation_epoch_end(self) -> None:
        reduce = self._reduce()
        for arm in self.arms:
            if arm.name in self._val_loads:
                load = reduce(self._val_loads.pop(arm.name).float())
                self.log(f"val/{arm.name}/maxvio_global", max_violation(load).mean())
        super().on_validation_epoch_end()

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["moe_loads"] = self.loads

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        self.loads = {**self.loads, **checkpoint.get("moe_loads", {})}
