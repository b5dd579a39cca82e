"""`--technique dualpipe`: DeepSeek-V3's Table 2 from a schedule simulator, checked against real pipelines.

Trains nothing. The simulator (`modules/parallel/pipeline/schedules.py`) builds and validates 1F1B, ZB1P and
DualPipe at the preset's PP, micro-batches and per-chunk times, and the report sets the bubble and
memory it measures on each schedule beside the report's formulas, with the timelines. Then the
suite's decoder runs as a real `torch.distributed.pipelining` pipeline (gloo, one CPU process per
stage) under GPipe, 1F1B and ZB1P, and each schedule's measured step time and idle fraction stand
beside the simulator's prediction from the stages' measured F, B and W.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass, field
from typing import Any, Mapping

from measurement.dualpipe import real_table
from modules.parallel.pipeline.real import compare, tiny_config
from modules.parallel.pipeline.schedules import METHODS, REPORTED, Timing, build, formula_holds, reported_bubble, reported_memory
from modules.parallel.pipeline.timeline import table2, timeline_png
from reports.claims import ClaimResult, check_below
from repro.registry import Finished, Measured, Step, Technique, register

SOURCE = "DeepSeek-V3 technical report (2024), Sec. 3.2.1, Table 2"
ZB_SOURCE = "Zero Bubble Pipeline Parallelism (Qi et al. 2023)"


@dataclass
class SimulationConfig:
    """The `simulation.` section: Table 2's setting (the report's Figure 5: PP 8, 20 micro-batches)."""

    stages: int = 8
    micro_batches: int = 20
    F: float = 1.0  # forward of one chunk
    B: float = 2.0  # full backward of one chunk (inputs and weights)
    W: float = 1.0  # its weight part
    FB: float = 2.5  # one forward overlapped with one backward (DualPipe's F&B; F + B without overlap)

    def __post_init__(self) -> None:
        if self.stages < 2 or self.stages % 2:
            raise ValueError(f"simulation.stages={self.stages}: DualPipe needs an even PP of at least 2")
        if self.micro_batches < 2 * self.stages or self.micro_batches % 2:
            raise ValueError(f"simulation.micro_batches={self.micro_batches}: DualPipe needs an even count >= 2 PP "
                             f"(= {2 * self.stages})")
        if not (self.F > 0 and self.B > self.W >= 0 and self.FB > 0):
            raise ValueError(f"simulation: need F > 0, B > W >= 0 and FB > 0; got F={self.F}, B={self.B}, W={self.W}, FB={self.FB}")


@dataclass
class RealConfig:
    """The `real.` section: the CPU pipelines (one process and one thread per stage)."""

    enabled: bool = True
    stages: int = 2
    micro_batches: int = 4
    batch_size: int = 16
    seq_len: int = 64
    n_layer: int = 4
    n_embd: int = 128
    steps: int = 7
    warmup: int = 2

    def __post_init__(self) -> None:
        if self.batch_size % self.micro_batches:
            raise ValueError(f"real.batch_size={self.batch_size} must split into real.micro_batches={self.micro_batches}")
        if self.n_layer % self.stages:
            raise ValueError(f"real.n_layer={self.n_layer} must split evenly over real.stages={self.stages}")


@dataclass
class DualPipeConfig:
    simulation: SimulationConfig = field(default_factory=SimulationConfig)
    real: RealConfig = field(default_factory=RealConfig)


def _timings(s: SimulationConfig) -> tuple[Timing, Timing]:
    """(without overlap, with it): the preset's per-chunk times, F&B = F + B in the first."""
    return Timing(s.F, s.B, s.W), Timing(s.F, s.B, s.W, FB=s.FB)


def _simulate(finished: Finished) -> Measured:
    """The three schedules built and validated at the preset's times: each one's largest bubble beside Table 2's formula,
    its makespan and memory, Table 2 with and without overlap, and the timelines (timelines.png)."""
    s = finished.config.simulation
    plain, overlapped = _timings(s)
    schedules = {method: build(method, s.stages, s.micro_batches, overlapped) for method in METHODS}
    (finished.run_dir / "timelines.png").write_bytes(timeline_png(list(schedules.values())))
    metrics: dict[str, Any] = {}
    for method, schedule in schedules.items():
        metrics |= {f"{method}/bubble": max(schedule.bubbles()), f"{method}/bubble_formula": reported_bubble(method, s.stages, overlapped),
                    f"{method}/makespan": schedule.makespan, f"{method}/parameters": max(schedule.parameters()),
                    f"{method}/activations": max(schedule.activations())}
    lines = ["Table 2 at these per-chunk times, without overlap (F&B = F + B) and with it:", ""]
    for timing in (plain, overlapped):
        lines += table2(s.stages, s.micro_batches, timing) + [""]
    notes = ["Bubble: a device's idle time between the step's start and end (makespan minus its busy time); the "
             "table shows the largest over devices. B is the full backward and W its weight part, as the report "
             "defines them; the simulator validates every schedule (dependencies, one op per device at a time)."]
    return Measured(metrics, notes, {"Table 2": [*lines, "![timelines](timelines.png)"]})


def _real(finished: Finished) -> Measured:
    """The suite's decoder as real CPU pipelines under GPipe, 1F1B and ZB1P: each one's measured step time and mean
    idle fraction beside the simulator's prediction (records in real_vs_simulated.json)."""
    r = finished.config.real
    if not r.enabled:
        return Measured()
    decoder = tiny_config(r.n_layer, r.n_embd)
    print(f"real pipelines: {r.stages} processes, GPipe / 1F1B / ZB1P, {r.steps} timed steps each", flush=True)
    records = compare(r.stages, r.micro_batches, decoder, r.batch_size, r.seq_len, steps=r.steps, warmup=r.warmup)
    (finished.run_dir / "real_vs_simulated.json").write_text(json.dumps(records, indent=2))
    metrics: dict[str, Any] = {}
    for rec in records:
        name = rec["schedule"]
        metrics |= {f"real/{name}/step_ms": rec["measured_step_ms"], f"real/{name}/step_ms_simulated": rec["simulated_step_ms"],
                    f"real/{name}/idle": statistics.fmean(rec["measured_idle"]),
                    f"real/{name}/idle_simulated": statistics.fmean(rec["simulated_idle"])}
    section = [f"The suite's decoder ({decoder.n_layer} layers x {decoder.n_embd}) split into {r.stages} stages, batch "
               f"{r.batch_size} x {r.seq_len} in {r.micro_batches} micro-batches, gloo, one process and one thread per stage; "
               f"median of {r.steps} steps after {r.warmup}. Simulated: the simulator fed each stage's F, B and W measured "
               "in isolation (mean over stages); it counts no communication.", "", *real_table(records)]
    return Measured(metrics, sections={"Real pipelines against the simulator": section})


def _table2_claim(method: str, s: SimulationConfig, metrics: Mapping[str, Any]) -> ClaimResult:
    """Table 2's row for `method`: reproduced when the simulated bubble equals the formula's at these times and the
    simulated memory equals the row's."""
    overlapped = _timings(s)[1]
    formula, memory = reported_bubble(method, s.stages, overlapped), reported_memory(method, s.stages)
    bubble, params, activations = (metrics.get(f"{method}/{key}") for key in ("bubble", "parameters", "activations"))
    if bubble is None:
        verdict, detail = "not measured", "the schedule was not simulated"
    else:
        verdict = "reproduced" if abs(bubble - formula) <= 1e-9 and (params, activations) == memory else "not reproduced"
        detail = (f"simulated bubble {bubble:g}, parameters {params}x, activations {activations}"
                  + ("" if formula_holds(method, overlapped) else " (these times are outside the conditions under which the formula holds)"))
    return ClaimResult(
        claim=f"{method}: bubble {REPORTED[method][0]}, parameters {REPORTED[method][1]}, activations {REPORTED[method][2]}",
        source=SOURCE, metric=f"largest per-device bubble (and memory) of the simulated schedule, PP={s.stages}, "
        f"{s.micro_batches} micro-batches", measured=bubble, paper=f"{formula:g} at these times; memory {memory}",
        threshold="simulated = formula", verdict=verdict, detail=detail)


def claims(config: DualPipeConfig, metrics: Mapping[str, Any]) -> list[ClaimResult]:
    """Table 2's three rows from the simulation, and (with `real.enabled`) ZB1P against 1F1B on the real pipelines."""
    results = [_table2_claim(method, config.simulation, metrics) for method in METHODS]
    if config.real.enabled:
        results.append(check_below(
            claim="Splitting the backward and deferring the weight part idles a real pipeline less than 1F1B",
            source=ZB_SOURCE, metric=f"mean idle fraction of the {config.real.stages} stages, ZB1P (torch.distributed.pipelining)",
            measured=metrics.get("real/ZB1P/idle"), bound=metrics.get("real/1F1B/idle"), factor=1.0,
            paper="ZB-H1: bubble (PP-1)(F+B-2W), a third of 1F1B's at F=B_in=W", bound_name="1F1B's idle fraction"))
    return results


register(
    Technique(
        name="dualpipe",
        summary="pipeline schedules: 1F1B, ZB1P and DualPipe bubbles (DeepSeek-V3 Table 2) simulated, and real CPU pipelines",
        config=DualPipeConfig,
        steps=(Step("simulation", _simulate), Step("real pipelines", _real)),
        claims=claims,
    )
)
