"""pytest-benchmark cases for prefill and decode: `pytest benchmarks/test_decode.py --benchmark-json=out.json`.

Each case is one call of `benchmarks/decode.py`'s `prefill_speed` or `decode_speed` (its own
warm-ups and medians inside, so one round); tokens/s, ms per step, peak memory and, on CUDA, the
memory-bandwidth bound and the share of it reached go in `extra_info`. The pedantic time is the
whole call, warm-up and compile included: read `extra_info`, not it. CUDA cases skip without CUDA.
"""

from __future__ import annotations

import functools

import pytest
import torch

from benchmarks.decode import bandwidth_bound, build_model, copy_bandwidth, decode_speed, prefill_speed
from measurement.hardware import peak_memory_bytes
from modules.nn import Decoder

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
SETUPS = [  # preset, device, batch
    pytest.param("tiny", "cpu", 1, id="tiny-cpu-b1"),
    pytest.param("tiny", "cpu", 16, id="tiny-cpu-b16"),
    pytest.param("gpt2-124m", "cuda", 1, id="gpt2-124m-cuda-b1", marks=CUDA),
    pytest.param("gpt2-124m", "cuda", 16, id="gpt2-124m-cuda-b16", marks=CUDA),
]
# a few seconds a case on a CPU; on CUDA long enough for the per-step time to settle
LENGTHS = {
    "cpu": dict(prefill=96, prompt=32, new_tokens=16, repeats=1),
    "cuda": dict(prefill=512, prompt=32, new_tokens=128, repeats=3),
}
DECODE_MODES = {"cpu": ["no cache", "cache", "engine"], "cuda": ["no cache", "cache", "engine+compile"]}


@functools.cache
def model_on(preset: str, device: str) -> Decoder:
    """The preset's random-weight decoder, bf16 on CUDA and fp32 on the CPU, built once per session."""
    return build_model(preset, torch.device(device), torch.bfloat16 if device == "cuda" else torch.float32)


@functools.cache
def bandwidth_on(device: str) -> float:
    return copy_bandwidth(torch.device(device))


def reset_peak_memory(device: str) -> None:
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()


def peak_memory(device: str) -> dict:
    """CUDA: most memory allocated during the case. CPU: the process's peak resident set so far,
    which only grows over a session (tracemalloc would not see torch's allocations)."""
    key = "peak_cuda_allocated_mib" if device == "cuda" else "peak_process_rss_mib"
    return {key: peak_memory_bytes(torch.device(device)) / 2**20}


@pytest.mark.parametrize("cached", [False, True], ids=["no-cache", "cache"])
@pytest.mark.parametrize("preset, device, batch", SETUPS)
def test_prefill(benchmark, preset: str, device: str, batch: int, cached: bool) -> None:
    model, lengths = model_on(preset, device), LENGTHS[device]
    prompt = min(lengths["prefill"], model.config.block_size)
    cache_len = min(prompt + lengths["new_tokens"], model.config.block_size)
    reset_peak_memory(device)
    result = benchmark.pedantic(
        prefill_speed, args=(model, batch, prompt, cached), kwargs={"cache_len": cache_len}, rounds=1, iterations=1
    )
    benchmark.extra_info.update({"preset": preset, "device": device, **result, **peak_memory(device)})
    assert result["tokens_per_s"] > 0


def decode_cases() -> list:
    cases = []
    for setup in SETUPS:
        preset, device, batch = setup.values
        for mode in DECODE_MODES[device]:
            cases.append(pytest.param(preset, device, batch, mode, id=f"{setup.id}-{mode.replace(' ', '-')}", marks=setup.marks))
    return cases


@pytest.mark.parametrize("preset, device, batch, mode", decode_cases())
def test_decode(benchmark, preset: str, device: str, batch: int, mode: str) -> None:
    model, lengths = model_on(preset, device), LENGTHS[device]
    prompt, new_tokens = lengths["prompt"], lengths["new_tokens"]
    reset_peak_memory(device)
    result = benchmark.pedantic(
        decode_speed, args=(model, batch, prompt, new_tokens, mode), kwargs={"repeats": lengths["repeats"]},
        rounds=1, iterations=1,
    )
    info = {k: v for k, v in result.items() if k not in ("tokens", "seq_len", "step_ms")}
    info.update(preset=preset, device=device, **peak_memory(device))
    if device == "cuda":
        mean_context = prompt + (new_tokens + 1) / 2  # the context a step attends over, averaged over the steps
        info["bound_tokens_per_s"] = bandwidth_bound(model, batch, mean_context, bandwidth_on(device))
        info["share_of_bound"] = result["tokens_per_s"] / info["bound_tokens_per_s"]
    benchmark.extra_info.update(info)
    assert result["tokens_per_s"] > 0 and len(result["tokens"][0]) == new_tokens
