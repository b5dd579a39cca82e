"""A discrete-event simulator of pipeline-parallel schedules: 1F1B, ZB1P and DualPipe.

Notation is the DeepSeek-V3 report's (Table 2): per model chunk (one pipeline stage, one
micro-batch) F is a forward, B a *full* backward (inputs and weights), W the "backward for weights"
part of it (so the input-only backward takes B - W), and F&B one forward overlapped with another
micro-batch's full backward (default F + B: no overlap). Communication is free.

A schedule is first a *program*: each device's ops in the order it runs them. `simulate` starts
every op as soon as its device is free and its inputs exist (as-soon-as-possible in program
order); `validate` re-checks the timed result from scratch. Ops are

    F    one forward pass                          duration F
    B    backward for inputs only (zero bubble)     duration B - W
    W    backward for weights of an earlier B       duration W
    BW   full backward (B then W at once)           duration B
    F&B  a forward and another micro-batch's BW     duration F&B

Each op carries its `Pass`es (F, B or W of one direction, micro-batch and stage). Dependencies:
F of stage s after F of stage s-1; B of stage s after B of stage s+1 and after the F of stage s;
W after its own B (all of the same micro-batch and direction).

Bubble of a device = makespan - the device's busy time: every moment of the step the device
computes nothing, the report's accounting (the one under which 1F1B's bubble is (PP-1)(F+B)).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Literal

PassKind = Literal["F", "B", "W"]
OpKind = Literal["F", "B", "W", "BW", "F&B"]
METHODS = ("1F1B", "ZB1P", "DualPipe")  # the rows of DeepSeek-V3's Table 2; `build` also knows GPipe


class ScheduleError(ValueError):
    """A schedule that misses an op, runs one twice, overlaps two ops on a device or breaks a dependency."""


@dataclass(frozen=True)
class Timing:
    """Per-chunk times (report notation): F forward, B full backward, W its weight part, FB = F&B."""

    F: float = 1.0
    B: float = 2.0
    W: float = 1.0
    FB: float | None = None  # None: F + B, forward and backward not overlapped

    def __post_init__(self) -> None:
        if min(self.F, self.B, self.W) < 0 or self.W > self.B:
            raise ValueError(f"need F, B, W >= 0 and W <= B (W is part of the full backward B); got {self}")

    @property
    def overlapped(self) -> float:
        """F&B: one forward chunk overlapped with one full backward chunk."""
        return self.F + self.B if self.FB is None else self.FB

    def duration(self, kind: OpKind) -> float:
        return {"F": self.F, "B": self.B - self.W, "W": self.W, "BW": self.B, "F&B": self.overlapped}[kind]


@dataclass(frozen=True)
class Pass:
    """One unit of work: the forward (F), input backward (B) or weight backward (W) of one
    micro-batch at one stage; `direction` 1 is DualPipe's reverse stream (fed from the last device)."""

    kind: PassKind
    micro_batch: int
    stage: int
    direction: int = 0

    def dependencies(self, stages: int) -> list[Pass]:
        """The passes that must have finished before this one starts."""
        if self.kind == "F":
            return [replace(self, stage=self.stage - 1)] if self.stage > 0 else []
        if self.kind == "B":
            after = [replace(self, kind="F")]
            return after + ([replace(self, stage=self.stage + 1)] if self.stage < stages - 1 else [])
        return [replace(self, kind="B")]


@dataclass(frozen=True)
class Op:
    """One op of one device: its kind, the passes it runs (in order) and, once simulated, its times."""

    kind: OpKind
    passes: tuple[Pass, ...]
    start: float = 0.0
    end: float = 0.0

    @property
    def micro_batch(self) -> int:
        return self.passes[0].micro_batch

    @property
    def label(self) -> str:
        """Micro-batch numbers, as in the report's Figure 5 (F&B: forward's / backward's)."""
        if self.kind == "F&B":
            return f"{self.passes[0].micro_batch}/{self.passes[1].micro_batch}"
        return str(self.micro_batch)


@dataclass
class Schedule:
    """A timed schedule: `devices[d]` is device d's ops in time order."""

    method: str
    stages: int
    micro_batches: int  # per direction times directions: the step's total
    timing: Timing
    devices: list[list[Op]]
    directions: int = 1
    placement: dict[tuple[int, int], int] = field(default_factory=dict)  # (direction, stage) -> device

    @property
    def makespan(self) -> float:
        return max(op.end for ops in self.devices for op in ops) - min(op.start for ops in self.devices for op in ops)

    def busy(self, device: int) -> float:
        return sum(op.end - op.start for op in self.devices[device])

    def bubbles(self) -> list[float]:
        """Per device: makespan - busy time, the time it computes nothing during the step."""
        return [self.makespan - self.busy(device) for device in range(len(self.devices))]

    def parameters(self) -> list[int]:
        """Per device: how many stages' parameters it holds (the distinct stages its ops run)."""
        return [len({p.stage for op in ops for p in op.passes}) for ops in self.devices]

    def activations(self) -> list[int]:
        """Per device: peak activations held, in units of one micro-batch's activations of one stage.

        A (direction, micro-batch, stage) holds its activations from the start of its forward to the
        end of its input backward (B frees what W does not need; the report counts W's inputs as
        negligible, as Qi et al. do). Counted at each op's start, the op's own forward included.
        """
        peaks = []
        for ops in self.devices:
            born = {(p.direction, p.micro_batch, p.stage): op.start for op in ops for p in op.passes if p.kind == "F"}
            freed = {(p.direction, p.micro_batch, p.stage): op.end for op in ops for p in op.passes if p.kind == "B"}
            peaks.append(max(sum(born[k] <= op.start < freed[k] for k in born) for op in ops))
        return peaks


def _device_of(method: str, stages: int) -> dict[tuple[int, int], int]:
    """Which device runs (direction, stage): stage s on device s; DualPipe's reverse stream enters at
    the last device, so its stage s runs on device stages-1-s (device i holds stages i and PP-1-i)."""
    placement = {(0, s): s for s in range(stages)}
    if method == "DualPipe":
        placement.update({(1, s): stages - 1 - s for s in range(stages)})
    return placement


def simulate(method: str, programs: list[list[Op]], stages: int, micro_batches: int, timing: Timing,
             directions: int = 1) -> Schedule:
    """Time `programs` (each device's ops in order): each op starts when its device is free and the
    passes it depends on have ended (as soon as possible). Raises ScheduleError on a deadlock."""
    ends: dict[Pass, float] = {}
    devices: list[list[Op]] = [[] for _ in programs]
    cursor = [0] * len(programs)
    while any(cursor[d] < len(programs[d]) for d in range(len(programs))):
        progressed = False
        for d, program in enumerate(programs):
            while cursor[d] < len(program):
                op = program[cursor[d]]
                own = set(op.passes)
                needs = [q for p in op.passes for q in p.dependencies(stages) if q not in own]
                if any(q not in ends for q in needs):
                    break
                start = max([devices[d][-1].end if devices[d] else 0.0] + [ends[q] for q in needs])
                timed = replace(op, start=start, end=start + timing.duration(op.kind))
                devices[d].append(timed)
                ends.update({p: timed.end for p in op.passes})
                cursor[d] += 1
                progressed = True
        if not progressed:
            stuck = {d: programs[d][cursor[d]] for d in range(len(programs)) if cursor[d] < len(programs[d])}
            raise ScheduleError(f"{method}: deadlock, every device waits: {stuck}")
    return Schedule(method, stages, micro_batches, timing, devices, directions, _device_of(method, stages))


def validate(schedule: Schedule) -> None:
    """Check a timed schedule from scratch; raise ScheduleError on the first violation.

    Every (direction, micro-batch, stage) runs F, B and W exactly once, on the device that holds the
    stage; a device runs one op at a time, each for its kind's duration; every pass starts after the
    passes it depends on have ended (a dependency inside the same op runs first within it).
    """
    per_direction = schedule.micro_batches // schedule.directions
    expected = {Pass(kind, m, s, d) for d in range(schedule.directions) for m in range(per_direction)
                for s in range(schedule.stages) for kind in ("F", "B", "W")}
    where: dict[Pass, Op] = {}
    for device, ops in enumerate(schedule.devices):
        for before, after in zip(ops, ops[1:]):
            if after.start < before.end - 1e-9:
                raise ScheduleError(f"device {device}: {after} starts before {before} ends")
        for op in ops:
            if abs(op.end - op.start - schedule.timing.duration(op.kind)) > 1e-9:
                raise ScheduleError(f"device {device}: {op} does not last its kind's duration")
            for p in op.passes:
                if p in where:
                    raise ScheduleError(f"{p} runs twice")
                if schedule.placement.get((p.direction, p.stage)) != device:
                    raise ScheduleError(f"{p} runs on device {device}, which does not hold its stage")
                where[p] = op
    if missing := expected - where.keys():
        raise ScheduleError(f"{len(missing)} passes never run, e.g. {min(missing, key=str)}")
    if extra := where.keys() - expected:
        raise ScheduleError(f"unknown passes {sorted(extra, key=str)[:3]}")
    for p, op in where.items():
        for q in p.dependencies(schedule.stages):
            dep = where[q]
            if dep is op:
                if op.passes.index(q) > op.passes.index(p):
                    raise ScheduleError(f"{p} runs before {q} inside {op}")
            elif dep.end > op.start + 1e-9:
                raise ScheduleError(f"{p} starts at {op.start} before {q} ends at {dep.end}")


def _gpipe(stages: int, micro_batches: int) -> list[list[Op]]:
    """GPipe (Huang et al. 2019): every forward, then every full backward in the same order, as
    torch's ScheduleGPipe runs them; all M micro-batches in flight."""
    return [[Op("F", (Pass("F", m, s),)) for m in range(micro_batches)]
            + [Op("BW", (Pass("B", m, s), Pass("W", m, s))) for m in range(micro_batches)] for s in range(stages)]


def _one_f_one_b(stages: int, micro_batches: int) -> list[list[Op]]:
    """1F1B (Narayanan et al. 2021): stage s runs PP-1-s warm-up forwards, then alternates one forward
    and one full backward, then drains the backwards; at most PP micro-batches in flight."""
    programs = []
    for s in range(stages):
        warmup = min(stages - 1 - s, micro_batches)
        ops = [Op("F", (Pass("F", m, s),)) for m in range(warmup)]
        for m in range(micro_batches):
            if warmup + m < micro_batches:
                ops.append(Op("F", (Pass("F", warmup + m, s),)))
            ops.append(Op("BW", (Pass("B", m, s), Pass("W", m, s))))
        programs.append(ops)
    return programs


def _zb1p(stages: int, micro_batches: int) -> list[list[Op]]:
    """ZB-H1 (Qi et al. 2023, "Zero Bubble Pipeline Parallelism", Fig. 3 top): 1F1B's order and
    in-flight count, but the backward is split into B (inputs) and W (weights); stage s runs its
    first s Ws late, so the backward stream's B's come back up the pipeline faster and the
    deferred Ws fill the cool-down's bubbles."""
    programs = []
    for s in range(stages):
        warmup = min(stages - 1 - s, micro_batches)
        ops = [Op("F", (Pass("F", m, s),)) for m in range(warmup)]
        weights = 0
        for m in range(micro_batches):
            if warmup + m < micro_batches:
                ops.append(Op("F", (Pass("F", warmup + m, s),)))
            ops.append(Op("B", (Pass("B", m, s),)))
            if m >= s:
                ops.append(Op("W", (Pass("W", weights, s),)))
                weights += 1
        ops += [Op("W", (Pass("W", m, s),)) for m in range(weights, micro_batches)]
        programs.append(ops)
    return programs


class _DualPipeDevice:
    """One device's op list under construction, in DeepSeek's DualPipe terms.

    Local phase 0 is the direction in which this device is an early stage (stage h = min(i, PP-1-i)),
    phase 1 the one in which it is a late stage (PP-1-h): phase -> direction flips for the second
    half of the devices, which run the first half's program mirrored.
    """

    def __init__(self, device: int, stages: int) -> None:
        self.second_half = device >= stages // 2
        self.stage = {0: device, 1: stages - 1 - device}  # direction -> stage held
        self.forwards, self.backwards = [0, 0], [0, 0]  # next micro-batch per direction
        self.pending_weights: list[Pass] = []  # Ws of zero-bubble Bs, run first in first out
        self.ops: list[Op] = []

    def _forward_pass(self, phase: int) -> Pass:
        d = phase ^ self.second_half
        self.forwards[d] += 1
        return Pass("F", self.forwards[d] - 1, self.stage[d], d)

    def _backward_pass(self, phase: int) -> Pass:
        d = phase ^ self.second_half
        self.backwards[d] += 1
        return Pass("B", self.backwards[d] - 1, self.stage[d], d)

    def forward(self, phase: int) -> None:
        self.ops.append(Op("F", (self._forward_pass(phase),)))

    def backward(self, phase: int, zero_bubble: bool = False) -> None:
        """A full backward, or (zero bubble) the input part now and its W queued for later."""
        b = self._backward_pass(phase)
        if zero_bubble:
            self.ops.append(Op("B", (b,)))
            self.pending_weights.append(replace(b, kind="W"))
        else:
            self.ops.append(Op("BW", (b, replace(b, kind="W"))))

    def weight(self) -> None:
        self.ops.append(Op("W", (self.pending_weights.pop(0),)))

    def forward_backward(self, forward_phase: int, backward_phase: int) -> None:
        """Forward of one chunk overlapped with the full backward of another (the steady state's unit)."""
        f, b = self._forward_pass(forward_phase), self._backward_pass(backward_phase)
        self.ops.append(Op("F&B", (f, b, replace(b, kind="W"))))


def _dualpipe(stages: int, micro_batches: int) -> list[list[Op]]:
    """DualPipe (DeepSeek-V3 report, Sec. 3.2.1 and Fig. 5): micro_batches/2 micro-batches enter at
    each end of the pipeline; device i holds stages i and PP-1-i. The eight steps of the reference
    implementation (deepseek-ai/DualPipe, `DualPipe.step`), for half-rank h = min(i, PP-1-i) and
    n = PP/2, in local phases (0: early stage, 1: late stage):

    1. 2(n-h-1) x F0            warm-up of the early stage
    2. (h+1) x F0 F1            both directions in flight
    3. (n-h-1) x B1 W F1        zero-bubble backward of the late stage
    4. (M/2-PP+h+1) x F0&B1 F1&B0   the steady state: every op a forward overlapped with a backward
       (the two middle devices run their first F0 and B1 apart, to shorten the bubble)
    5. (n-h-1) x B1 F1&B0
    6. (h+1) x B1 B0            the second half of these zero-bubble (W queued)
    7. (n-h-1) x W B0           zero-bubble Bs, their Ws filling bubbles
    8. (h+1) x W                drain the queued Ws
    """
    n, half = stages // 2, micro_batches // 2
    programs = []
    for i in range(stages):
        dev = _DualPipeDevice(i, stages)
        h = min(i, stages - 1 - i)
        middle = h == n - 1
        for _ in range(2 * (n - h - 1)):
            dev.forward(0)
        for _ in range(h + 1):
            dev.forward(0)
            dev.forward(1)
        for _ in range(n - h - 1):
            dev.backward(1, zero_bubble=True)
            dev.weight()
            dev.forward(1)
        for step in range(half - stages + h + 1):
            if step == 0 and middle:
                dev.forward(0)
                dev.backward(1)
            else:
                dev.forward_backward(0, 1)
            dev.forward_backward(1, 0)
        for _ in range(n - h - 1):
            dev.backward(1)
            dev.forward_backward(1, 0)
        zero_bubble = False
        for step in range(h + 1):
            zero_bubble |= step == (h + 1) // 2 and h % 2 == 1
            dev.backward(1, zero_bubble)
            zero_bubble |= step == (h + 1) // 2 and h % 2 == 0
            dev.backward(0, zero_bubble)
        for _ in range(n - h - 1):
            dev.weight()
            dev.backward(0, zero_bubble=True)
        for _ in range(h + 1):
            dev.weight()
        programs.append(dev.ops)
    return programs


def build(method: str, stages: int, micro_batches: int, timing: Timing | None = None) -> Schedule:
    """Build, simulate and validate one schedule: `method` in METHODS, `stages` = PP devices,
    `micro_batches` per step (DualPipe: split evenly between its two directions; the reference needs
    an even count >= 2 PP and an even PP)."""
    timing = timing or Timing()
    if method == "GPipe":
        programs, directions = _gpipe(stages, micro_batches), 1
    elif method == "1F1B":
        programs, directions = _one_f_one_b(stages, micro_batches), 1
    elif method == "ZB1P":
        programs, directions = _zb1p(stages, micro_batches), 1
    elif method == "DualPipe":
        if stages % 2 or micro_batches % 2 or micro_batches < 2 * stages:
            raise ValueError(f"DualPipe needs an even PP and an even micro-batch count >= 2 PP; got PP={stages}, "
                             f"M={micro_batches}")
        programs, directions = _dualpipe(stages, micro_batches), 2
    else:
        raise ValueError(f"unknown schedule {method!r}: use GPipe or one of {', '.join(METHODS)}")
    schedule = simulate(method, programs, stages, micro_batches, timing, directions)
    validate(schedule)
    return schedule


# DeepSeek-V3 report, Table 2: bubble, parameter and activation memory per device
REPORTED: dict[str, tuple[str, str, str]] = {
    "1F1B": ("(PP-1)(F+B)", "1x", "PP"),
    "ZB1P": ("(PP-1)(F+B-2W)", "1x", "PP"),
    "DualPipe": ("(PP/2-1)(F&B+B-3W)", "2x", "PP+1"),
}


def reported_bubble(method: str, stages: int, timing: Timing) -> float:
    """Table 2's bubble of `method` at PP = stages and these per-chunk times."""
    t = timing
    return {"1F1B": (stages - 1) * (t.F + t.B), "ZB1P": (stages - 1) * (t.F + t.B - 2 * t.W),
            "DualPipe": (stages / 2 - 1) * (t.overlapped + t.B - 3 * t.W)}[method]


def reported_memory(method: str, stages: int) -> tuple[int, int]:
    """Table 2's (parameters in stages' worth, peak activations in one micro-batch-stage's worth)."""
    return {"1F1B": (1, stages), "ZB1P": (1, stages), "DualPipe": (2, stages + 1)}[method]


def formula_holds(method: str, timing: Timing, tolerance: float = 1e-9) -> bool:
    """Whether the schedules built here meet Table 2's bubble at `timing` (found by simulation; the
    report states no conditions). 1F1B: always. ZB1P: W <= F and W <= B - W, so every deferred W
    fits in a cool-down gap (otherwise the bubble is (PP-1)(F+B-W-min(F, B-W, W))). DualPipe:
    B - W = F (input backward as long as a forward, the report's Figure 5 draws them alike) and
    W <= F; the formula is then the bubble of the middle devices, the largest."""
    t = timing
    if method == "ZB1P":
        return t.W <= min(t.F, t.B - t.W) + tolerance
    if method == "DualPipe":
        return abs(t.B - t.W - t.F) <= tolerance and t.W <= t.F + tolerance
    return True
