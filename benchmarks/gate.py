"""The CPU benchmark regression gate: this run's figures against `benchmarks/baseline/cpu.json`.

    python benchmarks/gate.py                  # run the CPU benchmarks, compare, exit 1 on a regression
    python benchmarks/gate.py --json run.json  # compare a saved pytest-benchmark JSON
    python benchmarks/gate.py --update         # three fresh runs -> a new baseline (commit the file)

The run is `pytest benchmarks/ -k cpu --benchmark-json=...` with one torch thread
(OMP_NUM_THREADS=1): on a shared 2-core machine two OpenMP threads wait at every parallel region
for whichever of them the scheduler set aside, which made the tiny step 3-6x slower and moved it
by up to 2x between runs, against a few per cent with one thread.

Each case's figure is its time per token, 1 / `extra_info["tokens_per_s"]` (pytest-benchmark's
median time where a case reports no tokens/s), divided by the calibration time of the same run
(`benchmarks/calibration.py`): the case's own `extra_info["calibration_s"]`, taken between its
steps or just before and after it, else the session's `test_calibration_cpu` case. The quotient,
calibration matmuls per token, does not move when the whole machine is uniformly slower or busier.
A case fails when its quotient exceeds the baseline's by more than TOLERANCE. The tolerance is
set from measured run-to-run spread of these quotients on a shared 2-core machine (README,
"Benchmarks and the regression gate"): it is meant to catch a step that got a third slower, not a few per cent.

The gate runs the baseline's cases (and the calibration case) only: a case added since the baseline
was made is timed by `pytest benchmarks/` and enters the gate at the next `--update`, which runs every
`-k cpu` case. Cases in a run but not the baseline (`--json`) are reported and pass. Baseline cases missing
from the run fail: a case that silently vanished (renamed, dropped from the parametrisation, a skip gone wrong)
would otherwise pass with nothing measured, and an intended removal is one `--update` away,
visible in review as a change to the baseline file. pytest-benchmark's own `--benchmark-compare-fail`
cannot do this: it gates on raw times, and cannot read `extra_info`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BASELINE = ROOT / "benchmarks" / "baseline" / "cpu.json"
RESULTS = ROOT / ".benchmarks" / "gate"
TOLERANCE = 0.25  # cases calibrated between their own steps (clean-run spread seen: 4-16%)
LOOSE_TOLERANCE = 1.0  # cases calibrated only before and after (or by the session case): fail at 2x
CALIBRATION_CASE = "test_calibration_cpu"
CALIBRATION_NODE = f"benchmarks/test_calibration.py::{CALIBRATION_CASE}"
UPDATE_RUNS = 3
BENCH_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def run_benchmarks(out: Path, cases: list[str] | None = None) -> int:
    """`pytest benchmarks/ -k cpu` (or just `cases`, pytest node ids) with one torch thread, its JSON written to
    `out`; pytest's exit code (4 when a named case no longer exists)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    selection = [*cases, CALIBRATION_NODE] if cases is not None else ["benchmarks/", "-k", "cpu"]
    command = [sys.executable, "-m", "pytest", *selection, "-q", "-p", "no:cacheprovider", f"--benchmark-json={out}"]
    print("gate: " + " ".join(f"{k}={v}" for k, v in BENCH_ENV.items()) + " " + " ".join(command[1:]), flush=True)
    return subprocess.call(command, cwd=ROOT, env={**os.environ, **BENCH_ENV})


def session_calibration(run: dict[str, Any]) -> float | None:
    return next((b["extra_info"]["calibration_s"] for b in run["benchmarks"] if b["name"] == CALIBRATION_CASE), None)


def normalised(run: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Per case (pytest-benchmark `fullname`): seconds per token, the calibration it is divided by, and the quotient."""
    session = session_calibration(run)
    cases = {}
    for bench in run["benchmarks"]:
        if bench["name"] == CALIBRATION_CASE:
            continue
        info = bench["extra_info"]
        seconds = 1 / info["tokens_per_s"] if info.get("tokens_per_s") else bench["stats"]["median"]
        calibration = info.get("calibration_s") or session
        if calibration is None:
            raise ValueError(f"{bench['fullname']}: no calibration_s and no {CALIBRATION_CASE} case in the run")
        cases[bench["fullname"]] = {"seconds_per_token": seconds, "calibration_s": calibration,
                                    "calibration": info.get("calibration", "session") if info.get("calibration_s") else "session",
                                    "normalised": seconds / calibration}
    return cases


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Baseline content from one or more runs: per case the median over runs, and the spread between them."""
    per_run = [normalised(run) for run in runs]
    names = sorted({name for cases in per_run for name in cases})
    cases = {}
    for name in names:
        seen = [cases[name] for cases in per_run if name in cases]
        values = [c["normalised"] for c in seen]
        cases[name] = {
            "normalised": statistics.median(values),
            "tokens_per_s": statistics.median(1 / c["seconds_per_token"] for c in seen),
            "calibration_s": statistics.median(c["calibration_s"] for c in seen),
            "calibration": seen[-1]["calibration"],
            "runs": len(values),
            "spread": max(values) / min(values) - 1,
        }
    info, commit = runs[-1]["machine_info"], runs[-1].get("commit_info", {})
    calibrations = [c for c in map(session_calibration, runs) if c is not None]
    return {
        "about": "CPU benchmark baseline for benchmarks/gate.py; figures are calibration matmuls per token "
                 "(lower is faster). Rewrite with `python benchmarks/gate.py --update` and commit.",
        "made": {
            "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "runs": len(runs),
            "commit": commit.get("id"), "dirty": commit.get("dirty"), "branch": commit.get("branch"),
            "machine": {"node": info.get("node"), "cpu": info.get("cpu", {}).get("brand_raw"),
                        "cores": info.get("cpu", {}).get("count"), "system": f"{info.get('system')} {info.get('release')}",
                        "python": info.get("python_version")},
            "versions": info.get("versions"),
            "torch_threads": info.get("torch_threads"),
            "calibration": info.get("calibration"),
            "calibration_s": statistics.median(calibrations) if calibrations else None,
        },
        "cases": cases,
    }


def tolerance_for(case: dict[str, Any], tight: float = TOLERANCE, loose: float = LOOSE_TOLERANCE) -> float:
    """TOLERANCE where the calibration was interleaved with the case's own steps, LOOSE_TOLERANCE otherwise."""
    return tight if case.get("calibration") == "between steps" else loose


def compare(baseline: dict[str, Any], now: dict[str, Any], tight: float = TOLERANCE, loose: float = LOOSE_TOLERANCE) -> tuple[bool, list[list[str]]]:
    """(passed, table rows): each case's normalised figure now against the baseline's."""
    rows, passed = [], True
    for name in sorted(set(baseline["cases"]) | set(now["cases"])):
        base, case = baseline["cases"].get(name), now["cases"].get(name)
        label = name.split("::")[-1]
        if base is None:
            rows.append([label, "-", f"{case['normalised']:.4g}", "-", "-", "new: not in the baseline"])
            continue
        if case is None:
            rows.append([label, f"{base['normalised']:.4g}", "-", "-", "-", "MISSING from this run"])
            passed = False
            continue
        ratio = case["normalised"] / base["normalised"]
        tolerance = tolerance_for(case, tight, loose)
        if ratio > 1 + tolerance:
            verdict, passed = "REGRESSED", False
        elif ratio < 1 / (1 + tolerance):
            verdict = "faster: update the baseline?"
        else:
            verdict = "ok"
        rows.append([label, f"{base['normalised']:.4g}", f"{case['normalised']:.4g}", f"{ratio:.3f}",
                     f"+{tolerance:.0%}", verdict])
    return passed, rows


def table(rows: list[list[str]]) -> str:
    header = ["case", "baseline", "now", "ratio", "tolerance", "verdict"]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    line = lambda r: "  ".join(cell.ljust(w) if i in (0, 5) else cell.rjust(w) for i, (cell, w) in enumerate(zip(r, widths)))
    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])


def fresh_runs(count: int, cases: list[str] | None = None) -> tuple[list[Path], bool]:
    """Run the benchmarks (`cases`, else every CPU case) `count` times; (JSON paths, whether every pytest run passed)."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    paths, ok = [], True
    for i in range(count):
        path = RESULTS / f"cpu-{stamp}-{i}.json"
        ok = run_benchmarks(path, cases) == 0 and ok
        if path.is_file():
            paths.append(path)
    return paths, ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, nargs="+", help="pytest-benchmark JSON files to use instead of fresh runs")
    parser.add_argument("--update", action="store_true", help="write the baseline from the runs instead of comparing")
    parser.add_argument("--runs", type=int, help=f"fresh runs (default 1; {UPDATE_RUNS} with --update); medians are taken over them")
    parser.add_argument("--baseline", type=Path, default=BASELINE)
    parser.add_argument("--tolerance", type=float, default=TOLERANCE,
                        help="allowed relative rise of a normalised figure calibrated between its steps")
    parser.add_argument("--loose-tolerance", type=float, default=LOOSE_TOLERANCE,
                        help="the same for cases calibrated only before and after")
    args = parser.parse_args(argv)

    ok = True
    paths = args.json
    if paths is None:
        cases = None  # --update (or no baseline yet): every CPU case
        if not args.update and args.baseline.is_file():
            cases = [c for c in json.loads(args.baseline.read_text())["cases"] if not c.endswith(f"::{CALIBRATION_CASE}")]
        paths, ok = fresh_runs(args.runs or (UPDATE_RUNS if args.update else 1), cases)
        if not ok:
            print("gate: a benchmark failed (pytest above); comparing what was measured", flush=True)
    if not paths:
        print("gate: no benchmark JSON to read")
        return 1
    runs = [json.loads(Path(p).read_text()) for p in paths]
    now = summarise(runs)

    if args.update:
        args.baseline.parent.mkdir(parents=True, exist_ok=True)
        args.baseline.write_text(json.dumps(now, indent=2) + "\n")
        print(f"gate: wrote {args.baseline.relative_to(ROOT) if args.baseline.is_relative_to(ROOT) else args.baseline} "
              f"from {len(runs)} run(s) ({', '.join(str(p) for p in paths)})")
        for name, case in now["cases"].items():
            print(f"  {name.split('::')[-1]}: {case['normalised']:.4g} (spread over runs {case['spread']:.1%})")
        return 0 if ok else 1

    if not args.baseline.is_file():
        print(f"gate: no baseline at {args.baseline}; make one with `python benchmarks/gate.py --update`")
        return 1
    baseline = json.loads(args.baseline.read_text())
    threads_then, threads_now = baseline["made"].get("torch_threads"), now["made"].get("torch_threads")
    if threads_then != threads_now:
        print(f"gate: the baseline was measured with {threads_then} torch thread(s), this run with {threads_now}; "
              f"normalised figures compare only at equal counts (run through this script, which sets OMP_NUM_THREADS=1)")
        return 1
    passed, rows = compare(baseline, now, args.tolerance, args.loose_tolerance)
    made = baseline["made"]
    print("\ngate: figures are calibration matmuls per token (lower is faster); a case fails above baseline x (1 + tolerance)")
    print(f"baseline: commit {str(made.get('commit'))[:12]}{' (dirty)' if made.get('dirty') else ''}, {made.get('date')}, "
          f"{made['machine'].get('cpu')} x{made['machine'].get('cores')}, {made.get('runs')} run(s)")
    print(f"this run: commit {str(now['made'].get('commit'))[:12]}{' (dirty)' if now['made'].get('dirty') else ''}, "
          f"{now['made']['machine'].get('cpu')} x{now['made']['machine'].get('cores')}, {now['made']['machine'].get('node')}")
    if made.get("calibration_s") and now["made"].get("calibration_s"):
        speed = now["made"]["calibration_s"] / made["calibration_s"]
        print(f"calibration: {1e3 * made['calibration_s']:.3f} ms/matmul then, {1e3 * now['made']['calibration_s']:.3f} now "
              f"(this machine {speed:.2f}x the baseline's time)")
    print(table(rows))
    print(f"gate: {'passed' if passed and ok else 'FAILED'}")
    return 0 if passed and ok else 1


if __name__ == "__main__":
    sys.exit(main())
