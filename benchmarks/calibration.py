"""The calibration workload: a fixed fp32 matmul whose time says how fast this CPU is right now.

The regression gate (`benchmarks/gate.py`) divides every CPU figure by a calibration time taken in
the same run, beside the case or interleaved with its steps: a slower or busier machine stretches
both alike, and only a change in the code moves their ratio. One block is REPS products of two
fixed N x N fp32 matrices (about 50 ms on one core of a 2.4 GHz EPYC), long enough to span
several scheduler time slices, so a block sees the same share of a shared CPU as the steps
around it; a single product (0.4 ms) would fit between preemptions and see none of it.
"""

from __future__ import annotations

import statistics
import time

import torch

N = 256
REPS = 128
DESCRIPTION = f"seconds per {N}x{N}x{N} fp32 matmul, mean over a block of {REPS}"

_operands: tuple[torch.Tensor, torch.Tensor] | None = None


def _matrices() -> tuple[torch.Tensor, torch.Tensor]:
    global _operands
    if _operands is None:
        g = torch.Generator().manual_seed(0)
        _operands = torch.randn(N, N, generator=g), torch.randn(N, N, generator=g)
    return _operands


def calibration_block() -> float:
    """Seconds per matmul over one block of REPS products (CPU, the current torch thread count)."""
    a, b = _matrices()
    start = time.perf_counter()
    for _ in range(REPS):
        torch.mm(a, b)
    return (time.perf_counter() - start) / REPS


def calibrate(blocks: int = 5) -> float:
    """Median of `blocks` calibration blocks, after one block of warm-up."""
    calibration_block()
    return statistics.median(calibration_block() for _ in range(blocks))
