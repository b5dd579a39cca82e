"""Self-speculative decoding with MTP heads against plain decoding: acceptance and tokens/s, batch 1.

`python -m benchmarks.speculative --checkpoint runs/mtp/<run> [--device cuda]` times every arm of
an MTP run that has heads, at each draft depth, on the prompts the run saved
(`decode_prompts.json`), and prints (and with `--out`, writes) a JSON record. The MTP technique
measures the same (`measurement.speculative`) at the end of each run; this entry point re-measures a
trained run on another machine (the H100) without training again.
"""

from __future__ import annotations

import json
import sys
from argparse import ArgumentParser
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from measurement.speculative import PROMPTS_FILE, measure_arms
from repro import registry
from repro.checkpoints import load_module, locate, run_folder_argument
from repro.config import ConfigError


def measure_run(run_dir: Path, device: str = "cpu", temperatures: tuple[float, ...] = (0.0, 1.0)) -> list[dict[str, Any]]:
    """`measure_arms` for the MTP run in `run_dir`, on the prompts it saved."""
    checkpoint, run_dir = locate(run_dir)
    settings = json.loads((run_dir / PROMPTS_FILE).read_text())
    module = load_module(registry.get("mtp").module, checkpoint, device)
    return measure_arms(module, settings["prompts"], settings["new_tokens"], temperatures)


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, type=run_folder_argument, help="an MTP run folder (or a .ckpt in one)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, help="write the records here as JSON")
    args = parser.parse_args(argv)
    try:
        records = measure_run(Path(args.checkpoint), args.device)
    except ConfigError as err:  # a checkpoint refused by the weights-only unpickler
        print(f"error: {err}", file=sys.stderr)
        return 2
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    result = {"device": name, "checkpoint": str(args.checkpoint), "records": records}
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
