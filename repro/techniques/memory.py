"""What strategies and activation checkpointing cost and save (Chen et al. 2016; Korthikanti et al. 2022; ZeRO).

A short pretraining run of the preset's shape, then the sweep of `measurement/memory.py`: every
activation-checkpointing policy under the default strategy and every listed strategy without it,
each case a few timed steps of this technique at this preset (the run's own `--set` overrides
included) in its own process. The report tables peak and activation memory against step time with
ZeRO's bytes per parameter beside them, and checks the recomputation claims from the measurements.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Mapping

from measurement.memory import activation_saving, plot, sweep, table
from modules.parallel.plan import POLICIES
from modules.training.pretrain import PretrainModule
from reports.claims import ClaimResult, check_above, check_below, not_measured
from repro.golden import CORPUS, SHRINK
from repro.registry import Finished, Measured, Step, Technique, register
from repro.techniques.pretrain import PretrainConfig, build

SOURCE = "Chen et al. 2016; Korthikanti et al. 2022 (selective recomputation)"
FULL_SAVING, FULL_TIME = 0.60, 1.40  # the bar: full recompute cuts >= 60% of activations for <= 40% more time
SELECTIVE_SHARE, SELECTIVE_TIME = 0.5, 1.10  # selective: most (over half) of full's saving for under 10% more time


@dataclass
class SweepConfig:
    """The `sweep.` section: the cases timed after the run."""

    policies: list[str] = field(default_factory=lambda: list(POLICIES))
    strategies: list[str] = field(default_factory=lambda: ["auto"])
    steps: int = 8  # timed steps per case
    warmup: int = 2

    def __post_init__(self) -> None:
        unknown = sorted(set(self.policies) - set(POLICIES))
        if unknown:
            raise ValueError(f"sweep.policies: unknown {unknown}; use {', '.join(POLICIES)}")
        if self.policies and "none" not in self.policies:
            raise ValueError("sweep.policies: include none, the baseline every other policy is measured against")


@dataclass
class MemoryConfig(PretrainConfig):
    """A pretrain preset plus the `sweep.` section."""

    sweep: SweepConfig = field(default_factory=SweepConfig)


def _sweep(finished: Finished) -> Measured:
    """Every case of the sweep, each in a process of its own, on this run's preset and overrides (memory.json)."""
    spec = json.loads((finished.run_dir / "run.json").read_text())
    s, device = finished.config.sweep, finished.module.device.type
    print(f"memory sweep: {len(s.policies)} policies, {len([x for x in s.strategies if x != 'auto'])} more strategies", flush=True)
    records = sweep(spec["preset"], device, s.strategies, s.policies, s.steps, s.warmup, spec["overrides"], technique="memory")
    (finished.run_dir / "memory.json").write_text(json.dumps(records, indent=2))
    metrics: dict[str, Any] = {"params": finished.module.model.num_params()}
    for r in records:
        if "error" not in r:
            tag = f"{r['strategy']}/{r['checkpointing']}"
            metrics |= {f"{tag}/ms_per_step": r["ms_per_step"], f"{tag}/peak_mem_gib": r["peak_mem_gib"]}
            if "activation_mem_gib" in r:
                metrics[f"{tag}/activation_mem_gib"] = r["activation_mem_gib"]
    return Measured(metrics)


def _report(finished: Finished) -> Measured:
    """Peak memory against step time (memory.png) and the table of every case with ZeRO's theory beside it."""
    records = json.loads((finished.run_dir / "memory.json").read_text())
    s, params = finished.config.sweep, finished.metrics["params"]
    title = f"Peak memory vs step time, {params / 1e6:.1f}M parameters ({finished.module.device.type})"
    (finished.run_dir / "memory.png").write_bytes(plot(records, title))
    notes = [f"Each case: {s.warmup} warm-up and {s.steps} timed steps of this preset in a process of its own (median step); "
             "activations = CUDA peak - memory allocated as a step starts (weights, optimizer state). Model state, "
             "theory: ZeRO's 2 + 2 + 12 bytes per parameter, sharded by stage over the devices."]
    return Measured(notes=notes, sections={"Memory and step time": ["![peak memory against step time](memory.png)", "",
                                                                     *table(records, params)]})


def recorded_cases(config: MemoryConfig, metrics: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The sweep's records of the checkpointing policies under the default strategy, back from the metrics; a case
    without its step time failed or was not run."""
    records = []
    for policy in config.sweep.policies:
        values = {k: metrics[f"auto/{policy}/{k}"] for k in ("ms_per_step", "peak_mem_gib", "activation_mem_gib")
                  if f"auto/{policy}/{k}" in metrics}
        records.append({"strategy": "auto", "checkpointing": policy,
                        **(values if "ms_per_step" in values else {"error": "not measured"})})
    return records


def claims(config: MemoryConfig, metrics: Mapping[str, Any]) -> list[ClaimResult]:
    """Full and selective recomputation's activation saving and step time, against the run without checkpointing."""
    records = recorded_cases(config, metrics)
    full = activation_saving(records, "full")
    why = "activation memory is measured on CUDA (allocator statistics); needs the none and full policies there"
    if full is None:
        return [not_measured("Full recomputation saves most activation memory for about one extra forward", SOURCE,
                             "activation memory saved, step time", ">= 60% for <= 1.4x", why)]
    results = [
        check_above(claim="Full recomputation cuts most of the activation memory", source=SOURCE,
                    metric="share of activation memory saved by checkpointing every block", measured=full[0], bound=FULL_SAVING,
                    factor=1.0, paper="activations drop from O(n) to O(sqrt n) or one block's input per layer", bound_name="60%"),
        check_below(claim="Full recomputation costs about one extra forward", source=SOURCE,
                    metric="step time with full recomputation / without", measured=full[1], bound=FULL_TIME, factor=1.0,
                    paper="one extra forward: about 4/3 of a step's compute", bound_name="1.4x"),
    ]
    selective = [(p, activation_saving(records, p)) for p in ("attention", "mlp", "every_k")]
    cheap = [(p, v) for p, v in selective if v is not None and v[1] < SELECTIVE_TIME]
    best = max(cheap, key=lambda item: item[1][0], default=None)
    results.append(check_above(
        claim="Selective recomputation keeps most of the saving for under 10% more time", source=SOURCE,
        metric="largest saving of a policy under 1.1x step time, as a share of full recomputation's saving"
               + (f" ({best[0]})" if best else ""),
        measured=(best[1][0] / full[0]) if best and full[0] > 0 else None, bound=SELECTIVE_SHARE, factor=1.0,
        paper="selective recomputation: 5x less activation memory for 2-4% more time (Korthikanti et al., Table 4)",
        bound_name="half of full's saving"))
    return results


register(
    Technique(
        name="memory",
        summary="activation checkpointing policies and sharding strategies: peak memory against step time",
        config=MemoryConfig,
        module=PretrainModule,
        build=build,
        steps=(Step("sweep", _sweep), Step("report", _report)),
        claims=claims,
        golden_overrides=(*CORPUS, *SHRINK, "sweep.policies=[]", "sweep.strategies=[]"),
    )
)
