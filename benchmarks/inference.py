"""Quantization and speculative decoding of an inference run's target: bytes, loss, tokens/s, acceptance.

`python -m benchmarks.inference --checkpoint runs/inference/<run> [--device cuda] [--out FILE]` measures a
trained `--technique inference` run again on another machine (the H100) without training again, on the inputs
the run saved: what `measurement.inference.measure` measures at the end of each run (see there), with the
quantization schemes, draft lengths and timing passes the command line may change.
"""

from __future__ import annotations

import json
import sys
from argparse import ArgumentParser
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from measurement.inference import PROMPTS_FILE, DecodeSettings, QuantSettings, measure, plot
from modules.training.inference import InferenceModule
from modules.nn.quant import SCHEMES, TORCHAO_SCHEMES
from repro.checkpoints import load_module, locate, run_folder_argument
from repro.config import ConfigError


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, type=run_folder_argument, help="an inference run folder (or a .ckpt in one)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--schemes", nargs="+", choices=[*SCHEMES, *TORCHAO_SCHEMES],
                        help="quantization schemes instead of the run's (e.g. add torchao-int8 torchao-int4)")
    parser.add_argument("--gammas", type=int, nargs="+", help="draft lengths instead of the run's")
    parser.add_argument("--repeats", type=int, help="timing passes over the prompts instead of the run's")
    parser.add_argument("--out", type=Path, help="write the result here as JSON")
    args = parser.parse_args(argv)
    if args.gammas and min(args.gammas) < 1 or args.repeats is not None and args.repeats < 1:
        parser.error("--gammas (draft lengths) and --repeats must be at least 1")
    checkpoint, run_dir = locate(args.checkpoint)
    try:
        module = load_module(InferenceModule, checkpoint, args.device).to(getattr(torch, args.dtype)).eval()
    except ConfigError as err:  # a checkpoint refused by the weights-only unpickler
        print(f"error: {err}", file=sys.stderr)
        return 2
    saved = json.loads((run_dir / PROMPTS_FILE).read_text())
    quant, decode = QuantSettings(**saved["quant"]), DecodeSettings(**saved["decode"])
    quant.schemes = args.schemes or quant.schemes
    decode.gammas = args.gammas or decode.gammas
    decode.repeats = args.repeats or decode.repeats
    result = measure(module, saved["prompts"], torch.tensor(saved["calibration"]), torch.tensor(saved["held_out"]), quant, decode)
    result["dtype"] = args.dtype
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text)
        args.out.with_suffix(".png").write_bytes(plot(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
