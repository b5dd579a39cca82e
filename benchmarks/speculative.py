"""Self-speculative decoding with MTP heads against plain decoding: acceptance and tokens/s, batch 1.

`python -m benchmarks.speculative --checkpoint runs/mtp/<run> [--device cuda]` times every arm of
an MTP run that has heads, at each draft depth, on the prompts the run saved
(`decode_prompts.json`), and prints (and with `--out`, writes) a JSON record. The MTP technique
calls `measure` at the end of each run; this entry point re-measures a trained run on another
machine (the H100) without training again.
"""

from __future__ import annotations

import json
import sys
import time
from argparse import ArgumentParser
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from modules.generation import generate
from modules.nn.decoder import Decoder
from modules.nn.mtp import MTPHeads
from modules.speculative import SpeculativeStats, self_speculative_generate

PROMPTS_FILE = "decode_prompts.json"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def measure(decoder: Decoder, heads: MTPHeads, prompts: list[list[int]], new_tokens: int, depth: int,
            temperature: float = 0.0, seed: int = 0, repeats: int = 2) -> dict[str, Any]:
    """Plain and self-speculative decoding of every prompt, one at a time: tokens/s of each (the best
    of `repeats` passes over all prompts, after one warm-up prompt), acceptance per depth, tokens per
    target pass, and (greedy) how many prompts gave exactly the plain tokens."""
    device = decoder.wte.weight.device
    decoder.eval(), heads.eval()
    generate(decoder, prompts[:1], new_tokens, temperature=temperature, seed=seed)
    self_speculative_generate(decoder, heads, prompts[0], new_tokens, depth, temperature=temperature, seed=seed)
    plain_s, spec_s = float("inf"), float("inf")
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        plain = [generate(decoder, [p], new_tokens, temperature=temperature, seed=seed + i)[0] for i, p in enumerate(prompts)]
        _sync(device)
        plain_s = min(plain_s, time.perf_counter() - start)
        stats = SpeculativeStats(depth)
        start = time.perf_counter()
        spec = []
        for i, p in enumerate(prompts):
            tokens, one = self_speculative_generate(decoder, heads, p, new_tokens, depth, temperature=temperature, seed=seed + i)
            spec.append(tokens)
            stats = stats.merge(one)
        _sync(device)
        spec_s = min(spec_s, time.perf_counter() - start)
    n_plain, n_spec = sum(map(len, plain)), sum(map(len, spec))
    record = {
        "depth": depth, "temperature": temperature, "prompts": len(prompts), "new_tokens": new_tokens,
        "acceptance": stats.acceptance(), "tokens_per_round": stats.tokens_per_round(),
        "plain_tokens_per_s": n_plain / plain_s, "speculative_tokens_per_s": n_spec / spec_s,
    }
    record["speedup"] = record["speculative_tokens_per_s"] / record["plain_tokens_per_s"]
    if temperature == 0.0:
        record["identical"] = sum(a == b for a, b in zip(plain, spec))
    return record


def measure_arms(module: Any, prompts: list[list[int]], new_tokens: int, temperatures: tuple[float, ...] = (0.0, 1.0),
                 repeats: int = 2) -> list[dict[str, Any]]:
    """`measure` for every arm with heads of an `MTPModule`, at each draft depth and temperature."""
    records = []
    for arm in module.arms:
        heads = module.mtp_heads(arm.name)
        for depth in range(1, (heads.depth if heads is not None else 0) + 1):
            for temperature in temperatures:
                record = measure(module.arm_model(arm.name), heads, prompts, new_tokens, depth, temperature, repeats=repeats)
                records.append({"arm": arm.name, "kind": arm.kind, **record})
    return records


def measure_run(run_dir: Path, device: str = "cpu", temperatures: tuple[float, ...] = (0.0, 1.0)) -> list[dict[str, Any]]:
    """`measure_arms` for the MTP run in `run_dir`, on the prompts it saved."""
    from repro import registry
    from repro.checkpoints import load_module, locate

    checkpoint, run_dir = locate(run_dir)
    settings = json.loads((run_dir / PROMPTS_FILE).read_text())
    module = load_module(registry.get("mtp").module, checkpoint, device)
    return measure_arms(module, settings["prompts"], settings["new_tokens"], temperatures)


def main(argv: list[str] | None = None) -> int:
    from repro.checkpoints import run_folder_argument
    from repro.config import ConfigError

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
