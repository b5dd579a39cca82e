"""Pipeline schedules: the simulator against DeepSeek-V3's Table 2, its validator against broken
schedules, and torch's real pipelines of the suite's Decoder against the unsplit decoder."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from modules.nn import Decoder
from modules.parallel.pipeline.real import run_pipeline, stage_timing, summarize, tiny_config
from modules.parallel.pipeline.schedules import (
    METHODS,
    ScheduleError,
    Timing,
    build,
    formula_holds,
    reported_bubble,
    reported_memory,
    simulate,
    validate,
)
from modules.parallel.pipeline.timeline import table2, timeline_png

# per-chunk times inside every formula's conditions (B - W = F, W <= F), with and without overlap (F&B < F + B)
TIMINGS = [Timing(1, 2, 1), Timing(1, 1.5, 0.5), Timing(2, 3, 1, FB=4), Timing(1, 2, 1, FB=2.5), Timing(2, 4, 2, FB=5),
           Timing(2, 2.5, 0.5, FB=3.5)]
# inside 1F1B's and ZB1P's conditions only (B - W != F)
SINGLE_DIRECTION = [Timing(1, 3, 1), Timing(2, 2, 1), Timing(3, 5, 2), Timing(1, 4, 0)]


@pytest.mark.parametrize("method", METHODS)
def test_bubbles_and_memory_equal_table2(method: str) -> None:
    timings = TIMINGS + (SINGLE_DIRECTION if method != "DualPipe" else [])
    for stages in (4, 8):
        for micro_batches in (2 * stages, 3 * stages, 4 * stages):
            for timing in timings:
                assert formula_holds(method, timing)
                schedule = build(method, stages, micro_batches, timing)
                bubbles = schedule.bubbles()
                assert max(bubbles) == pytest.approx(reported_bubble(method, stages, timing)), (stages, micro_batches, timing)
                if method != "DualPipe" or timing.FB is None:  # with overlap, DualPipe's outer devices idle less
                    assert bubbles == pytest.approx([bubbles[0]] * stages)
                params, activations = reported_memory(method, stages)
                assert max(schedule.parameters()) == min(schedule.parameters()) == params
                assert max(schedule.activations()) == activations
                busy = micro_batches * (timing.F + timing.B)  # every device's work, F&B counted as one op
                if method != "DualPipe":
                    assert schedule.makespan == pytest.approx(busy + bubbles[0])


def test_outside_the_conditions_the_formulas_differ() -> None:
    # ZB1P with W > F: a deferred W no longer fits a cool-down gap of one F
    t = Timing(1, 3, 2)
    assert not formula_holds("ZB1P", t)
    assert max(build("ZB1P", 4, 8, t).bubbles()) == pytest.approx(3 * (1 + 3 - 2 - 1)) != reported_bubble("ZB1P", 4, t)
    # DualPipe with an input backward twice a forward: the reference schedule beats the formula
    t = Timing(1, 3, 1)
    assert not formula_holds("DualPipe", t)
    assert max(build("DualPipe", 4, 8, t).bubbles()) == pytest.approx(3)
    assert reported_bubble("DualPipe", 4, t) == pytest.approx(4)


def test_validator_rejects_broken_schedules() -> None:
    good = build("1F1B", 4, 8, Timing(1, 2, 1))
    validate(good)

    def edited(device: int, change) -> object:
        devices = [list(ops) for ops in good.devices]
        devices[device] = change(devices[device])
        return dataclasses.replace(good, devices=devices)

    # swap the slots of device 1's first two forwards: micro-batch 1 would start before stage 0 produced it
    swap = edited(1, lambda ops: [dataclasses.replace(ops[1], start=ops[0].start, end=ops[0].end),
                                  dataclasses.replace(ops[0], start=ops[1].start, end=ops[1].end)] + ops[2:])
    with pytest.raises(ScheduleError, match="before"):
        validate(swap)
    with pytest.raises(ScheduleError, match="never run"):
        validate(edited(2, lambda ops: ops[:-1]))
    with pytest.raises(ScheduleError, match="twice"):
        validate(edited(3, lambda ops: ops + [dataclasses.replace(ops[-1], start=ops[-1].end + 1, end=ops[-1].end + 3)]))
    # drop a dependency: the last device runs everything one unit early, its first forward before its input exists
    early = edited(3, lambda ops: [dataclasses.replace(op, start=op.start - 1, end=op.end - 1) for op in ops])
    with pytest.raises(ScheduleError, match="F', micro_batch=0, stage=3.*before"):
        validate(early)
    # a device that runs another device's stage
    with pytest.raises(ScheduleError, match="does not hold"):
        validate(dataclasses.replace(good, devices=[good.devices[1], good.devices[0]] + good.devices[2:]))


def test_simulator_reports_a_deadlock() -> None:
    programs = [list(ops) for ops in build("1F1B", 2, 2).devices]
    programs[1] = programs[1][::-1]  # the last stage's backwards before its forwards
    with pytest.raises(ScheduleError, match="deadlock"):
        simulate("1F1B", programs, 2, 2, Timing())


def test_dualpipe_needs_even_pp_and_enough_micro_batches() -> None:
    with pytest.raises(ValueError):
        build("DualPipe", 3, 12)
    with pytest.raises(ValueError):
        build("DualPipe", 4, 6)


def test_table2_and_timeline() -> None:
    lines = table2(8, 20, Timing(1, 2, 1))
    text = "\n".join(lines)
    for formula in ("(PP-1)(F+B)", "(PP-1)(F+B-2W)", "(PP/2-1)(F&B+B-3W)"):
        assert formula in text
    assert "| DualPipe | (PP/2-1)(F&B+B-3W) | 6 | 6 | 2x = 2 (2) | PP+1 = 9 (9) |" in lines
    png = timeline_png([build(m, 4, 8) for m in METHODS])
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def pipelined() -> dict:
    return run_pipeline(tiny_config(n_layer=4, n_embd=64), stages=2, micro_batches=4, batch_size=8, seq_len=16, steps=1,
                        warmup=0)


@pytest.mark.parametrize("schedule", ["GPipe", "1F1B", "ZB1P"])
def test_pipelined_decoder_matches_the_unsplit_one(pipelined: dict, schedule: str) -> None:
    torch.manual_seed(0)
    decoder = Decoder(tiny_config(n_layer=4, n_embd=64))
    loss = decoder.loss(pipelined["idx"], pipelined["targets"])
    loss.backward()
    ranks = [r[schedule] for r in pipelined["ranks"]]
    assert ranks[-1]["loss"] == pytest.approx(loss.item(), rel=1e-5)
    grads = {name: g for r in ranks for name, g in r["grads"].items()}
    assert grads.keys() == {name for name, _ in decoder.named_parameters()}
    for name, p in decoder.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_compare_records_are_sane(pipelined: dict) -> None:
    config = tiny_config(n_layer=4, n_embd=64)
    records = summarize(pipelined, stage_timing(config, stages=2, micro_batch=2, seq_len=16, repeats=3))
    assert [r["schedule"] for r in records] == ["GPipe", "1F1B", "ZB1P"]
    for r in records:
        assert r["measured_step_ms"] > 0 and r["simulated_step_ms"] > 0 and r["F_ms"] > 0 and r["B_ms"] >= r["W_ms"] >= 0
        assert len(r["measured_idle"]) == len(r["simulated_idle"]) == 2
        assert all(0 <= x <= 1 for x in r["measured_idle"] + r["simulated_idle"])
    # same F, B, W: 1F1B is predicted as long as GPipe, the zero-bubble schedule no longer than either
    gpipe, one_f_one_b, zero_bubble = (r["simulated_step_ms"] for r in records)
    assert one_f_one_b == pytest.approx(gpipe) and zero_bubble <= one_f_one_b + 1e-9


def test_the_technique_writes_table2_and_its_verdicts_without_training(tmp_path) -> None:
    """`--technique dualpipe` measures instead of training: a report whose three Table 2 verdicts come from the
    simulated schedules, a timeline picture, and no checkpoint."""
    import json

    from repro.run import main

    assert main(["--technique", "dualpipe", "--set", "real.enabled=false", "--out", str(tmp_path)]) == 0
    (run,) = (tmp_path / "dualpipe").iterdir()
    record = json.loads((run / "metrics.json").read_text())
    assert [c["verdict"] for c in record["claims"]] == ["reproduced"] * 3
    assert record["metrics"]["DualPipe/bubble"] == record["metrics"]["DualPipe/bubble_formula"] == 4.5
    assert (run / "timelines.png").stat().st_size > 0 and not (run / "checkpoints").exists()


@pytest.mark.parametrize("override, fragment", [
    ("simulation.stages=3", "even PP"),
    ("simulation.micro_batches=10", ">= 2 PP"),
    ("real.batch_size=10", "must split into real.micro_batches"),
])
def test_bad_settings_stop_before_any_run_folder(capsys, tmp_path, override: str, fragment: str) -> None:
    from repro.run import main

    assert main(["--technique", "dualpipe", "--set", override, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert fragment in err and not any(tmp_path.iterdir()), err
