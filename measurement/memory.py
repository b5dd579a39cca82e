"""Peak memory against step time for each strategy and activation-checkpointing policy, with the theory beside it.

`sweep` times a technique's training step at a preset once per case, each case in a process of its own
(strategies set up process groups and engines once per process): every activation-checkpointing policy under
the default strategy, then every other strategy without checkpointing. A case is `python -m benchmarks.memory
--case STRATEGY:POLICY`, which times the step in the Trainer a run uses (`benchmarks/train_step.py`) and prints
its record: the sweep starts that command line, it imports nothing above this layer. `table` sets each case
beside ZeRO's model-state bytes (Rajbhandari et al. 2020: 2 + 2 + 12 bytes per parameter for mixed-precision
Adam, of which stage 1 shards the 12 of optimizer state over N devices, stage 2 also the 2 of gradients, stage 3
also the 2 of weights); `activation_saving` gives a policy's share of activation memory saved and its step time
against no checkpointing (full recomputation costs one more forward, about 4/3 of a step, Chen et al. 2016).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from reports.plots import figure, png

ZERO_STAGE = {"deepspeed_stage_1": 1, "deepspeed_stage_2": 2, "deepspeed_stage_3": 3, "fsdp": 3, "fsdp2": 3,
              "deepspeed_stage_2_offload": 2}


def zero_bytes_per_param(strategy: str, devices: int) -> float:
    """Model-state bytes per parameter on one device (ZeRO, Sec. 5: weights 2, gradients 2, Adam state 12)."""
    stage = ZERO_STAGE.get(strategy, 0)
    if strategy.endswith("offload"):
        return 2 + 2 / devices  # optimizer state and its updates live in host memory
    weights, grads, adam = 2.0, 2.0, 12.0
    return (weights / devices if stage >= 3 else weights) + (grads / devices if stage >= 2 else grads) + (
        adam / devices if stage >= 1 else adam)


def sweep(preset: str, device: str, strategies: list[str], policies: list[str], steps: int, warmup: int,
          extra: list[str] = (), progress: Any = print, technique: str = "pretrain") -> list[dict[str, Any]]:
    """Every policy under the default strategy, then every other strategy without checkpointing; a process per case
    (`python -m benchmarks.memory --case`), whose last line of output is its record."""
    cases = [("auto", p) for p in policies] + [(s, "none") for s in strategies if s != "auto"]
    records = []
    for strategy, policy in cases:
        command = [sys.executable, "-m", "benchmarks.memory", "--case", f"{strategy}:{policy}", "--technique", technique, "--preset", preset,
                   "--device", device, "--steps", str(steps), "--warmup", str(warmup), *(a for o in extra for a in ("--set", o))]
        done = subprocess.run(command, cwd=Path(__file__).resolve().parent.parent, capture_output=True, text=True)
        if done.returncode != 0:
            lines = done.stderr.strip().splitlines() or ["(no output)"]
            error = next((line for line in reversed(lines) if "Error" in line or "Exception" in line), lines[-1])
            record = {"strategy": strategy, "checkpointing": policy, "error": error}
        else:
            record = json.loads(done.stdout.strip().splitlines()[-1])
        records.append(record)
        progress(describe(record))
    return records


def activation_saving(records: list[dict[str, Any]], policy: str) -> tuple[float, float] | None:
    """(share of the baseline's activation memory saved, step time / baseline's) of `policy` under the
    default strategy; None where either case is missing, failed or has no CUDA activation figure."""
    def case(p: str) -> dict[str, Any] | None:
        return next((r for r in records if r["strategy"] == "auto" and r["checkpointing"] == p and "error" not in r), None)

    base, other = case("none"), case(policy)
    if not base or not other or not base.get("activation_mem_gib") or other.get("activation_mem_gib") is None:
        return None
    return 1 - other["activation_mem_gib"] / base["activation_mem_gib"], other["ms_per_step"] / base["ms_per_step"]


def describe(r: dict[str, Any]) -> str:
    head = f"{r['strategy']:26} {r['checkpointing']:10}"
    if "error" in r:
        return f"{head} failed: {r['error']}"
    act = f", activations {r['activation_mem_gib']:6.2f} GiB" if "activation_mem_gib" in r else ""
    return f"{head} {r['ms_per_step']:9.1f} ms/step, peak {r['peak_mem_gib']:6.2f} GiB{act}"


def table(records: list[dict[str, Any]], params: int) -> list[str]:
    base = next((r for r in records if r["strategy"] == "auto" and r["checkpointing"] == "none" and "error" not in r), None)
    lines = ["| strategy | checkpointing | ms/step | x time | peak GiB | activations GiB | activations saved | "
             "at step start GiB | model state, theory (1 device) | last train loss |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in records:
        theory = f"{zero_bytes_per_param(r['strategy'], 1) * params / 2**30:.2f} GiB"
        if "error" in r:
            lines.append(f"| {r['strategy']} | {r['checkpointing']} | failed: {r['error'][:120]} | | | | | | {theory} | |")
            continue
        slower = f"{r['ms_per_step'] / base['ms_per_step']:.2f}" if base else ""
        act = r.get("activation_mem_gib")
        saved = f"{1 - act / base['activation_mem_gib']:.0%}" if base and act is not None and base.get("activation_mem_gib") else ""
        start = f"{r['static_mem_gib']:.2f}" if "static_mem_gib" in r else ""
        lines.append(f"| {r['strategy']} | {r['checkpointing']} | {r['ms_per_step']:.1f} | {slower} | {r['peak_mem_gib']:.2f} | "
                     f"{'' if act is None else f'{act:.2f}'} | {saved} | {start} | {theory} | {r.get('train_loss', float('nan')):.4f} |")
    return lines


def plot(records: list[dict[str, Any]], title: str) -> bytes:
    fig = figure(8, 4.5)
    ax = fig.add_subplot()
    for r in records:
        if "error" in r:
            continue
        policy_case = r["strategy"] == "auto"
        ax.scatter(r["ms_per_step"], r["peak_mem_gib"], marker="o" if policy_case else "s", color="C0" if policy_case else "C1")
        label = r["checkpointing"] if policy_case else r["strategy"]
        ax.annotate(label, (r["ms_per_step"], r["peak_mem_gib"]), textcoords="offset points", xytext=(5, 3), fontsize=7)
    ax.set(xlabel="step time (ms)", ylabel="peak memory (GiB)", title=title)
    ax.grid(alpha=0.3)
    return png(fig)
