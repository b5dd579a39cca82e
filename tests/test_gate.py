"""The benchmark regression gate on synthetic pytest-benchmark JSON: no benchmark is run."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location("gate", Path(__file__).resolve().parent.parent / "benchmarks" / "gate.py")
gate = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gate)

STEP = "benchmarks/test_train_step.py::test_train_step[pretrain-tiny-cpu]"
DECODE = "benchmarks/test_decode.py::test_decode[tiny-cpu-b1-cache]"
PREFILL = "benchmarks/test_decode.py::test_prefill[tiny-cpu-b1-cache]"  # no tokens/s and no calibration of its own
CALIBRATION = "benchmarks/test_calibration.py::test_calibration_cpu"


def bench(fullname: str, extra_info: dict, median: float = 1.0) -> dict:
    return {"name": fullname.split("::")[-1], "fullname": fullname, "extra_info": extra_info, "stats": {"median": median}}


def run_json(slowdown: float = 1.0, machine: float = 1.0, threads: int = 1) -> dict:
    """A run whose code is `slowdown` times slower and whose machine is `machine` times slower than the reference."""
    f = slowdown * machine
    return {
        "machine_info": {"node": "ci", "cpu": {"brand_raw": "test CPU", "count": 2}, "torch_threads": threads,
                         "versions": {"torch": "x"}},
        "commit_info": {"id": "0" * 40, "dirty": False},
        "benchmarks": [
            bench(CALIBRATION, {"calibration_s": 4e-4 * machine}),
            bench(STEP, {"tokens_per_s": 5000 / f, "calibration_s": 4e-4 * machine, "calibration": "between steps"}),
            bench(DECODE, {"tokens_per_s": 900 / f, "calibration_s": 4.2e-4 * machine, "calibration": "before and after"}),
            bench(PREFILL, {}, median=0.002 * f),
        ],
    }


def baseline_of(*runs: dict) -> dict:
    return gate.summarise(list(runs))


def verdicts(rows: list[list[str]]) -> dict[str, str]:
    return {row[0]: row[-1] for row in rows}


def test_identical_run_passes_with_ratio_one() -> None:
    passed, rows = gate.compare(baseline_of(run_json()), gate.summarise([run_json()]))
    assert passed
    assert {row[3] for row in rows} == {"1.000"} and set(verdicts(rows).values()) == {"ok"}


def test_normalised_figure_is_time_per_token_over_calibration() -> None:
    cases = gate.normalised(run_json())
    assert cases[STEP]["normalised"] == pytest.approx((1 / 5000) / 4e-4)
    assert cases[PREFILL]["normalised"] == pytest.approx(0.002 / 4e-4)  # median time, session calibration
    assert CALIBRATION not in cases


def test_regression_beyond_tolerance_fails() -> None:
    """A case calibrated between its steps fails beyond TOLERANCE; the others only beyond LOOSE_TOLERANCE."""
    slower = 1 + gate.TOLERANCE + 0.1
    passed, rows = gate.compare(baseline_of(run_json()), gate.summarise([run_json(slowdown=slower)]))
    assert not passed
    assert verdicts(rows) == {"test_train_step[pretrain-tiny-cpu]": "REGRESSED", "test_decode[tiny-cpu-b1-cache]": "ok",
                              "test_prefill[tiny-cpu-b1-cache]": "ok"}
    step = next(row for row in rows if row[0] == "test_train_step[pretrain-tiny-cpu]")
    assert float(step[3]) == pytest.approx(slower, abs=1e-3) and step[4] == f"+{gate.TOLERANCE:.0%}"


def test_regression_beyond_loose_tolerance_fails_every_case() -> None:
    slower = 1 + gate.LOOSE_TOLERANCE + 0.1
    passed, rows = gate.compare(baseline_of(run_json()), gate.summarise([run_json(slowdown=slower)]))
    assert not passed and set(verdicts(rows).values()) == {"REGRESSED"}


def test_slowdown_within_tolerance_passes() -> None:
    passed, _ = gate.compare(baseline_of(run_json()), gate.summarise([run_json(slowdown=1 + gate.TOLERANCE / 2)]))
    assert passed


def test_one_regressed_case_fails_the_gate() -> None:
    run = run_json()
    run["benchmarks"][1]["extra_info"]["tokens_per_s"] /= 2
    passed, rows = gate.compare(baseline_of(run_json()), gate.summarise([run]))
    assert not passed
    assert verdicts(rows)["test_train_step[pretrain-tiny-cpu]"] == "REGRESSED"
    assert verdicts(rows)["test_decode[tiny-cpu-b1-cache]"] == "ok"


def test_uniformly_slower_machine_passes() -> None:
    """Calibration and every case 2.5x slower: the normalised figures do not move."""
    passed, rows = gate.compare(baseline_of(run_json()), gate.summarise([run_json(machine=2.5)]))
    assert passed
    assert {row[3] for row in rows} == {"1.000"}


def test_faster_run_passes_and_says_so() -> None:
    passed, rows = gate.compare(baseline_of(run_json()), gate.summarise([run_json(slowdown=0.5)]))
    assert passed and verdicts(rows)["test_train_step[pretrain-tiny-cpu]"].startswith("faster")


def test_new_case_is_reported_not_failed() -> None:
    run = run_json()
    run["benchmarks"].append(bench("benchmarks/test_train_step.py::test_train_step[dpo-tiny-cpu]", {"tokens_per_s": 10.0}))
    passed, rows = gate.compare(baseline_of(run_json()), gate.summarise([run]))
    assert passed
    assert verdicts(rows)["test_train_step[dpo-tiny-cpu]"] == "new: not in the baseline"


def test_missing_case_fails() -> None:
    run = run_json()
    run["benchmarks"] = [b for b in run["benchmarks"] if b["fullname"] != DECODE]
    passed, rows = gate.compare(baseline_of(run_json()), gate.summarise([run]))
    assert not passed
    assert verdicts(rows)["test_decode[tiny-cpu-b1-cache]"] == "MISSING from this run"


def test_baseline_is_the_median_over_runs() -> None:
    summary = gate.summarise([run_json(slowdown=1.0), run_json(slowdown=1.1), run_json(slowdown=1.5)])
    step = summary["cases"][STEP]
    assert step["normalised"] == pytest.approx(1.1 * (1 / 5000) / 4e-4)
    assert step["runs"] == 3 and step["spread"] == pytest.approx(0.5)
    assert summary["made"]["torch_threads"] == 1 and summary["made"]["commit"] == "0" * 40


def write(path: Path, data: dict) -> Path:
    path.write_text(json.dumps(data))
    return path


def test_command_line_update_then_compare(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    baseline = tmp_path / "baseline" / "cpu.json"
    clean = write(tmp_path / "clean.json", run_json())
    assert gate.main(["--json", str(clean), "--update", "--baseline", str(baseline)]) == 0
    assert json.loads(baseline.read_text())["cases"][STEP]["runs"] == 1

    assert gate.main(["--json", str(clean), "--baseline", str(baseline)]) == 0
    assert "gate: passed" in capsys.readouterr().out

    slow = write(tmp_path / "slow.json", run_json(slowdown=2.0))
    assert gate.main(["--json", str(slow), "--baseline", str(baseline)]) == 1
    out = capsys.readouterr().out
    assert "REGRESSED" in out and "gate: FAILED" in out
    for column in ("case", "baseline", "now", "ratio", "tolerance", "verdict"):
        assert column in out


def test_command_line_refuses_other_thread_count(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    baseline = tmp_path / "cpu.json"
    gate.main(["--json", str(write(tmp_path / "a.json", run_json())), "--update", "--baseline", str(baseline)])
    capsys.readouterr()
    assert gate.main(["--json", str(write(tmp_path / "b.json", run_json(threads=2))), "--baseline", str(baseline)]) == 1
    assert "thread" in capsys.readouterr().out


def test_committed_baseline_is_well_formed() -> None:
    baseline = json.loads(gate.BASELINE.read_text())
    assert baseline["made"]["torch_threads"] == 1 and baseline["made"]["commit"]
    assert any("test_train_step[" in name for name in baseline["cases"])
    for case in baseline["cases"].values():
        assert case["normalised"] > 0 and case["calibration_s"] > 0

