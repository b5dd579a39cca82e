"""Peak memory against step time for each strategy and activation-checkpointing policy, with the theory beside it.

`python -m benchmarks.memory --device cuda [--preset gpt2-124m] [--out reports/memory/h100]` times the
pretraining step of a preset (`benchmarks/train_step.py`: the Trainer a run uses) once per case, each
case in its own process (strategies set up process groups and engines once per process):

- every activation-checkpointing policy (modules/parallel.py: none, full, every_k with k = 2,
  attention, mlp) under the default strategy;
- every strategy (auto, ddp, fsdp, fsdp2, deepspeed_stage_1/2/3, deepspeed_stage_2_offload on GPUs;
  auto, ddp and fsdp2 on a CPU) without checkpointing.

It writes memory.json, memory.md (a table with the theory per case) and memory.png (peak memory
against step time). Activation memory is the CUDA peak minus the memory allocated as a step starts
(weights and optimizer state). The theory: ZeRO (Rajbhandari et al. 2020) holds 2 + 2 + 12 bytes per
parameter for mixed-precision Adam, of which stage 1 shards the 12 of optimizer state over N devices,
stage 2 also the 2 of gradients, stage 3 also the 2 of weights; full recomputation costs one more
forward, about 4/3 of a step's compute (Chen et al. 2016).
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from argparse import ArgumentParser
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

POLICIES = ("none", "full", "every_k", "attention", "mlp")
GPU_STRATEGIES = ("auto", "ddp", "fsdp", "fsdp2", "deepspeed_stage_1", "deepspeed_stage_2", "deepspeed_stage_3",
                  "deepspeed_stage_2_offload")
CPU_STRATEGIES = ("auto", "ddp", "fsdp2")
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


def run_case(strategy: str, policy: str, preset: str, device: str, steps: int, warmup: int,
             extra: list[str] = (), technique: str = "pretrain") -> dict[str, Any]:
    """One case in this process: the step's time and memory."""
    from benchmarks.train_step import time_train_step

    overrides = [f"train.activation_checkpointing={policy}", "train.compile=false", *extra]
    with tempfile.TemporaryDirectory(prefix="memory-case-") as tmp:
        record = time_train_step(technique, preset, torch.device(device), Path(tmp), warmup=warmup, steps=steps,
                                 strategy=strategy, overrides=overrides)
    return {"strategy": strategy, "checkpointing": policy, **record}


def sweep(preset: str, device: str, strategies: list[str], policies: list[str], steps: int, warmup: int,
          extra: list[str] = (), progress: Any = print, technique: str = "pretrain") -> list[dict[str, Any]]:
    """Every policy under the default strategy, then every other strategy without checkpointing; a process per case."""
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
    from reports.plots import figure, png

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


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--technique", default="pretrain", help="a technique whose module is PretrainModule (pretrain, memory)")
    parser.add_argument("--preset", default=None, help="its preset (default: gpt2-124m on CUDA, tiny on a CPU)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--strategies", nargs="+", default=None)
    parser.add_argument("--policies", nargs="+", default=list(POLICIES), choices=POLICIES)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None, help="folder for memory.json, memory.md and memory.png")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override the preset in every case")
    parser.add_argument("--case", help="STRATEGY:POLICY: run one case in this process and print its record")
    args = parser.parse_args(argv)
    cuda = args.device.startswith("cuda")
    preset = args.preset or ("gpt2-124m" if cuda else "tiny")
    if args.case:
        strategy, policy = args.case.split(":")
        print(json.dumps(run_case(strategy, policy, preset, args.device, args.steps, args.warmup, args.set, args.technique)))
        return 0
    strategies = args.strategies or list(GPU_STRATEGIES if cuda else CPU_STRATEGIES)
    records = sweep(preset, args.device, strategies, args.policies, args.steps, args.warmup, args.set, technique=args.technique)
    from modules.nn import Decoder
    from repro.runner import RunSpec, resolve

    _, config = resolve(RunSpec(args.technique, preset, args.set))
    with torch.device("meta"):
        params = Decoder(config.model).num_params()
    name = torch.cuda.get_device_name() if cuda else f"cpu ({torch.get_num_threads()} threads)"
    lines = [f"# Memory and step time: pretrain preset {preset} on {name}", "",
             f"{params / 1e6:.1f}M parameters; {args.steps} timed steps after {args.warmup}; torch.compile off; "
             f"overrides {' '.join(args.set) or 'none'}; "
             "activations = CUDA peak - memory allocated as a step starts.", "", *table(records, params)]
    print("\n".join(lines))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "memory.json").write_text(json.dumps({"device": name, "preset": preset, "params": params,
                                                          "torch": torch.__version__, "records": records}, indent=2))
        (args.out / "memory.md").write_text("\n".join(lines) + "\n")
        (args.out / "memory.png").write_bytes(plot(records, f"Peak memory vs step time, {preset} on {name}"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
