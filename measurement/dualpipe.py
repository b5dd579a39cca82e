"""Real pipelines beside the schedule simulator: one row per schedule of measured and simulated step time and idle.

The records are `modules.parallel.pipeline.real.compare`'s; the dualpipe technique and `python -m benchmarks.dualpipe`
both table them.
"""

from __future__ import annotations


def real_table(records: list[dict]) -> list[str]:
    """Markdown lines: one row per schedule, measured beside simulated."""
    lines = ["| Schedule | PP | M | F / B / W ms | step ms measured | step ms simulated | idle measured | idle simulated |",
             "|---|---|---|---|---|---|---|---|"]
    for r in records:
        lines.append(f"| {r['schedule']} | {r['pp']} | {r['micro_batches']} | {r['F_ms']:.2f} / {r['B_ms']:.2f} / "
                     f"{r['W_ms']:.2f} | {r['measured_step_ms']:.1f} | {r['simulated_step_ms']:.1f} | "
                     f"{r['measured_idle']} | {r['simulated_idle']} |")
    return lines
