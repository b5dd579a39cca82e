"""Quantization and speculative decoding of an inference run's target: bytes, loss, tokens/s, acceptance.

`measure` takes an `InferenceModule`'s target, draft model and EAGLE head and, at batch 1, greedy and sampled:

- each quantization scheme of the target (`modules/nn/quant.py`; `torchao-int8` / `torchao-int4` where
  torchao and a GPU are present): weight bytes, held-out loss, decode tokens/s;
- plain decoding of the target and of the draft model (their step times give Leviathan et al.'s c);
- speculative decoding with the draft model and with the EAGLE head at each draft length gamma:
  acceptance rate alpha, tokens per target pass, tokens/s and speedup, next to Leviathan et al.'s
  Eq. 1 and Thm. 3.8 at the measured alpha and c, and, when greedy, whether every output equals
  plain decoding's token for token.

The inference technique measures at the end of each run and saves its inputs (`PROMPTS_FILE`);
`python -m benchmarks.inference` measures a trained run again from them.
"""

from __future__ import annotations

import json
import math
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch

from modules.decoding.draft import (draft_speculative_generate, draft_speculator, eagle_generate, eagle_speculator,
                                    estimate_alpha, expected_speedup, expected_tokens_per_round)
from modules.decoding.engine import Engines
from modules.decoding.generation import generate
from modules.nn.decoder import Decoder
from modules.nn.eagle import EagleHead
from modules.nn.quant import quantize, torchao_quantize, weight_bytes
from modules.decoding.speculative import SpeculativeStats
from reports.plots import figure, png

PROMPTS_FILE = "decode_prompts.json"


@dataclass
class QuantSettings:
    """The `quant.` section: schemes of the target to measure, and their calibration and held-out data."""

    schemes: list[str] = field(default_factory=lambda: ["int8", "int4", "gptq-int4"])
    group_size: int = 128
    calibration: int = 32  # training blocks GPTQ's Hessians are built from
    held_out: int = 64  # validation blocks each scheme's loss is measured on


@dataclass
class DecodeSettings:
    """The `decode.` section: held-out prompts decoded one at a time, and the draft lengths tried."""

    prompts: int = 8
    prompt_tokens: int = 32
    new_tokens: int = 64
    gammas: list[int] = field(default_factory=lambda: [1, 2, 3, 4, 6])
    temperatures: list[float] = field(default_factory=lambda: [0.0, 1.0])  # 0: greedy (exactness checked)
    repeats: int = 2  # timing: the best of this many passes over the prompts


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def best_time(run: Callable[[], Any], repeats: int, device: torch.device) -> tuple[Any, float]:
    """run()'s result and its best wall time over `repeats` calls (after one warm-up call)."""
    out = run()
    best = math.inf
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        out = run()
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return out, best


@torch.no_grad()
def held_out_loss(model: Decoder, blocks: torch.Tensor, batch: int = 8) -> float:
    """Mean next-token cross-entropy (nats) of `blocks` (N, T + 1)."""
    total, count = 0.0, 0
    for start in range(0, len(blocks), batch):
        rows = blocks[start : start + batch]
        total += float(model.loss(rows[:, :-1], rows[:, 1:])) * rows.numel()
        count += rows.numel()
    return total / count


def decode_rate(model: Decoder, prompts: list[list[int]], settings: DecodeSettings, device: torch.device,
                temperature: float = 0.0) -> tuple[list, float]:
    """Outputs of every prompt (one at a time, on the decode engine: each shape captured in the warm-up call;
    greedy, or sampled at `temperature` with seed 1000 + i as speculation draws) and tokens/s over them (best
    of `repeats`)."""
    engines = Engines(model)

    def run() -> list[list[int]]:
        return [generate(model, [p], settings.new_tokens, temperature=temperature, seed=1000 + i if temperature else None,
                         engines=engines)[0] for i, p in enumerate(prompts)]

    outputs, seconds = best_time(run, settings.repeats, device)
    return outputs, sum(map(len, outputs)) / seconds


def quantization(target: Decoder, calibration: torch.Tensor, held_out: torch.Tensor, prompts: list[list[int]],
                 quant: QuantSettings, decode: DecodeSettings, device: torch.device,
                 score: Callable[[Decoder, str], dict[str, float]] | None = None) -> list[dict[str, Any]]:
    """One record per scheme ("none" first): weight bytes, held-out loss, decode tokens/s, and `score`'s results."""
    schemes = ["none", *quant.schemes]
    records = []
    for scheme in schemes:
        start = time.perf_counter()
        if scheme == "none":
            model = target
        elif scheme.startswith("torchao-"):
            model = torchao_quantize(target, scheme.removeprefix("torchao-"), quant.group_size)
        else:
            model = quantize(target, scheme, calibration.to(device) if scheme.startswith("gptq") else None, quant.group_size)
        seconds = time.perf_counter() - start
        _, rate = decode_rate(model, prompts, decode, device)
        record = {"scheme": scheme, "weight_bytes": weight_bytes(model), "quantize_s": seconds,
                  "held_out_loss": held_out_loss(model, held_out.to(device)), "decode_tokens_per_s": rate,
                  **({"scores": score(model, scheme)} if score else {})}
        records.append(record)
        print(json.dumps({k: v for k, v in record.items()}), flush=True)
    return records


def speculation(target: Decoder, draft: Decoder, head: EagleHead, prompts: list[list[int]], decode: DecodeSettings,
                device: torch.device) -> dict[str, Any]:
    """Plain decoding of target and draft, then each drafter at each gamma and temperature. A speedup divides
    by plain decoding at the same temperature (sampling has costs of its own); c is the greedy steps' ratio."""
    reference, target_rate = decode_rate(target, prompts, decode, device)
    plain_rates = {t: target_rate if t == 0.0 else decode_rate(target, prompts, decode, device, t)[1] for t in decode.temperatures}
    _, draft_rate = decode_rate(draft, prompts, decode, device)
    c_draft = target_rate / draft_rate  # one draft step's time over one target step's
    c_eagle = eagle_step_ratio(target, head, prompts[0], decode, device, target_rate)
    plain = {"target_tokens_per_s": target_rate, "draft_tokens_per_s": draft_rate, "c_draft": c_draft, "c_eagle": c_eagle,
             "target_tokens_per_s_by_temperature": {str(t): r for t, r in plain_rates.items()}}
    print(json.dumps(plain), flush=True)
    with_draft, with_eagle = draft_speculator(target, draft), eagle_speculator(target, head)  # captured once each
    drafters = {
        "draft model": (lambda p, g, t, s: draft_speculative_generate(target, draft, p, decode.new_tokens, g, t, seed=s,
                                                                      speculator=with_draft), c_draft),
        "EAGLE": (lambda p, g, t, s: eagle_generate(target, head, p, decode.new_tokens, g, t, seed=s,
                                                    speculator=with_eagle), c_eagle),
    }
    records = []
    for method, (fn, c) in drafters.items():
        for temperature in decode.temperatures:
            for gamma in decode.gammas:
                def run() -> tuple[list[list[int]], SpeculativeStats]:
                    stats, outs = SpeculativeStats(gamma), []
                    for i, prompt in enumerate(prompts):
                        out, s = fn(prompt, gamma, temperature, 1000 + i)
                        outs.append(out)
                        stats = stats.merge(s)
                    return outs, stats

                (outputs, stats), seconds = best_time(run, decode.repeats, device)
                alpha = estimate_alpha(stats)
                rate = stats.tokens / seconds
                record = {"method": method, "gamma": gamma, "temperature": temperature, "alpha": alpha,
                          "acceptance_by_depth": stats.acceptance(), "tokens_per_round": stats.tokens_per_round(),
                          "formula_tokens_per_round": expected_tokens_per_round(alpha, gamma) if not math.isnan(alpha) else None,
                          "tokens_per_s": rate, "plain_tokens_per_s": plain_rates[temperature],
                          "speedup": rate / plain_rates[temperature],
                          "formula_speedup": expected_speedup(alpha, gamma, c) if not math.isnan(alpha) else None, "c": c}
                if temperature == 0.0:
                    record["greedy_mismatches"] = sum(out != ref for out, ref in zip(outputs, reference))
                records.append(record)
                print(json.dumps(record), flush=True)
    return {**plain, "records": records}


@torch.no_grad()
def eagle_step_ratio(target: Decoder, head: EagleHead, prompt: list[int], decode: DecodeSettings, device: torch.device,
                     target_rate: float) -> float:
    """c for the EAGLE head: the time of one drafting step of the head (its block over its cache, the
    program speculative decoding runs, captured on CUDA) over one target decoding step (1 / target tokens/s)."""
    steps = decode.new_tokens
    drafter = eagle_speculator(target, head).get(steps + 1)[1]
    feature = torch.zeros(1, 1, target.config.n_embd, device=device, dtype=target.wte.weight.dtype)
    token = torch.tensor([prompt[:1]], device=device)

    def run() -> None:
        drafter.reset()
        f = feature
        for _ in range(steps - 1):
            f, _ = drafter.chain(f, token)

    _, seconds = best_time(run, decode.repeats, device)
    return (seconds / (steps - 1)) * target_rate


@contextmanager
def full_float32_matmuls() -> Iterator[None]:
    """TF32 off inside (the trainer turns it on for training). Speculative decoding's greedy exactness holds in
    exact arithmetic; a verification pass multiplies gamma + 1 positions at once where plain decoding multiplies
    one, and in TF32 (10-bit mantissa) those shapes round differently enough to flip near-tied argmaxes: on the
    H100 one of 8 greedy outputs diverged in every setting with TF32 on."""
    saved = torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32
    torch.set_float32_matmul_precision("highest")
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(saved[0])
        torch.backends.cudnn.allow_tf32 = saved[1]


def measure(module: Any, prompts: list[list[int]], calibration: torch.Tensor, held_out: torch.Tensor, quant: QuantSettings,
            decode: DecodeSettings, score: Callable[[Decoder, str], dict[str, float]] | None = None) -> dict[str, Any]:
    """Everything above for an `InferenceModule`'s target, draft and EAGLE head, on the module's device, float32
    matmuls in full precision (`full_float32_matmuls`)."""
    device = next(module.parameters()).device
    target, draft, head = module.target.eval(), module.draft.eval(), module.eagle.eval()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    with full_float32_matmuls():
        return {"device": name, "quantization": quantization(target, calibration, held_out, prompts, quant, decode, device, score),
                "speculation": speculation(target, draft, head, prompts, decode, device)}


def plot(result: dict[str, Any]) -> bytes:
    """Tokens per target pass and speedup against gamma, measured (solid) and Leviathan et al.'s at the measured
    alpha and c (dashed), per drafter and temperature."""
    records = result["speculation"]["records"]
    fig = figure(11, 4)
    axes = fig.subplots(1, 2)
    for (method, temperature), color in zip(dict.fromkeys((r["method"], r["temperature"]) for r in records), "bgrmck"):
        rows = [r for r in records if (r["method"], r["temperature"]) == (method, temperature)]
        gammas = [r["gamma"] for r in rows]
        label = f"{method}, T={temperature:g}"
        for ax, measured, formula in ((axes[0], "tokens_per_round", "formula_tokens_per_round"), (axes[1], "speedup", "formula_speedup")):
            ax.plot(gammas, [r[measured] for r in rows], marker="o", color=color, label=label)
            ax.plot(gammas, [r[formula] for r in rows], linestyle="--", color=color)
    axes[0].set(xlabel="draft length gamma", ylabel="tokens per target pass", title="measured (solid) vs Eq. 1 (dashed)")
    axes[1].axhline(1.0, color="grey", linewidth=0.8)
    axes[1].set(xlabel="draft length gamma", ylabel="speedup over plain decoding", title=f"measured vs Thm. 3.8, {result['device']}")
    axes[0].legend(fontsize=8)
    return png(fig)
