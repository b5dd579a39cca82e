"""Hogwild! inference against one worker on a verifiable task: steps, wall time and tokens to finish, accuracy.

`python -m benchmarks.hogwild --checkpoint runs/sft/<run-id> [--workers 1 2 4] [--rows 20] [--device cuda]`
asks a run's model (`--arm` picks one of several) `--rows` sums of `--terms` numbers
(`evaluation/parallel_sum.py`) with 1, 2, 4, ... workers sharing one cache (`modules/decoding/hogwild.py`), greedy, and
prints (with `--out`, writes) per worker count the mean forward passes, seconds and tokens until a worker
finishes its line, the share of runs that finished, and the share answered right.
"""

from __future__ import annotations

import json
import sys
from argparse import ArgumentParser
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from evaluation.parallel_sum import compare, sum_rows
from repro.checkpoints import load_model, run_folder_argument
from repro.config import ConfigError


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, type=run_folder_argument, help="a run folder (or a .ckpt in one)")
    parser.add_argument("--arm", default=None, help="one of several models the run trained side by side")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--rows", type=int, default=20)
    parser.add_argument("--terms", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=16, help="per worker: prompt + workers x this must fit the context")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)

    try:
        model, tokenizer = load_model(args.checkpoint, args.device, args.arm)
    except ConfigError as err:  # a checkpoint refused by the weights-only unpickler, or an unknown arm
        print(f"error: {err}", file=sys.stderr)
        return 2
    rows = sum_rows(args.rows, terms=args.terms)
    with torch.inference_mode():
        result = compare(model, tokenizer, rows, args.workers, args.max_new_tokens)
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    record = {"checkpoint": str(args.checkpoint), "arm": args.arm, "device": device, "rows": args.rows, "terms": args.terms,
              "max_new_tokens": args.max_new_tokens, "by_workers": {str(w): r for w, r in result.items()}}
    text = json.dumps(record, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
