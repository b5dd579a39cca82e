"""The session's calibration case: `benchmarks/calibration.py`'s matmul block, timed in rounds.

The regression gate divides a case's figure by this case's median where the case carries no
calibration of its own (`extra_info["calibration_s"]`), and compares it with the baseline's to say
how much faster or slower this machine is than the one the baseline was made on.
"""

from __future__ import annotations

import torch

from benchmarks.calibration import DESCRIPTION, N, REPS, calibration_block


def test_calibration_cpu(benchmark) -> None:
    seconds = benchmark.pedantic(calibration_block, rounds=15, warmup_rounds=1, iterations=1)
    median = benchmark.stats.stats.median
    benchmark.extra_info.update({
        "calibration_s": median / REPS, "gflops": 2 * N**3 / (median / REPS) / 1e9, "what": DESCRIPTION,
        "torch_threads": torch.get_num_threads(),
    })
    assert seconds > 0
