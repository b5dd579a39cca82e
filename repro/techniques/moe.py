"""Mixture of experts with auxiliary-loss-free load balancing (Wang et al. 2024, arXiv 2408.15664; DeepSeek-V3).

Arms pretrain side by side on the same batches: a dense decoder of the MoE's active size, and one
DeepSeekMoE decoder (shared + fine-grained routed experts, identical initial weights) per balancing
scheme: none, the auxiliary loss, loss-free bias balancing, and the bias plus DeepSeek-V3's
sequence-wise loss. The report compares validation loss, MaxVio (global on the validation set, and
per training batch), the expert loads over training (heat map) and lm-eval scores.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch

from datamodules.pretrain import CorpusConfig, PretrainDataModule
from modules.training.moe import MoEArm, MoEModule, MoESettings, check_has_experts
from modules.nn import DecoderConfig
from modules.nn.moe import max_violation
from modules.training.pretrain import OptimConfig
from reports.claims import ClaimResult, check_below, not_measured
from reports.plots import expert_load_heatmap, loss_curves, metric_curves
from repro.golden import CORPUS, SHRINK
from repro.registry import Finished, Measured, Step, Technique, register
from repro.steps import ARM_EVAL, DATA, SPEED, arm_eval_scores, arms
from repro.trainer import EvalConfig, TrainConfig, check_manual_optimization

SOURCE = "Wang et al. 2024 (arXiv 2408.15664), Table 1; DeepSeek-V3, Sec. 2.1.2"


@dataclass
class MoEConfig:
    """Sections of an MoE preset. `model.vocab_size` follows `data.vocab_size`; `model.moe_*` shape the experts."""

    model: DecoderConfig = field(default_factory=lambda: DecoderConfig(mlp="swiglu", moe_experts=8))
    data: CorpusConfig = field(default_factory=CorpusConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    moe: MoESettings = field(default_factory=MoESettings)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(grad_clip=0.0))
    eval: EvalConfig = field(default_factory=EvalConfig)

    def __post_init__(self) -> None:
        self.model.vocab_size = self.data.vocab_size
        check_has_experts(self.model)  # here, so a bad preset stops before any run folder exists
        check_manual_optimization(self.train, "each arm clips its own gradients; set moe.grad_clip and train.grad_clip=0",
                                  "the arms step once per batch; raise data.batch_size instead")


def build(config: MoEConfig, seed: int, stages: dict[str, Path]) -> tuple[MoEModule, PretrainDataModule]:
    module = MoEModule(config.model, config.optim, config.moe, config.train.max_steps)
    return module, PretrainDataModule(config.data, block_size=config.model.block_size, seed=seed)


def maxvio_per_step(module: MoEModule, name: str) -> list[float]:
    """MaxVio of each training step's expert loads, averaged over MoE layers (empty for a dense arm)."""
    steps = module.loads[name]
    return max_violation(torch.tensor(steps, dtype=torch.float64)).mean(-1).tolist() if steps else []


def _mean_of_tail(values: list[float], tail: float = 1.0) -> float | None:
    """Mean of the last `tail` share of `values`, None when there are none."""
    values = values[int(len(values) * (1 - tail)) :]
    return statistics.fmean(values) if values else None


def _sizes(module: MoEModule, arm: MoEArm) -> dict[str, Any]:
    decoder = module.decoder(arm.name)
    return {
        "params": decoder.num_params(),
        "active_params": decoder.num_params(active=True),  # embeddings included
        "flops_per_token": decoder.flops_per_token(module.config.block_size),
    }


def _balance(finished: Finished) -> Measured:
    """Per arm its MaxVio: global on the validation set, and per training batch (its mean over all of training and over
    the last quarter); the expert loads over training as a heat map, and each batch's MaxVio as curves."""
    module, run_dir = finished.module, finished.run_dir
    maxvio = {a.name: maxvio_per_step(module, a.name) for a in module.arms}
    metrics = {}
    for name, values in maxvio.items():
        metrics |= {f"{name}/maxvio_global": finished.metrics.get(f"val/{name}/maxvio_global"),
                    f"{name}/maxvio_batch": _mean_of_tail(values), f"{name}/maxvio_batch_last_quarter": _mean_of_tail(values, 0.25)}
    (run_dir / "expert_load.png").write_bytes(expert_load_heatmap(module.loads, "Expert load over training"))
    curves = {name: list(enumerate(values, 1)) for name, values in maxvio.items() if values}
    (run_dir / "maxvio.png").write_bytes(metric_curves(curves, "MaxVio of the batch (layer mean)",
                                                       "Load imbalance per training batch"))
    return Measured(metrics)


def _tables(finished: Finished) -> Measured:
    """The arms' losses, balance, sizes and lm-eval scores side by side, their loss curves, and how they were trained."""
    config, module, metrics = finished.config, finished.module, finished.metrics
    png = loss_curves(module.loss_curves(), "Validation and train loss per arm (equal tokens)")
    (finished.run_dir / "arm_losses.png").write_bytes(png)
    scores = arm_eval_scores(metrics, [a.name for a in module.arms])
    tasks = list(dict.fromkeys(t for s in scores.values() for t in s))
    table = ["| arm | balancing | val loss | MaxVio global | MaxVio batch (all / last quarter) | params (active) | train s |"
             + "".join(f" {t} |" for t in tasks), "|---|---|---:|---:|---:|---:|---:|" + "---:|" * len(tasks)]
    for arm in module.arms:
        m = {k.split("/", 1)[1]: v for k, v in metrics.items() if k.startswith(f"{arm.name}/")}

        def fmt(value: Any, spec: str) -> str:
            return "" if value is None else format(value, spec)

        table.append(f"| {arm.name} | {arm.balance} | {fmt(m['val_loss'], '.4f')} | {fmt(m['maxvio_global'], '.3f')} | "
                     f"{fmt(m['maxvio_batch'], '.3f')} / {fmt(m['maxvio_batch_last_quarter'], '.3f')} | "
                     f"{m['params']:,} ({m['active_params']:,}) | {m['train_seconds']:.1f} |"
                     + "".join(f" {scores.get(arm.name, {}).get(t, float('nan')):.4f} |" for t in tasks))
    c = config.model
    sections = {
        "Arms": ["![loss per arm](arm_losses.png)", "", *table],
        "Expert load": ["![expert load over training](expert_load.png)", "", "![MaxVio per batch](maxvio.png)"],
    }
    notes = [
        f"Every MoE layer: {c.moe_shared} shared + {c.moe_experts} routed experts of width {c.moe_hidden_dim}, top-{c.moe_top_k}, "
        f"{c.moe_score} affinities, MoE in every {c.moe_every}. block; the dense arm's MLP has the active width "
        f"{c.moe_hidden_dim * (c.moe_top_k + c.moe_shared)}. Aux loss alpha {c.moe_aux_alpha}, sequence-wise alpha "
        f"{c.moe_seq_alpha}, bias rate u {c.moe_bias_rate}.",
        f"All arms train on the same {config.train.max_steps} batches of {config.data.batch_size} x {c.block_size} tokens; the MoE "
        "arms from identical weights. MaxVio = (max load - mean load) / mean load over experts (Wang et al. Eq. 5), "
        "averaged over MoE layers: global over the whole validation set, batch over each training batch.",
    ]
    return Measured(notes=notes, sections=sections)


def claims(config: MoEConfig, metrics: Mapping[str, Any]) -> list[ClaimResult]:
    declared = [MoEArm(**a) if isinstance(a, dict) else a for a in config.moe.arms]
    aux = next((a.name for a in declared if a.balance == "aux"), None)
    free = next((a.name for a in declared if a.balance == "loss_free"), None)
    if not (aux and free):
        why = "needs an aux-loss arm and a loss-free arm"
        return [not_measured("Loss-free balancing balances better than the auxiliary loss", SOURCE, "MaxVio_global",
                             "0.04 vs 0.72 at 1B", why),
                not_measured("Loss-free balancing is no worse in loss", SOURCE, "validation loss", "perplexity 9.50 vs 9.56", why)]
    return [
        check_below(
            claim="Loss-free balancing keeps experts better balanced than the auxiliary loss", source=SOURCE,
            metric=f"MaxVio_global on the validation set, {free}", measured=metrics.get(f"{free}/maxvio_global"),
            bound=metrics.get(f"{aux}/maxvio_global"), factor=1.0, paper="MaxVio_global 0.04 (loss-free) vs 0.72 (aux loss) at 1B",
            bound_name=f"{aux}'s MaxVio_global"),
        check_below(
            claim="Loss-free balancing reaches a validation loss no worse than the auxiliary loss", source=SOURCE,
            metric=f"validation loss (nats/token), {free}", measured=metrics.get(f"{free}/val_loss"),
            bound=metrics.get(f"{aux}/val_loss"), factor=1.0, paper="perplexity 9.50 (loss-free) vs 9.56 (aux loss) at 1B",
            bound_name=f"{aux}'s loss"),
    ]


register(
    Technique(
        name="moe",
        summary="mixture of experts: dense vs no balancing, aux loss, loss-free bias balancing (Wang et al. 2024)",
        config=MoEConfig,
        module=MoEModule,
        build=build,
        steps=(DATA, arms(_sizes), Step("balance", _balance), SPEED, ARM_EVAL, Step("report tables", _tables)),
        claims=claims,
        golden_overrides=(*CORPUS, *SHRINK, "model.moe_experts=4"),
    )
)
