"""Run one technique end to end: `python repro/run.py --technique pretrain [--preset tiny] [--set k=v ...]`."""

from __future__ import annotations

import shlex
import sys
from dataclasses import replace
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the project's packages importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from argparse import ArgumentError

import yaml
from jsonargparse import ArgumentParser
from lightning.fabric.utilities.exceptions import MisconfigurationException

from datamodules.sources import DataFormatError
from reports import seeds
from repro import registry
from repro.config import ConfigError, load_preset
from repro.runner import RunSpec, init_checkpoint, resolve, run
from repro.trainer import STRATEGIES, TrainerArgs


def parser() -> ArgumentParser:
    p = ArgumentParser(prog="repro/run.py", description=__doc__, exit_on_error=False)
    p.add_argument("--technique", type=str, help="technique to run (see --list)")
    p.add_argument("--preset", type=str, help="preset of that technique (default: its tiny preset)")
    p.add_argument("--set", type=str, action="append", default=[], metavar="KEY=VALUE", help="override a preset value, e.g. --set model.n_layer=4")
    p.add_argument("--list", action="store_true", help="list techniques, their presets and settings, then exit")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--seeds", type=int, default=1,
                   help="run K seeds (--seed, --seed + 1, ...) and test each claim over them at 95%% (reports/seeds.py)")
    p.add_argument("--out", type=Path, default=Path("runs"), help="folder for run folders")
    p.add_argument("--resume", type=Path, help="run folder (or a .ckpt in one) to continue")
    p.add_argument("--init", type=str, help="start from this run folder or .ckpt of the prerequisite (e.g. a pretrain run for sft) instead of training it")
    p.add_argument("--accelerator", type=str, default="auto", help="cpu, gpu, auto, ...")
    p.add_argument("--devices", type=str, default="auto", help="number or list of devices, or auto")
    p.add_argument("--strategy", type=str, default="auto", help=STRATEGIES)
    p.add_argument("--precision", type=str, default="auto", help="auto (bf16-mixed on GPU, 32-true on CPU), 32-true, ...")
    p.add_argument("--num-nodes", type=int, default=1)
    return p


def list_techniques() -> str:
    lines = []
    for name, technique in registry.techniques().items():
        also = f" (also --technique {', '.join(technique.aliases)})" if technique.aliases else ""
        lines.append(f"{name}: {technique.summary}{also}")
        for preset in technique.presets:
            lines.append(f"  --preset {preset}")
            text = yaml.safe_dump(load_preset(name, preset), sort_keys=False, default_flow_style=True, width=200)
            lines.extend(f"      {line}" for line in text.strip().splitlines())
    return "\n".join(lines)


def run_seeds(spec: RunSpec, k: int, out: Path, argv: list[str]) -> int:
    """K runs of `spec` at seeds spec.seed .. spec.seed + k - 1, each with its own report, then the
    verdicts over the seeds in runs/<technique>/<preset>-seeds<k>-<stamp>/seeds.md."""
    run_dirs = []
    for i in range(k):
        print(f"seed {spec.seed + i} ({i + 1} of {k})", flush=True)
        run_dirs.append(run(replace(spec, seed=spec.seed + i), out=out))
    command = shlex.join(["python", "repro/run.py", *argv])
    report = seeds.write(run_dirs, seeds.folder_for(out, spec.technique, spec.preset, k), command)
    print(f"report: {report}")
    return 0


def main(argv: list[str] | None = None) -> int:
    try:
        args = parser().parse_args(argv)
        if args.list:
            print(list_techniques())
            return 0
        trainer_args = TrainerArgs(args.accelerator, args.devices, args.strategy, args.precision, args.num_nodes)
        if args.resume is not None:
            if args.set or args.technique or args.init:
                raise ConfigError("--resume continues a run with its own settings; drop --technique/--preset/--set/--init")
            run_dir = run(resume=args.resume)
            print(f"report: {run_dir / 'report.md'}")
            return 0
        if not args.technique:
            raise ConfigError(f"--technique is required. Valid: {', '.join(registry.techniques())}.")
        technique = registry.get(args.technique)
        spec = RunSpec(technique.name, args.preset or technique.default_preset, args.set, args.seed, trainer_args, args.init)
        resolve(spec)  # fail fast on a bad key or value, before any work
        if spec.init:
            init_checkpoint(technique, spec.init)
        if args.seeds < 1:
            raise ConfigError(f"--seeds {args.seeds}: give a number of seeds of at least 1")
        if args.seeds > 1:
            return run_seeds(spec, args.seeds, args.out, argv if argv is not None else sys.argv[1:])
        run_dir = run(spec, out=args.out)
    except (ConfigError, ArgumentError, DataFormatError, FileNotFoundError, MisconfigurationException) as err:
        print(f"error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    print(f"report: {run_dir / 'report.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
