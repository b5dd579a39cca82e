"""Pictures and tables of simulated schedules: timelines like the DeepSeek-V3 report's Figure 5,
and its Table 2 next to what the simulator measures."""

from __future__ import annotations

import io

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Patch, Rectangle

from modules.parallel.pipeline.schedules import (
    METHODS,
    REPORTED,
    Schedule,
    Timing,
    build,
    formula_holds,
    reported_bubble,
    reported_memory,
)

# forward orange, backward green, weight backward blue (the report's Figure 5 palette)
COLORS = {"F": "#f4a259", "B": "#8cc084", "W": "#6fa8dc", "BW": "#5c9e5c"}


def timeline_png(schedules: list[Schedule], dpi: int = 110) -> bytes:
    """PNG bytes: one panel per schedule, one row per device (device 0 on top), one box per op with
    its micro-batch number. F&B boxes are split, forward half on top; DualPipe's reverse stream
    (direction 1) is hatched. Panels share the time axis, so lengths compare across schedules."""
    devices = max(len(s.devices) for s in schedules)
    span = max(s.makespan for s in schedules)
    fig = Figure(figsize=(max(8.0, span * 0.35), 0.45 * devices * len(schedules) + 1.2))
    FigureCanvasAgg(fig)  # drawn off screen, without pyplot's global state
    axes = fig.subplots(len(schedules), 1, squeeze=False)
    for ax, schedule in zip(axes[:, 0], schedules):
        for device, ops in enumerate(schedule.devices):
            for op in ops:
                width = op.end - op.start
                halves = [("F", op.passes[0]), ("BW", op.passes[1])] if op.kind == "F&B" else [(op.kind, op.passes[0])]
                height = 0.9 / len(halves)
                for i, (kind, p) in enumerate(halves):
                    ax.add_patch(Rectangle((op.start, device - 0.45 + i * height), width, height, facecolor=COLORS[kind],
                                           edgecolor="black", linewidth=0.5, hatch="//" if p.direction else None))
                ax.text(op.start + width / 2, device, op.label, ha="center", va="center", fontsize=6)
        ax.set_xlim(0, span)
        ax.set_ylim(len(schedule.devices) - 0.5, -0.5)
        ax.set_yticks(range(len(schedule.devices)), [f"device {d}" for d in range(len(schedule.devices))], fontsize=7)
        t = schedule.timing
        ax.set_title(f"{schedule.method}: PP={schedule.stages}, {schedule.micro_batches} micro-batches, "
                     f"F={t.F:g} B={t.B:g} W={t.W:g} F&B={t.overlapped:g}; makespan {schedule.makespan:g}, "
                     f"bubble {max(schedule.bubbles()):g}", fontsize=8, loc="left")
    legend = [Patch(facecolor=COLORS[k], edgecolor="black", label=label) for k, label in
              (("F", "F forward"), ("B", "B input backward"), ("W", "W weight backward"), ("BW", "full backward"))]
    legend.append(Patch(facecolor="white", edgecolor="black", hatch="//", label="reverse direction"))
    axes[-1, 0].legend(handles=legend, loc="upper center", bbox_to_anchor=(0.5, -0.25), ncol=5, fontsize=7)
    axes[-1, 0].set_xlabel("time")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    return buffer.getvalue()


def table2(stages: int = 8, micro_batches: int = 20, timing: Timing | None = None) -> list[str]:
    """DeepSeek-V3's Table 2 as Markdown lines: each method's symbolic bubble, its value at `timing`,
    the simulator's (largest per-device bubble of the built schedule), and the parameter and
    activation columns, reported / simulated (largest over devices)."""
    timing = timing or Timing()
    t = timing
    lines = [f"PP={stages}, {micro_batches} micro-batches, F={t.F:g}, B={t.B:g} (full backward), W={t.W:g}, "
             f"F&B={t.overlapped:g}",
             "",
             "| Method | Bubble | at these times | simulated | Parameter (simulated) | Activation (simulated) |",
             "|---|---|---|---|---|---|"]
    for method in METHODS:
        schedule = build(method, stages, micro_batches, timing)
        bubble, params, activations = REPORTED[method]
        want_params, want_activations = reported_memory(method, stages)
        note = "" if formula_holds(method, timing) else " (outside the formula's conditions)"
        lines.append(f"| {method} | {bubble} | {reported_bubble(method, stages, timing):g} | "
                     f"{max(schedule.bubbles()):g}{note} | {params} = {want_params} ({max(schedule.parameters())}) | "
                     f"{activations} = {want_activations} ({max(schedule.activations())}) |")
    return lines
