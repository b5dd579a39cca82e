"""DualPipe's invariants: the schedules' bubbles meet the report's Table 2."""

from __future__ import annotations

from modules.parallel.pipeline.schedules import Timing, build


def test_schedules_meet_table2_at_the_reports_setting() -> None:
    """PP 8, 20 micro-batches, F=1, B=2, W=1: 1F1B idles 7 x 3 = 21, ZB1P 7 x 1 = 7, DualPipe (4-1)(3+2-3) = 6."""
    bubbles = {m: max(build(m, 8, 20, Timing(1.0, 2.0, 1.0)).bubbles()) for m in ("1F1B", "ZB1P", "DualPipe")}
    assert bubbles == {"1F1B": 21, "ZB1P": 7, "DualPipe": 6}
