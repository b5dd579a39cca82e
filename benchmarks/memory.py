"""Peak memory against step time for each strategy and activation-checkpointing policy, with the theory beside it.

`python -m benchmarks.memory --device cuda [--preset gpt2-124m] [--out reports/memory/h100]` times the
pretraining step of a preset (`benchmarks/train_step.py`: the Trainer a run uses) once per case, each
case in its own process (strategies set up process groups and engines once per process):

- every activation-checkpointing policy (modules/parallel/plan.py: none, full, every_k with k = 2,
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
import sys
import tempfile
from argparse import ArgumentParser
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from benchmarks.train_step import time_train_step
from measurement.memory import plot, sweep, table
from modules.nn import Decoder
from modules.parallel.plan import POLICIES
from repro.runner import RunSpec, resolve

GPU_STRATEGIES = ("auto", "ddp", "fsdp", "fsdp2", "deepspeed_stage_1", "deepspeed_stage_2", "deepspeed_stage_3",
                  "deepspeed_stage_2_offload")
CPU_STRATEGIES = ("auto", "ddp", "fsdp2")


def run_case(strategy: str, policy: str, preset: str, device: str, steps: int, warmup: int,
             extra: list[str] = (), technique: str = "pretrain") -> dict[str, Any]:
    """One case in this process: the step's time and memory."""
    overrides = [f"train.activation_checkpointing={policy}", "train.compile=false", *extra]
    with tempfile.TemporaryDirectory(prefix="memory-case-") as tmp:
        record = time_train_step(technique, preset, torch.device(device), Path(tmp), warmup=warmup, steps=steps,
                                 strategy=strategy, overrides=overrides)
    return {"strategy": strategy, "checkpointing": policy, **record}


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
