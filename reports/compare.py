"""Side-by-side comparison of runs and benchmark files: `compare.md`, `compare.json` and charts.

Inputs are run folders (their `metrics.json`, as `reports.writer` writes it), folders holding run
folders, and pytest-benchmark JSON files. The first run and the first benchmark file are the
baselines that the others are given as ratios against.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from repro.config import ConfigError

from reports import plots
from reports.writer import _table, format_value, jsonable

# Metrics worth a row in the side-by-side table, in this order when present; any other numeric
# metric shared by every run follows.
HEADLINE = ("val/loss", "val/ppl", "unigram_entropy", "params", "perf/tokens_per_s", "perf/mfu", "perf/peak_mem_gib")


@dataclass
class Run:
    """One run folder's record."""

    label: str
    path: Path
    record: dict[str, Any]

    @property
    def metrics(self) -> dict[str, Any]:
        return self.record.get("metrics") or {}


@dataclass
class BenchmarkFile:
    """One pytest-benchmark JSON file: its cases and the machine and commit it ran on."""

    label: str
    path: Path
    cases: list[dict[str, Any]]
    machine: str
    commit: str


@dataclass
class Inputs:
    runs: list[Run] = field(default_factory=list)
    benchmarks: list[BenchmarkFile] = field(default_factory=list)


def _load_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ConfigError(f"{path}: not readable JSON ({err})") from err


def _unique(label: str, taken: set[str]) -> str:
    out, n = label, 2
    while out in taken:
        out, n = f"{label} ({n})", n + 1
    taken.add(out)
    return out


def benchmark_cases(data: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per pytest-benchmark case: name, seconds (mean) and the numbers in its `extra_info`."""
    rows = []
    for bench in data.get("benchmarks", []):
        extra = bench.get("extra_info") or {}
        rows.append({"name": bench.get("name") or bench.get("fullname"), "seconds": bench["stats"]["mean"], **extra})
    return rows


def collect(paths: Sequence[str | Path]) -> Inputs:
    """Sort `paths` into runs and benchmark files; a folder of run folders contributes each of them.

    Raises ConfigError naming the first path that is none of these.
    """
    inputs, labels = Inputs(), set()
    for raw in paths:
        path = Path(raw)
        if path.is_dir() and (path / "metrics.json").is_file():
            found = [path]
        elif path.is_dir():
            found = sorted(p.parent for p in path.glob("*/metrics.json"))
            if not found:
                raise ConfigError(f"{path}: no metrics.json there nor in its subfolders; pass run folders written by run.py")
        elif path.is_file() and path.suffix == ".json":
            data = _load_json(path)
            if isinstance(data, dict) and "benchmarks" in data:
                machine = data.get("machine_info") or {}
                commit = data.get("commit_info") or {}
                cpu = (machine.get("cpu") or {}).get("brand_raw") or machine.get("processor") or "?"
                inputs.benchmarks.append(BenchmarkFile(
                    _unique(path.stem, labels), path, benchmark_cases(data),
                    f"{machine.get('node', '?')}: {cpu}", f"{(commit.get('id') or '?')[:10]}{' (dirty)' if commit.get('dirty') else ''}",
                ))
                continue
            if isinstance(data, dict) and "metrics" in data and "history" in data:
                found = [path.parent]
            else:
                raise ConfigError(f"{path}: neither a run's metrics.json nor a pytest-benchmark JSON file")
        else:
            raise ConfigError(f"{path}: no such run folder or JSON file")
        for folder in found:
            record = _load_json(folder / "metrics.json")
            inputs.runs.append(Run(_unique(f"{record.get('technique', '?')}/{folder.name}", labels), folder, record))
    if not inputs.runs and not inputs.benchmarks:
        raise ConfigError("nothing to compare: pass run folders or benchmark JSON files")
    return inputs


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def _ratio(value: Any, base: Any) -> str:
    a, b = _number(value), _number(base)
    return f"{a / b:.3g}×" if a is not None and b not in (None, 0.0) else ""


def metric_rows(runs: Sequence[Run]) -> list[str]:
    """Metric names for the table: the headline ones any run has, then numeric ones every run has."""
    present = [m for m in HEADLINE if any(_number(r.metrics.get(m)) is not None for r in runs)]
    shared = set.intersection(*(set(k for k, v in r.metrics.items() if _number(v) is not None) for r in runs))
    return present + sorted(shared - set(present))


def eval_rows(runs: Sequence[Run]) -> dict[tuple[str, str], dict[str, tuple[float | None, float | None]]]:
    """(task, metric) -> run label -> (value, stderr), from each run's lm-eval section."""
    table: dict[tuple[str, str], dict[str, tuple[float | None, float | None]]] = {}
    for run in runs:
        for row in (run.record.get("evaluation") or {}).get("rows", []):
            table.setdefault((row["task"], row["metric"]), {})[run.label] = (row.get("value"), row.get("stderr"))
    return table


def build(inputs: Inputs) -> tuple[str, dict[str, Any], dict[str, bytes]]:
    """(Markdown, JSON data, {file name: PNG bytes}) of the comparison."""
    runs, benches = inputs.runs, inputs.benchmarks
    lines = ["# Comparison", ""]
    data: dict[str, Any] = {"runs": [], "benchmarks": []}
    figures: dict[str, bytes] = {}
    if runs:
        lines += ["## Runs", ""]
        rows = []
        for run in runs:
            claims = run.record.get("claims") or []
            verdicts = ", ".join(f"{sum(c['verdict'] == v for c in claims)} {v}" for v in ("reproduced", "not reproduced", "not measured"))
            env = run.record.get("env") or {}
            rows.append((run.label, env.get("device", "?"), env.get("git_commit", "?"), env.get("seed", "?"), verdicts))
            data["runs"].append({"label": run.label, "path": str(run.path), "command": run.record.get("command"),
                                 "metrics": run.metrics, "claims": claims, "evaluation": run.record.get("evaluation"),
                                 "env": env})
        lines += _table(("run", "device", "commit", "seed", "claims"), rows)
        lines += ["", "Commands:", ""] + [f"- `{r.label}`: `{r.record.get('command', '?')}`" for r in runs] + [""]

        names = metric_rows(runs)
        if names:
            header = ["metric", *(r.label for r in runs)] + [f"{r.label} / {runs[0].label}" for r in runs[1:]]
            table = []
            for name in names:
                values = [r.metrics.get(name) for r in runs]
                table.append((name, *values, *(_ratio(v, values[0]) for v in values[1:])))
            lines += ["## Final metrics", "", *_table(header, table, "l" + "r" * (len(header) - 1)), ""]

        evals = eval_rows(runs)
        if evals:
            header = ["task", "metric", *(r.label for r in runs)]
            table = []
            for (task, metric), by_run in sorted(evals.items()):
                cells = []
                for run in runs:
                    value, stderr = by_run.get(run.label, (None, None))
                    cells.append("—" if value is None else format_value(value) + (f" ± {format_value(stderr)}" if _number(stderr) else ""))
                table.append((task, metric, *cells))
            lines += ["## lm-eval scores", "", *_table(header, table, "ll" + "r" * len(runs)), ""]

        claims = {c["claim"] for r in runs for c in r.record.get("claims") or []}
        if claims:
            table = []
            for claim in sorted(claims):
                cells = []
                for run in runs:
                    found = next((c for c in run.record.get("claims") or [] if c["claim"] == claim), None)
                    cells.append("—" if found is None else f"**{found['verdict']}** ({format_value(found.get('measured'))})")
                table.append((claim, *cells))
            lines += ["## Claims", "", *_table(["claim", *(r.label for r in runs)], table), ""]

        figures["loss_curves.png"] = plots.loss_curves({r.label: r.record.get("history") or {} for r in runs})
        lines += ["## Loss curves", "", "![loss curves](loss_curves.png)", ""]

    if benches:
        lines += ["## Benchmarks", ""]
        base = {c["name"]: c for c in benches[0].cases}
        header = ("file", "case", "s (mean)", "tokens/s", f"tokens/s / {benches[0].label}", "peak memory (GiB)", "MFU")
        table = []
        for bench in benches:
            for case in bench.cases:
                ref = base.get(case["name"], {})
                peak = case.get("peak_mem_gib", case.get("peak_memory_gib"))
                table.append((bench.label, case["name"], case["seconds"], case.get("tokens_per_s"),
                              _ratio(case.get("tokens_per_s"), ref.get("tokens_per_s")) if bench is not benches[0] else "",
                              peak, case.get("mfu")))
            data["benchmarks"].append({"label": bench.label, "path": str(bench.path), "machine": bench.machine,
                                       "commit": bench.commit, "cases": bench.cases})
        lines += _table(header, table, "llrrrrr") + [""]
        lines += [f"- `{b.label}`: {b.machine}, commit {b.commit} ({b.path})" for b in benches] + [""]
        series = {b.label: {c["name"]: c.get("tokens_per_s") for c in b.cases if _number(c.get("tokens_per_s"))} for b in benches}
        if any(series.values()):
            figures["throughput.png"] = plots.grouped_bars(series, "tokens/s", "Throughput by benchmark case")
            lines += ["![throughput](throughput.png)", ""]

    if runs and any(_number(r.metrics.get("perf/tokens_per_s")) for r in runs):
        series = {r.label: {"training": r.metrics.get("perf/tokens_per_s")} for r in runs if _number(r.metrics.get("perf/tokens_per_s"))}
        figures["run_throughput.png"] = plots.grouped_bars(series, "tokens/s", "Training throughput by run")
        lines += ["## Training throughput", "", "![training throughput](run_throughput.png)", ""]
    return "\n".join(lines), jsonable(data), figures


def write(inputs: Inputs, out: Path) -> Path:
    """Write compare.md, compare.json and the charts into `out`; return the Markdown's path."""
    markdown, data, figures = build(inputs)
    out.mkdir(parents=True, exist_ok=True)
    for name, png in figures.items():
        (out / name).write_bytes(png)
    (out / "compare.json").write_text(json.dumps(data, indent=2, allow_nan=False) + "\n")
    (out / "compare.md").write_text(markdown + "\n")
    return out / "compare.md"
