"""pytest-benchmark cases for every registered technique's training step: `pytest benchmarks/ -k cpu`.

One case per technique and device: on CPU its default (tiny) preset, on CUDA each of its presets
(skipped without CUDA). A technique registered later gets its cases with no edit here. Each case
is one `time_train_step` call (`benchmarks/train_step.py`): warm-up steps, then timed optimizer
steps in the run's own Trainer. tokens/s and ms/step at the median step, peak memory, the
calibration between steps (CPU) and MFU (CUDA) go in `extra_info`; the pedantic time is the whole
call, data preparation and warm-up included: read `extra_info`, not it. The regression gate
(`benchmarks/gate.py`) compares the CPU cases with `benchmarks/baseline/cpu.json`.
"""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
import torch

from benchmarks.train_step import time_train_step
from measurement.hardware import matmul_tflops
from repro.registry import techniques

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
STEPS = {"cpu": dict(warmup=3, steps=16), "cuda": dict(warmup=10, steps=30)}  # CUDA: compile and autotune first


def cases() -> list:
    params = []
    for name, technique in sorted(techniques().items()):
        if not technique.trains:
            continue
        params.append(pytest.param(name, technique.default_preset, "cpu", id=f"{name}-{technique.default_preset}-cpu"))
        params += [pytest.param(name, preset, "cuda", id=f"{name}-{preset}-cuda", marks=CUDA) for preset in technique.presets]
    return params


@functools.cache
def peak_tflops(device: str) -> float | None:
    """The bf16 matmul rate MFU is taken against, measured once per session (CUDA only)."""
    return matmul_tflops(torch.device(device)) if device == "cuda" else None


@pytest.mark.parametrize("technique, preset, device", cases())
def test_train_step(benchmark, technique: str, preset: str, device: str, sample_corpus: Path, shared_dir: Path, tmp_path: Path) -> None:
    settings = STEPS[device]
    result = benchmark.pedantic(
        time_train_step, args=(technique, preset, torch.device(device), tmp_path),
        kwargs=dict(corpus=sample_corpus, shared=shared_dir, peak_tflops=peak_tflops(device), **settings),
        rounds=1, iterations=1,
    )
    benchmark.extra_info.update(result)
    assert result["steps"] == settings["steps"]
    assert result["tokens_per_step"] > 0 and result["tokens_per_s"] > 0
    assert result["peak_mem_gib"] > 0
