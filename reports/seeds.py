"""Verdicts over seeds: the same run at K seeds, each claim tested on its per-seed margins.

A threshold claim's margin in one run is how far the measured value sits on the claim's side of
its limit (`ClaimResult.margin`): limit - measured for "<", measured - limit for ">". A claim that
compares arms has the difference of the arms as its measured value and 0 as its limit, so the
same margin is the paired difference of the arms within each seed. Over K seeds the verdict is
`reproduced` only when the one-sided (1 - ALPHA) lower confidence bound of the mean margin is
above zero (Student's t on the K paired margins, K - 1 degrees of freedom): one lucky seed
cannot make it. K = 1 gives the single run's verdict, labelled as a single seed.

    python repro/run.py --technique pretrain --seeds 3     # three runs, then runs/<technique>/<preset>-seeds3-<stamp>/
"""

from __future__ import annotations

import json
import math
import statistics
import time
from pathlib import Path
from typing import Any, Sequence

from scipy import stats

from reports import plots
from reports.claims import margin as claim_margin
from reports.writer import _table, format_value, jsonable

ALPHA = 0.05  # one-sided: the claim must hold at 95% confidence


def margin(claim: dict[str, Any]) -> float | None:
    """`ClaimResult.margin` of a claim as metrics.json records it."""
    return claim_margin(claim.get("measured"), claim.get("limit"), claim.get("direction"))


def claim_over_seeds(per_seed: Sequence[dict[str, Any]], alpha: float = ALPHA) -> dict[str, Any]:
    """One claim's records from K runs (same claim, one per seed) -> its verdict over the seeds."""
    first = per_seed[0]
    out: dict[str, Any] = {key: first.get(key) for key in ("claim", "source", "metric", "paper", "threshold", "direction")}
    out["seeds"] = len(per_seed)
    out["measured"] = [c.get("measured") for c in per_seed]
    out["limit"] = [c.get("limit") for c in per_seed]
    out["per_seed_verdicts"] = [c["verdict"] for c in per_seed]
    margins = [margin(c) for c in per_seed]
    out["margins"] = margins
    if any(m is None for m in margins):
        out.update(verdict="not measured", detail=next((c.get("detail") for c in per_seed if margin(c) is None), "") or "")
        return out
    k = len(margins)
    mean = statistics.fmean(margins)
    out["mean_measured"] = statistics.fmean(out["measured"])
    out["mean_margin"] = mean
    if k == 1:
        out.update(verdict=first["verdict"], single_seed=True,
                   detail=f"single seed: margin {mean:.4g}; run with --seeds K to test it over K seeds")
        return out
    sd = statistics.stdev(margins)
    out["sd_margin"] = sd
    if sd == 0:
        lower, p_value = mean, 0.0 if mean > 0 else 1.0
    else:
        se = sd / math.sqrt(k)
        lower = mean - stats.t.ppf(1 - alpha, k - 1) * se
        p_value = float(stats.t.sf(mean / se, k - 1))
    out["lower_bound"] = lower
    out["p_value"] = p_value
    out["confidence"] = 1 - alpha
    holds = lower > 0
    out["verdict"] = "reproduced" if holds else "not reproduced"
    wins = sum(m > 0 for m in margins)
    out["detail"] = (
        f"margin over {k} seeds: mean {mean:.4g}, sd {sd:.3g}; one-sided {1 - alpha:.0%} lower bound {lower:.4g} "
        f"({'above' if holds else 'not above'} 0), t-test p = {p_value:.3g}; holds in {wins} of {k} seeds"
    )
    return out


def aggregate(records: Sequence[dict[str, Any]], alpha: float = ALPHA) -> dict[str, Any]:
    """metrics.json records of K runs (one technique, preset and settings, different seeds) -> the summary."""
    names = [c["claim"] for c in records[0].get("claims", [])]
    claims = [claim_over_seeds([next(c for c in r["claims"] if c["claim"] == name) for r in records], alpha) for name in names]
    metrics: dict[str, dict[str, float]] = {}
    for key in records[0].get("metrics", {}):
        values = [r["metrics"].get(key) for r in records]
        if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            metrics[key] = {"mean": statistics.fmean(values), "sd": statistics.stdev(values) if len(values) > 1 else 0.0,
                            "min": min(values), "max": max(values)}
    return {"technique": records[0].get("technique"), "seeds": [r["env"].get("seed") for r in records],
            "alpha": alpha, "claims": claims, "metrics": metrics}


def write(run_dirs: Sequence[Path], out: Path, command: str) -> Path:
    """Aggregate the runs in `run_dirs` into `out` (seeds.md, seeds.json, loss_curves.png); the path of seeds.md."""
    records = [json.loads((Path(d) / "metrics.json").read_text()) for d in run_dirs]
    summary = aggregate(records)
    summary["runs"] = [str(d) for d in run_dirs]
    summary["command"] = command
    out.mkdir(parents=True, exist_ok=True)
    k = len(records)
    reproduced = sum(c["verdict"] == "reproduced" for c in summary["claims"])
    lines = [f"# {summary['technique']} over {k} seeds", "",
             f"{reproduced} of {len(summary['claims'])} claims reproduced at {1 - summary['alpha']:.0%} one-sided confidence "
             f"(seeds {', '.join(map(str, summary['seeds']))})" + (" · single seed" if k == 1 else ""), "",
             "## Command", "", "```bash", command, "```", "", "## Claims", ""]
    rows = []
    for c in summary["claims"]:
        measured = "—" if c.get("mean_measured") is None else f"{c['mean_measured']:.4g} (per seed: {', '.join(format_value(v) for v in c['measured'])})"
        interval = "—" if c.get("lower_bound") is None else f"{c['mean_margin']:.4g} (lower bound {c['lower_bound']:.4g})"
        rows.append((c["claim"], c["source"], c["metric"], measured, c["paper"], c["threshold"], interval, f"**{c['verdict']}**"))
    header = ("claim", "source", "metric", "measured, mean", "paper", "test (each seed)", "margin, mean (95% lower bound)", "verdict")
    lines += _table(header, rows, "lllrllrl")
    lines += ["", *(f"- *{c['claim']}*: {c['detail']}" for c in summary["claims"] if c.get("detail")), ""]
    lines += ["## Metrics over seeds", ""]
    lines += _table(("metric", "mean", "sd", "min", "max"),
                    [(key, v["mean"], v["sd"], v["min"], v["max"]) for key, v in summary["metrics"].items()], "lrrrr")
    lines += ["", "## Loss curves", "", "![loss curves](loss_curves.png)", "", "## Runs", "",
              *(f"- `{d}`" for d in summary["runs"]), ""]
    curves = {f"seed {r['env'].get('seed')}": r.get("history", {}) for r in records}
    (out / "loss_curves.png").write_bytes(plots.loss_curves(curves, f"{summary['technique']}: {k} seeds"))
    (out / "seeds.json").write_text(json.dumps(jsonable(summary), indent=2) + "\n")
    (out / "seeds.md").write_text("\n".join(lines))
    return out / "seeds.md"


def folder_for(out: Path, technique: str, preset: str, k: int) -> Path:
    return Path(out) / technique / f"{preset}-seeds{k}-{time.strftime('%Y%m%d-%H%M%S')}"
