"""`repro/compare.py`: runs and benchmark files side by side, with ratios against the first."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from reports.claims import check_below
from reports.compare import collect, write
from reports.writer import write_report
from repro.compare import main

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _run(root: Path, name: str, val_loss: float, tokens_per_s: float, cloze: float) -> Path:
    run_dir = root / "pretrain" / name
    claim = check_below(claim="loss under entropy", source="GPT-2", metric="val loss", measured=val_loss,
                        bound=4.5, factor=0.8, paper="3.3", bound_name="unigram entropy")
    write_report(
        run_dir, technique="pretrain", title=name, command=f"python repro/run.py --technique pretrain # {name}",
        config={"train": {"max_steps": 40}}, env={"device": "cpu", "git_commit": "abc", "seed": 0},
        history={"train/loss": [(s, 6 - s / 20) for s in range(1, 41)], "val/loss": [(20, 5.2), (40, val_loss)]},
        metrics={"val/loss": val_loss, "perf/tokens_per_s": tokens_per_s, "params": 1000},
        claims=[claim],
        evaluation={"rows": [{"task": "repro_cloze", "metric": "acc", "value": cloze, "stderr": 0.01}], "batch size": 16},
    )
    return run_dir


def _benchmark_file(path: Path, tokens_per_s: float) -> Path:
    data = {
        "machine_info": {"node": "ci", "cpu": {"brand_raw": "Test CPU"}},
        "commit_info": {"id": "0123456789abcdef", "dirty": False},
        "benchmarks": [{"name": "test_step[tiny-cpu]", "stats": {"mean": 2.0},
                        "extra_info": {"tokens_per_s": tokens_per_s, "peak_mem_gib": 0.5}}],
    }
    path.write_text(json.dumps(data))
    return path


def test_runs_and_benchmarks_are_compared_with_ratios(tmp_path: Path) -> None:
    a = _run(tmp_path, "a", val_loss=4.0, tokens_per_s=1000.0, cloze=0.25)
    b = _run(tmp_path, "b", val_loss=3.0, tokens_per_s=1500.0, cloze=0.40)
    base = _benchmark_file(tmp_path / "base.json", 800.0)
    new = _benchmark_file(tmp_path / "new.json", 1000.0)
    report = write(collect([a, b, base, new]), tmp_path / "out")

    text = report.read_text()
    val_row = next(line for line in text.splitlines() if line.startswith("| val/loss |"))
    assert val_row.split("|")[2:5] == [" 4 ", " 3 ", " 0.75× "]  # b / a
    assert "| repro_cloze | acc | 0.25 ± 0.01 | 0.4 ± 0.01 |" in text
    assert "**reproduced** (3)" in text and "**not reproduced** (4)" in text  # 3 < 0.8 × 4.5 = 3.6 < 4
    bench_row = next(line for line in text.splitlines() if line.startswith("| new |"))
    assert "1.25×" in bench_row  # 1000 / 800
    for name in ("loss_curves.png", "throughput.png", "run_throughput.png"):
        assert (tmp_path / "out" / name).read_bytes().startswith(PNG_MAGIC)
    data = json.loads((tmp_path / "out" / "compare.json").read_text())
    assert [r["label"] for r in data["runs"]] == ["pretrain/a", "pretrain/b"]
    assert math.isclose(data["benchmarks"][1]["cases"][0]["tokens_per_s"], 1000.0)


def test_a_folder_of_runs_expands_to_each_run(tmp_path: Path) -> None:
    _run(tmp_path, "a", 4.0, 1000.0, 0.2)
    _run(tmp_path, "b", 3.5, 1000.0, 0.3)
    inputs = collect([tmp_path / "pretrain"])
    assert [r.label for r in inputs.runs] == ["pretrain/a", "pretrain/b"]


@pytest.mark.parametrize("make, fragment", [
    (lambda p: p / "missing", "no such run folder or JSON file"),
    (lambda p: (p / "x.json").write_text('{"a": 1}') and p / "x.json", "neither a run's metrics.json nor a pytest-benchmark"),
    (lambda p: (p / "bad.json").write_text("{") and p / "bad.json", "not readable JSON"),
    (lambda p: p, "no metrics.json there nor in its subfolders"),
])
def test_bad_inputs_give_one_line_errors(tmp_path: Path, capsys, make, fragment: str) -> None:
    assert main([str(make(tmp_path)), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert fragment in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()
