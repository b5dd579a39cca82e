"""Arms side by side: several decoders trained on the same batches, each with its own AdamW.

The comparisons of the suite (MTP against next-token prediction, balancing schemes of a mixture of
experts) need arms that see the same tokens in the same order from the same start. `ArmsModule`
holds one decoder (and any extra trained modules) per arm, steps each arm's optimizer once per
batch, times each arm, and keeps each arm's main loss per step and per validation for the report.
A subclass says what an arm is (`build_arm`), what it minimises (`arm_loss`), what validation
measures (`arm_metrics`), and may act after each arm's step (`after_step`).

`step_arm` is the one manual optimizer step of the suite: every module that updates several
optimizers (or one optimizer several times) per batch steps through it.

`DecoderArms` is the common case: each arm a decoder pretrained on packed blocks, the config of
the arm (`arm_config`) a variant of one base config, mixture-of-experts layers balanced as
their config says.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, fields, replace
from typing import Any, Callable

import lightning as L
import torch
from lightning.pytorch.core.optimizer import LightningOptimizer
from torch.optim.lr_scheduler import LRScheduler
from torchmetrics import MeanMetric

from modules.nn import Decoder, DecoderConfig
from modules.nn.moe import max_violation, update_biases
from modules.training.pretrain import OptimConfig, decay_groups, warmup_cosine
from modules.parallel.plan import TechniqueModule


def arm_optimizers(module: L.LightningModule) -> list[tuple[LightningOptimizer, LRScheduler | None]]:
    """A manually optimised module's optimizers (Lightning's wrappers), each with its per-step scheduler
    (None for all where it configured none), in `configure_optimizers`' order."""
    optimizers, schedulers = module.optimizers(), module.lr_schedulers()
    optimizers = optimizers if isinstance(optimizers, list) else [optimizers]
    if schedulers is None:
        return [(opt, None) for opt in optimizers]
    schedulers = schedulers if isinstance(schedulers, list) else [schedulers]
    return list(zip(optimizers, schedulers, strict=True))


def step_arm(module: L.LightningModule, optimizer: LightningOptimizer, loss: torch.Tensor, grad_clip: float,
             counts: bool, scheduler: LRScheduler | None = None) -> None:
    """One update under manual optimisation: zero `optimizer`'s gradients, backpropagate `loss`, clip their
    norm to `grad_clip` (0: no clipping), step, then step `scheduler` (a per-step schedule) if given.

    Every `step()` of Lightning's wrapped optimizer counts one `trainer.global_step`, the count that
    max_steps, checkpoints, validation and logging run on. A training step that updates several arms
    (or one optimizer several times, PPO's minibatches) steps through the wrapper exactly once, the
    update marked `counts`, so that global_step counts batches, not arms x batches; every other
    update steps the torch optimizer the wrapper holds (`optimizer.optimizer`). That raw step skips
    what the precision plugin adds around a step (16-mixed's gradient scaler).
    """
    optimizer.zero_grad(set_to_none=True)
    module.manual_backward(loss)
    if grad_clip > 0:
        module.clip_gradients(optimizer, gradient_clip_val=grad_clip, gradient_clip_algorithm="norm")
    if counts:
        optimizer.step()
    else:
        optimizer.optimizer.step()
    if scheduler is not None:
        scheduler.step()


def key(name: str) -> str:
    """A module name for an arm (module names cannot hold ".")."""
    return name.replace(".", "_")


def check_arm_names(section: str, names: list[str]) -> None:
    """An `arms` list of a preset section names at least one arm and each arm once."""
    if not names:
        raise ValueError(f"{section}.arms: name at least one arm")
    if len(set(names)) != len(names):
        raise ValueError(f"{section}.arms: arm names must differ, got {names}")


@dataclass
class ConfigArm:
    """An arm that is the preset's decoder with some fields changed: `model` holds the DecoderConfig fields
    that differ from the preset's `model:` section."""

    name: str
    model: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        unknown = sorted(set(self.model) - {f.name for f in fields(DecoderConfig)})
        if unknown:
            raise ValueError(f"arm {self.name!r} sets unknown model fields {unknown}; use fields of DecoderConfig "
                             "(modules/nn/config.py), e.g. layer_pattern, position, norm, mlp, n_kv_head, mlp_hidden")

    def config(self, base: DecoderConfig) -> DecoderConfig:
        return replace(base, **self.model)


class ArmsModule(TechniqueModule):
    """Base of multi-arm techniques; `self.arms` has `.name`; `model` is the first arm's decoder.

    `optim` is every arm's AdamW and schedule (warmup, cosine to `min_lr_ratio`); `grad_clip` (0: none)
    clips each arm's gradient norm.
    """

    # the attribute holding the arms' decoders (a ModuleDict keyed by `key(name)`), so the prefix of their
    # state_dict keys: a subclass whose checkpoints predate this base keeps its own name
    decoders_attr = "decoders"

    def __init__(self, arms: list[Any], optim: OptimConfig, max_steps: int, grad_clip: float) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.arms, self.optim, self.max_steps, self.grad_clip = arms, optim, max_steps, grad_clip
        setattr(self, self.decoders_attr, torch.nn.ModuleDict())  # filled arm by arm: `build_arm` sees the earlier ones
        self.extras = torch.nn.ModuleDict()  # per arm, trained modules beside its decoder (MTP heads)
        for arm in arms:
            decoder, extra = self.build_arm(arm)
            self._decoders()[key(arm.name)] = decoder
            if extra is not None:
                self.extras[key(arm.name)] = extra
        self.model = self.decoder(arms[0].name)
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

    def arm_optimizer(self, arm: Any) -> torch.optim.Optimizer:
        """AdamW over the arm's decoder and extra modules, weight decay on matrices only."""
        o = self.optim
        params = list(self.decoder(arm.name).parameters())
        extra = self.extra(arm.name)
        params += list(extra.parameters()) if extra is not None else []
        return torch.optim.AdamW(decay_groups(params, o.weight_decay), lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps)

    def val_summary(self, values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The run's headline validation values from the first arm's (`values`, by `arm_metrics` name)."""
        return {"val/loss": values["loss"], "val/ppl": values["loss"].exp()}

    # shared machinery
    def _decoders(self) -> torch.nn.ModuleDict:
        return getattr(self, self.decoders_attr)

    def decoder(self, name: str) -> Decoder:
        decoders = self._decoders()
        if key(name) not in decoders:
            raise ValueError(f"no arm {name!r}; this run has {', '.join(a.name for a in self.arms)}")
        return decoders[key(name)]

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
        for index, (arm, (opt, sched)) in enumerate(zip(self.arms, arm_optimizers(self), strict=True)):
            self._sync()
            start = time.perf_counter()
            loss, main, logs = self.arm_loss(arm, batch)
            step_arm(self, opt, loss, self.grad_clip, counts=index == 0, scheduler=sched)  # the first arm's step counts
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
                arm_key, name = slot.rsplit("__", 1)  # metric names are the code's; an arm's name may hold "__"
                if arm_key == key(arm.name) and metric.update_called:
                    values[name] = metric.compute()
                    metric.reset()
            self.log_dict({f"val/{arm.name}/{name}": value for name, value in values.items()})
            loss = values.get("loss")
            if loss is not None and not self.trainer.sanity_checking:
                self.curves[arm.name]["val/loss"].append((self.global_step, float(loss)))
            if index == 0 and loss is not None:
                self.log_dict(self.val_summary(values), prog_bar=True)

    def configure_optimizers(self) -> tuple[list, list]:
        o = self.optim
        optimizers, schedulers = [], []
        for arm in self.arms:
            opt = self.arm_optimizer(arm)
            optimizers.append(opt)
            schedule = torch.optim.lr_scheduler.LambdaLR(
                opt, lambda step: warmup_cosine(step, o.warmup_steps, self.max_steps, o.min_lr_ratio))
            schedulers.append({"scheduler": schedule, "interval": "step"})
        return optimizers, schedulers


class DecoderArms(ArmsModule):
    """Arms that are decoders trained by next-token prediction on packed blocks (batch, block_size + 1).

    Each arm's decoder is `arm_config(arm)`, built from the same random state, so arms of one shape
    start from identical weights. Mixture-of-experts layers (modules/nn/moe.py): their balance
    losses join the arm's loss; after every step of a loss-free arm each layer's bias moves by
    u * sign(mean load - load_i), the loads summed over every process first (`strategy.reduce`), so
    all replicas keep one bias; and every arm records its expert loads per step (`loads`).
    """

    def __init__(self, config: DecoderConfig, arms: list[Any], optim: OptimConfig, max_steps: int, grad_clip: float) -> None:
        self.config = config
        self._rng = torch.get_rng_state()
        super().__init__(arms, optim, max_steps, grad_clip)
        # per arm, per training step: each MoE layer's expert loads (layers, E), summed over processes
        self.loads: dict[str, list[list[list[int]]]] = {a.name: [] for a in self.arms}
        self._val_loads: dict[str, torch.Tensor] = {}

    def arm_config(self, arm: Any) -> DecoderConfig:
        raise NotImplementedError

    def build_arm(self, arm: Any) -> tuple[Decoder, None]:
        torch.set_rng_state(self._rng)
        return Decoder(self.arm_config(arm)), None

    def _reduce(self) -> Callable[[torch.Tensor], torch.Tensor]:
        strategy = self.trainer.strategy if self._trainer is not None else None
        if strategy is None or self.trainer.world_size == 1:
            return lambda t: t
        return lambda t: strategy.reduce(t, reduce_op="sum")

    def arm_loss(self, arm: Any, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        decoder = self.decoder(arm.name)
        main = decoder.loss(batch[:, :-1], batch[:, 1:])
        extra = [m.aux_loss for m in decoder.moe_layers() if m.aux_loss is not None]
        balance = torch.stack(extra).sum() if extra else None
        return (main + balance if balance is not None else main), main, ({"balance_loss": balance} if balance is not None else {})

    def after_step(self, arm: Any) -> None:
        decoder = self.decoder(arm.name)
        layers = decoder.moe_layers()
        if not layers:
            return
        rate = decoder.config.moe_bias_rate if decoder.config.moe_balance.startswith("loss_free") else 0.0
        loads = update_biases(layers, rate, self._reduce())  # (layers, E), this step's loads; zeroes the counts
        self.loads[arm.name].append(loads.tolist())
        self.log(f"{arm.name}/maxvio_batch", max_violation(loads.float()).mean())

    def arm_metrics(self, arm: Any, batch: torch.Tensor) -> dict[str, tuple[torch.Tensor, int]]:
        decoder = self.decoder(arm.name)
        loss = decoder.loss(batch[:, :-1], batch[:, 1:])
        self.record_val_loads(arm)
        return {"loss": (loss, batch[:, 1:].numel())}

    def record_val_loads(self, arm: Any) -> None:
        """Add the expert loads of the arm's last forward (a validation batch) to its validation total."""
        layers = self.decoder(arm.name).moe_layers()
        if layers:
            load = torch.stack([m.last_load for m in layers])
            self._val_loads[arm.name] = self._val_loads.get(arm.name, torch.zeros_like(load)) + load

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
