"""Compare runs and benchmark files side by side: `python repro/compare.py RUN_OR_JSON ... [--out DIR]`.

Each argument is a run folder, a folder of run folders (`runs/pretrain`), a run's `metrics.json`
or a pytest-benchmark JSON file (`pytest benchmarks/ --benchmark-json=FILE`). Writes
`compare.md`, `compare.json` and PNG charts (loss curves on one plot, throughput) into `--out`;
the first run and the first benchmark file are the baselines for the ratio columns.
"""

from __future__ import annotations

import sys
import time
from argparse import ArgumentError
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the project's packages importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from jsonargparse import ArgumentParser

from reports.compare import collect, write
from repro.config import ConfigError


def parser() -> ArgumentParser:
    p = ArgumentParser(prog="repro/compare.py", description=__doc__, exit_on_error=False)
    p.add_argument("inputs", type=str, nargs="+", help="run folders, folders of runs, or JSON files")
    p.add_argument("--out", type=str, default=None, help="output folder (default: runs/compare/<time>)")
    return p


def main(argv: list[str] | None = None) -> int:
    try:
        args = parser().parse_args(argv)
        inputs = collect(args.inputs)
    except (ConfigError, ArgumentError) as err:
        print(f"error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    out = Path(args.out) if args.out else Path("runs") / "compare" / time.strftime("%Y%m%d-%H%M%S")
    report = write(inputs, out)
    print(f"{len(inputs.runs)} run(s), {len(inputs.benchmarks)} benchmark file(s) compared: {report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
