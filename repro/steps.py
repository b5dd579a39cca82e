"""Measurement steps several techniques declare (`registry.Step`): what the finished run's corpus, speed and arms
measure, and lm-eval's scores of each arm. A technique's own steps live in its file."""

from __future__ import annotations

import statistics
from typing import Any, Callable

from repro.evaluate import arm_scores
from repro.registry import Finished, Measured, Step


def _corpus(finished: Finished) -> Measured:
    datamodule = finished.datamodule
    stats = datamodule.stats
    metrics = {f"data/{k}": v for k, v in stats.items() if k != "note"}
    if getattr(datamodule, "corpus_hash", None) is not None:
        metrics["corpus_hash"] = datamodule.corpus_hash
    return Measured(metrics, notes=[stats["note"]] if stats.get("note") else [])


def _speed(finished: Finished) -> Measured:
    """The median tokens/s and MFU over the run's speed windows, and the highest peak memory."""
    metrics = {}
    for key in ("tokens_per_s", "mfu", "peak_mem_gib"):
        values = [r[key] for r in finished.speed if key in r]
        if values:
            metrics[f"perf/{key}"] = max(values) if key == "peak_mem_gib" else statistics.median(values)
    return Measured(metrics)


DATA = Step("data", _corpus)  # the datamodule's stats (`data/*`), its corpus hash and its note
SPEED = Step("speed", _speed)  # `perf/tokens_per_s`, `perf/mfu`, `perf/peak_mem_gib`


def arms(sizes: Callable[[Any, Any], dict[str, Any]]) -> Step:
    """Per arm of a module that trains several side by side: its final validation loss (`<arm>/val_loss`), its training
    seconds and the sizes `sizes(module, arm)` gives (each technique counts its own: MoE's active parameters include
    the embeddings, the hybrid's do not)."""

    def run(finished: Finished) -> Measured:
        module, metrics = finished.module, {}
        for arm in module.arms:
            metrics[f"{arm.name}/val_loss"] = finished.metrics.get(f"val/{arm.name}/loss")
            metrics |= {f"{arm.name}/{k}": v for k, v in sizes(module, arm).items()}
            metrics[f"{arm.name}/train_seconds"] = module.arm_seconds[arm.name]
        return Measured(metrics)

    return Step("arms", run)


def _arm_eval(finished: Finished) -> Measured:
    settings = finished.config.eval
    if not settings.enabled:
        return Measured()
    names = [arm.name for arm in finished.module.arms]
    scores = arm_scores(finished.run_dir, names, settings, str(finished.module.device), finished.metrics)
    return Measured({f"arm_eval/{arm}/{task}": value for arm, table in scores.items() for task, value in table.items()})


# lm-eval's scores of every arm (`arm_eval/<arm>/<task>/<metric>`): the first arm's are the run's own evaluation
ARM_EVAL = Step("lm-eval per arm", _arm_eval)


def arm_eval_scores(metrics: dict[str, Any], arms: list[str]) -> dict[str, dict[str, float]]:
    """ARM_EVAL's metrics back as arm -> {"task/metric": value}, for a report's table."""
    return {arm: {k.removeprefix(f"arm_eval/{arm}/"): v for k, v in metrics.items() if k.startswith(f"arm_eval/{arm}/")}
            for arm in arms}
