"""Self-speculative decoding with MTP heads against plain decoding: acceptance and tokens/s, batch 1.

`measure` times plain and self-speculative decoding of every prompt, one at a time, at one draft depth;
`measure_arms` does so for every arm with heads of an `MTPModule`. The MTP technique measures at the end of
each run and saves its prompts (`PROMPTS_FILE`); `python -m benchmarks.speculative` measures a trained run
again from them.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from modules.decoding.engine import Engines
from modules.decoding.generation import generate
from modules.decoding.speculative import SpeculativeStats, mtp_speculator, self_speculative_generate
from modules.nn.decoder import Decoder
from modules.nn.mtp import MTPHeads

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
    # both on the decode engine, each shape captured in the warm-up
    engines, speculator = Engines(decoder), mtp_speculator(decoder, heads, depth)
    generate(decoder, prompts[:1], new_tokens, temperature=temperature, seed=seed, engines=engines)
    self_speculative_generate(decoder, heads, prompts[0], new_tokens, depth, temperature=temperature, seed=seed,
                              speculator=speculator)
    plain_s, spec_s = float("inf"), float("inf")
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        plain = [generate(decoder, [p], new_tokens, temperature=temperature, seed=seed + i, engines=engines)[0]
                 for i, p in enumerate(prompts)]
        _sync(device)
        plain_s = min(plain_s, time.perf_counter() - start)
        stats = SpeculativeStats(depth)
        start = time.perf_counter()
        spec = []
        for i, p in enumerate(prompts):
            tokens, one = self_speculative_generate(decoder, heads, p, new_tokens, depth, temperature=temperature,
                                                    seed=seed + i, speculator=speculator)
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
