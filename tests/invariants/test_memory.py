"""The memory calculator's invariants: ZeRO's bytes per parameter are the paper's."""

from __future__ import annotations

import pytest

from measurement.memory import zero_bytes_per_param


def test_zero_bytes_follow_the_paper() -> None:
    """ZeRO (Rajbhandari et al. 2020, Sec. 5.1) with K = 12: 16 bytes per parameter unsharded; stage 1
    4 + 12/N, stage 2 2 + 14/N, stage 3 16/N; on one device every stage keeps all 16."""
    for n in (1, 8, 64):
        assert zero_bytes_per_param("ddp", n) == 16
        assert zero_bytes_per_param("deepspeed_stage_1", n) == pytest.approx(4 + 12 / n)
        assert zero_bytes_per_param("deepspeed_stage_2", n) == pytest.approx(2 + 14 / n)
        assert zero_bytes_per_param("deepspeed_stage_3", n) == pytest.approx(16 / n)
        assert zero_bytes_per_param("fsdp2", n) == zero_bytes_per_param("deepspeed_stage_3", n)
