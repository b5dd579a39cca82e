"""DeepSeek-V3's Table 2 (pipeline bubbles and memory) from a simulator, and real CPU pipelines against it.

`python -m benchmarks.dualpipe [--out DIR]` prints Table 2 symbolically and at the given per-chunk
times (F forward, B full backward, W its weight part, F&B an overlapped forward + backward) next to
what the simulator measures on the built schedules, writes their timelines (like the report's
Figure 5) to DIR/timelines.png, then runs the suite's Decoder as a real `torch.distributed.pipelining`
pipeline (gloo, one CPU process and one thread per stage) under GPipe, 1F1B and ZB1P and writes
measured vs simulated step time and idle fractions to DIR/real_vs_simulated.{md,json}.
"""

from __future__ import annotations

import json
import platform
import sys
from argparse import ArgumentParser
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from measurement.dualpipe import real_table
from modules.parallel.pipeline.real import compare, tiny_config
from modules.parallel.pipeline.schedules import METHODS, Timing, build
from modules.parallel.pipeline.timeline import table2, timeline_png


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/dualpipe"))
    parser.add_argument("--stages", type=int, default=8, help="PP of the simulated Table 2 (the report's Figure 5: 8)")
    parser.add_argument("--micro-batches", type=int, default=20, help="micro-batches of the simulated schedules")
    parser.add_argument("--F", type=float, default=1.0)
    parser.add_argument("--B", type=float, default=2.0, help="full backward (inputs + weights)")
    parser.add_argument("--W", type=float, default=1.0, help="the weight part of B")
    parser.add_argument("--FB", type=float, default=2.5, help="F&B, one forward overlapped with one backward")
    parser.add_argument("--real-pp", type=int, default=2, help="processes of the real pipeline (2 cores here: keep 2)")
    parser.add_argument("--real-micro-batches", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--steps", type=int, default=7)
    parser.add_argument("--skip-real", action="store_true", help="simulate only")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)

    plain, overlapped = Timing(args.F, args.B, args.W), Timing(args.F, args.B, args.W, FB=args.FB)
    lines = ["## DeepSeek-V3 Table 2, symbolic, at these times, and simulated (largest bubble over devices)", ""]
    for timing in (plain, overlapped):
        lines += table2(args.stages, args.micro_batches, timing) + [""]
    print("\n".join(lines))
    schedules = [build(method, args.stages, args.micro_batches, overlapped) for method in METHODS]
    (args.out / "timelines.png").write_bytes(timeline_png(schedules))
    (args.out / "table2.md").write_text("\n".join(lines) + "\n")

    if not args.skip_real:
        config = tiny_config()
        records = compare(args.real_pp, args.real_micro_batches, config, args.batch_size, args.seq_len,
                          steps=args.steps, warmup=2)
        real = [f"## Real pipelines (torch {torch.__version__}, {platform.processor() or platform.machine()}, gloo, "
                f"{args.real_pp} processes x 1 thread; decoder {config.n_layer} layers x {config.n_embd}, batch "
                f"{args.batch_size} x {args.seq_len}) vs the simulator", ""] + real_table(records)
        print("\n".join(real))
        (args.out / "real_vs_simulated.md").write_text("\n".join(real) + "\n")
        (args.out / "real_vs_simulated.json").write_text(json.dumps(records, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
