"""pytest-benchmark cases for the pretrain step: `pytest benchmarks/ --benchmark-json=out.json`.

Each case trains a few timed steps; tokens/s, ms/step, peak memory and (on GPU) MFU go in
`extra_info`. GPU cases skip without CUDA.
"""

from __future__ import annotations

import pytest
import torch

from benchmarks.throughput import lightning_loop, plain_loop, preset_model
from measurement.hardware import matmul_tflops
from modules.nn import Decoder

CASES = [
    pytest.param("tiny", "cpu", 16, False, id="tiny-cpu-b16"),
    pytest.param("gpt2-124m", "cuda", 16, True, id="gpt2-124m-cuda-b16-compiled",
                 marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")),
]


@pytest.mark.parametrize("loop", [plain_loop, lightning_loop], ids=["plain", "lightning"])
@pytest.mark.parametrize("preset, device, batch, compile", CASES)
def test_pretrain_step(benchmark, loop, preset: str, device: str, batch: int, compile: bool) -> None:
    cfg = preset_model(preset)
    dev = torch.device(device)
    steps = 30 if device == "cuda" else 10
    result = benchmark.pedantic(loop, args=(cfg, batch, dev, compile), kwargs={"steps": steps}, rounds=1, iterations=1)
    if dev.type == "cuda":
        result["mfu"] = result["tokens_per_s"] * Decoder(cfg).flops_per_token() / (matmul_tflops(dev) * 1e12)
    benchmark.extra_info.update(result)
    assert result["tokens_per_s"] > 0
