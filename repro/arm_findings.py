"""The metrics every arms technique opens its findings with (MoE, hybrid, MTP)."""

from __future__ import annotations

import statistics
from typing import Any, Callable


def arm_metrics(module: Any, final: dict[str, float], datamodule: Any, speed: list[dict[str, float]],
                sizes: Callable[[Any], dict[str, Any]]) -> dict[str, Any]:
    """The corpus's stats (`data/*`); per arm its final validation loss, the sizes `sizes(arm)` gives (each
    technique counts its own: MoE's active parameters include the embeddings, the hybrid's do not) and its
    training seconds; the median tokens/s of the run (`perf/tokens_per_s`)."""
    metrics: dict[str, Any] = {f"data/{k}": v for k, v in datamodule.stats.items() if k != "note"}
    for arm in module.arms:
        metrics[f"{arm.name}/val_loss"] = final.get(f"val/{arm.name}/loss")
        metrics |= {f"{arm.name}/{k}": v for k, v in sizes(arm).items()}
        metrics[f"{arm.name}/train_seconds"] = module.arm_seconds[arm.name]
    tokens = [r["tokens_per_s"] for r in speed if "tokens_per_s" in r]
    if tokens:
        metrics["perf/tokens_per_s"] = statistics.median(tokens)
    return metrics
