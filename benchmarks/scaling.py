"""Data-parallel scaling of a pretraining preset: tokens/s per GPU, efficiency against one GPU, peak memory, loss curves.

`NCCL_NVLS_ENABLE=0 python -m benchmarks.scaling --devices 1 2 --strategies ddp fsdp2 deepspeed_stage_2 [--out DIR]`
runs `repro/run.py --technique pretrain` (or `--technique moe`: every arm, with each arm's global
MaxVio in the table) once on one GPU and once per strategy and device count,
each at the same global batch (`--global-batch` sequences per step, split evenly over the GPUs) and
the same seed, so the loss curves should match the one-GPU run. It reads each run's report metrics
(tokens/s counted over all processes, peak memory of rank 0) and validation curve, and writes
scaling.json, scaling.md (a table) and scaling.png (the loss curves). NVLink multicast stays off:
it can take shared GPUs out of service.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from argparse import ArgumentParser
from pathlib import Path
from typing import Any

from reports.plots import metric_curves

ROOT = Path(__file__).resolve().parent.parent


def run(technique: str, preset: str, strategy: str, devices: int, global_batch: int, steps: int, out: Path,
        extra: list[str]) -> dict[str, Any]:
    """One run; its record (or the error line it died with)."""
    if global_batch % devices:
        raise ValueError(f"--global-batch {global_batch} does not split over {devices} GPUs")
    folder = out / f"{strategy}-{devices}"
    sets = [f"data.batch_size={global_batch // devices}", "train.accumulate=1", f"train.max_steps={steps}",
            f"train.val_every={max(1, steps // 4)}", "train.val_batches=10", f"train.checkpoint_every={steps}",
            "eval.enabled=false", *extra]
    command = [sys.executable, "repro/run.py", "--technique", technique, "--preset", preset, "--accelerator", "gpu",
               "--devices", str(devices), "--strategy", strategy, "--out", str(folder), *(a for s in sets for a in ("--set", s))]
    start = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "NCCL_NVLS_ENABLE": "0"})
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "stderr.txt").write_text(done.stderr)
    record: dict[str, Any] = {"strategy": strategy, "devices": devices, "global_batch": global_batch,
                              "wall_s": round(time.perf_counter() - start, 1), "command": " ".join(command[1:])}
    reports = sorted(folder.glob(f"{technique}/*/metrics.json"))
    if done.returncode != 0 or not reports:
        lines = done.stderr.strip().splitlines() or ["(no output)"]
        return {**record, "error": next((x for x in reversed(lines) if "Error" in x), lines[-1])}
    metrics = json.loads(reports[-1].read_text())
    values = metrics["metrics"]
    return {**record, "tokens_per_s": values.get("perf/tokens_per_s"), "peak_mem_gib": values.get("perf/peak_mem_gib"),
            "val_loss": values.get("val/loss"), "val_curve": metrics["history"].get("val/loss", []),
            "maxvio": {k.split("/")[0]: v for k, v in values.items()  # MoE: each arm's MaxVio over the validation batches
                       if k.count("/") == 1 and k.endswith("/maxvio_global") and v is not None}}


def table(records: list[dict[str, Any]]) -> list[str]:
    one = next((r for r in records if r["devices"] == 1 and "error" not in r), None)
    arms = list(one["maxvio"]) if one and one.get("maxvio") else []
    lines = ["| strategy | GPUs | tokens/s | tokens/s per GPU | scaling efficiency | peak GiB (rank 0) | final val loss | vs 1 GPU |"
             + "".join(f" MaxVio {a} |" for a in arms), "|---|---:|---:|---:|---:|---:|---:|---:|" + "---:|" * len(arms)]
    for r in records:
        if "error" in r:
            lines.append(f"| {r['strategy']} | {r['devices']} | failed: {r['error'][:150]} | | | | | |" + " |" * len(arms))
            continue
        per_gpu = r["tokens_per_s"] / r["devices"]
        efficiency = f"{per_gpu / one['tokens_per_s']:.0%}" if one else ""
        delta = f"{r['val_loss'] / one['val_loss'] - 1:+.2%}" if one else ""
        memory = f"{r['peak_mem_gib']:.2f}" if r["peak_mem_gib"] is not None else "n/a"  # MoE arms record none
        lines.append(f"| {r['strategy']} | {r['devices']} | {r['tokens_per_s']:,.0f} | {per_gpu:,.0f} | {efficiency} | "
                     f"{memory} | {r['val_loss']:.4f} | {delta} |"
                     + "".join(f" {r['maxvio'][a]:.4f} |" if a in r["maxvio"] else " |" for a in arms))
    return lines


def plot(records: list[dict[str, Any]], title: str) -> bytes:
    curves = {f"{r['strategy']} x{r['devices']}": [tuple(p) for p in r["val_curve"]] for r in records if "error" not in r}
    return metric_curves(curves, "validation loss", title, smooth=1)


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--technique", default="pretrain", choices=["pretrain", "moe"])
    parser.add_argument("--preset", default="gpt2-124m")
    parser.add_argument("--devices", type=int, nargs="+", default=[2])
    parser.add_argument("--strategies", nargs="+", default=["ddp", "fsdp2", "deepspeed_stage_2"])
    parser.add_argument("--global-batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--out", type=Path, default=Path("runs/scaling"))
    args = parser.parse_args(argv)
    plan = [("auto", 1)] + [(strategy, devices) for devices in args.devices if devices > 1 for strategy in args.strategies]
    records: list[dict[str, Any]] = []
    args.out.mkdir(parents=True, exist_ok=True)
    for strategy, devices in plan:
        records.append(run(args.technique, args.preset, strategy, devices, args.global_batch, args.steps, args.out, args.set))
        print(json.dumps({k: v for k, v in records[-1].items() if k != "val_curve"}), flush=True)
        (args.out / "scaling.json").write_text(json.dumps(records, indent=2))  # kept as it grows: a cut-off call keeps what ran
    lines = table(records)
    print("\n".join(lines))
    (args.out / "scaling.md").write_text("\n".join(lines) + "\n")
    (args.out / "scaling.png").write_bytes(plot(records, f"Validation loss, {args.technique} {args.preset}, global batch {args.global_batch}"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
