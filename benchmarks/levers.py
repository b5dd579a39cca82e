"""The levers of pretraining speed, one at a time: what each changes in tokens/s, MFU, peak memory and the loss.

Each lever is the plain PyTorch loop of `benchmarks.throughput` (the same `Decoder`, data, bf16 autocast,
AdamW, clipping) with one thing changed from the baseline (compiled, fused AdamW, SDPA's default kernel,
the loss read back every step): the loss head fused with the cross-entropy and chunked (`model.loss_chunk`),
SDPA pinned to cuDNN or to flash, torch.compile's other modes (reduce-overhead: the forward and backward
replayed as CUDA graphs), the blocks' linears in FP8, the foreach optimizer, no read-back per step,
a larger micro-batch. The suite's Lightning loop runs the baseline too, so the framework's own cost stays
visible. Every lever trains from the same seed on the same batches, so its loss curve is set against the
baseline's (the largest relative gap over the steps: speed must not change the model).
`python -m benchmarks.levers --preset gpt2-124m --out DIR` writes levers-<preset>.json and .md.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from dataclasses import asdict
from pathlib import Path

import torch

from benchmarks.throughput import Lever, lightning_loop, preset_model, train
from measurement.hardware import matmul_tflops
from modules.nn import Decoder


def levers(batch: int) -> list[Lever]:
    """The baseline, then each lever alone."""
    return [  # the likeliest to matter first: a call cut short still has them
        Lever("baseline", batch),
        Lever("loss fused with the head, chunks of 4096 tokens", batch, loss_chunk=4096),
        Lever(f"micro-batch {2 * batch}, loss fused (4096)", 2 * batch, loss_chunk=4096),
        Lever("FP8 linears (torchao float8)", batch, fp8=True),
        Lever("SDPA pinned to cuDNN", batch, sdpa="cudnn"),
        Lever("SDPA pinned to flash", batch, sdpa="flash"),
        Lever("no loss read-back per step", batch, read_every_step=False),
        Lever("foreach AdamW", batch, optimizer="foreach"),
        Lever("loss fused with the head, chunks of 1024 tokens", batch, loss_chunk=1024),
        Lever(f"micro-batch {2 * batch}", 2 * batch),
        Lever("compile max-autotune-no-cudagraphs", batch, compile="max-autotune-no-cudagraphs"),
        Lever("compile reduce-overhead (forward and backward as CUDA graphs)", batch, compile="reduce-overhead"),
        Lever("eager (no compile)", batch, compile=None),
    ]


def fp8_verdict(rows: list[dict], tolerance: float = 0.0025) -> dict | None:
    """DeepSeek-V3's claim for FP8 training (Sec. 3.3: relative loss error below 0.25% against BF16), on this run:
    the FP8 lever's mean loss over its last 10 steps against the baseline's over the same steps."""
    base = next((r for r in rows if r["name"] == "baseline" and "losses" in r), None)
    fp8 = next((r for r in rows if r.get("fp8") and "losses" in r and r["batch"] == (base or {}).get("batch")), None)
    if base is None or fp8 is None:
        return None

    def tail(row: dict) -> float:
        return sum(row["losses"][-10:]) / len(row["losses"][-10:])

    relative = tail(fp8) / tail(base) - 1
    return {"relative_loss_error": relative, "tolerance": tolerance, "steps": len(base["losses"]),
            "verdict": "reproduced" if abs(relative) < tolerance else "not reproduced"}


def loss_gap(row: dict, base: dict) -> float | None:
    """The largest relative gap between two loss curves of the same batches (None for another batch size)."""
    if row["batch"] != base["batch"]:
        return None
    return max(abs(a - b) / abs(b) for a, b in zip(row["losses"], base["losses"]))


def markdown(meta: dict, rows: list[dict]) -> str:
    lines = [
        f"# The levers of pretraining speed, {meta['preset']}, {meta['device']}", "",
        f"`{meta['command']}`", "",
        f"torch {meta['torch']}; bf16 matmul rate measured in this run {meta['matmul_tflops_bf16']:.0f} TFLOP/s; "
        f"{meta['flops_per_token'] / 1e6:.1f} MFLOP per token; {meta['warmup']} warm-up steps, {meta['steps']} timed. "
        "Each row changes one thing from the baseline; \"vs baseline\" divides tokens/s; the loss gap is the largest "
        "relative difference of its loss curve from the baseline's over every step (same seed, same batches).", "",
        "| lever | batch | ms/step | tokens/s | vs baseline | MFU | peak GiB | loss gap | final loss |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    base = next(r for r in rows if r["name"] == "baseline")
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['name']} | {r['batch']} | failed: {r['error']} | | | | | | |")
            continue
        gap = loss_gap(r, base) if "losses" in r else None
        lines.append(
            f"| {r['name']} | {r['batch']} | {r['ms_per_step']:.1f} | {r['tokens_per_s']:,.0f} | "
            f"{r['tokens_per_s'] / base['tokens_per_s']:.3f} | {r['mfu']:.1%} | {r['peak_mem_gib']:.2f} | "
            f"{'' if gap is None else f'{gap:.2e}'} | {r['losses'][-1] if 'losses' in r else float('nan'):.4f} |"
        )
    verdict = meta.get("fp8_verdict")
    if verdict:
        lines += ["", f"FP8 against the baseline's precision (bf16 autocast on CUDA; DeepSeek-V3, Sec. 3.3: relative loss "
                  f"error < {verdict['tolerance']:.2%}): {verdict['relative_loss_error']:+.3%} over the last "
                  f"{min(10, verdict['steps'])} of {verdict['steps']} steps from the same start, "
                  f"**{verdict['verdict']}** at this length (the paper's figure holds over 1T tokens; a run this short tests "
                  "the start of training only)."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--only", nargs="+", default=None, help="run only the levers whose names start with these")
    parser.add_argument("--no-lightning", action="store_true", help="skip the Lightning loop's baseline row")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg = preset_model(args.preset)
    peak = matmul_tflops(device)
    flops_per_token = Decoder(cfg).flops_per_token()
    chosen = [lv for lv in levers(args.batch) if lv.name == "baseline" or not args.only
              or any(lv.name.startswith(prefix) for prefix in args.only)]
    rows = []
    for lever in chosen:
        began = time.perf_counter()
        try:
            row = train(cfg, lever, device, args.warmup, args.steps)
        except Exception as err:  # one lever that fails (out of memory, a backend missing) is reported, not fatal
            traceback.print_exc()
            row = {**asdict(lever), "error": f"{type(err).__name__}: {str(err).splitlines()[0][:160]}"}
        else:
            row["mfu"] = row["tokens_per_s"] * flops_per_token / (peak * 1e12)
        row["wall_s"] = time.perf_counter() - began
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "losses"}), flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if not args.no_lightning:
        row = lightning_loop(cfg, args.batch, device, compile=True, warmup=args.warmup, steps=args.steps)
        row = {"name": "baseline in the suite's Lightning loop", **row, "mfu": row["tokens_per_s"] * flops_per_token / (peak * 1e12)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    meta = {"preset": args.preset, "model": asdict(cfg), "device": device_name, "torch": torch.__version__,
            "matmul_tflops_bf16": peak, "flops_per_token": flops_per_token, "warmup": args.warmup, "steps": args.steps,
            "command": "python -m benchmarks.levers " + " ".join(sys.argv[1:]), "fp8_verdict": fp8_verdict(rows)}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"levers-{args.preset}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    table = markdown(meta, rows)
    (args.out / f"levers-{args.preset}.md").write_text(table)
    print(table, flush=True)


if __name__ == "__main__":
    main()
