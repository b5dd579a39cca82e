"""Verdicts over seeds: a claim is reproduced only when its margin holds at 95% over the seeds."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from scipy import stats

from reports.claims import check_above, check_below
from reports.seeds import aggregate, claim_over_seeds
from reports.writer import jsonable
from repro.run import main


def claim(measured: float, limit: float, direction: str = "<") -> dict:
    check = check_below if direction == "<" else check_above
    return jsonable(check("loss under the bound", "paper", "loss", measured, limit, 1.0, "-", "bound"))


def test_margin_is_the_distance_on_the_claims_side() -> None:
    assert check_below("c", "s", "m", 4.0, 5.0, 0.8, "p", "b").margin == pytest.approx(0.0)
    assert check_below("c", "s", "m", 3.5, 5.0, 0.8, "p", "b").margin == pytest.approx(0.5)
    assert check_above("c", "s", "m", 3.5, 5.0, 0.8, "p", "b").margin == pytest.approx(-0.5)
    assert check_below("c", "s", "m", None, 5.0, 0.8, "p", "b").margin is None


def test_consistent_margins_reproduce_and_the_bound_matches_scipys_t_test() -> None:
    measured = [4.0, 4.1, 3.95, 4.05]
    result = claim_over_seeds([claim(m, 5.0) for m in measured])
    margins = [5.0 - m for m in measured]
    assert result["verdict"] == "reproduced" and result["seeds"] == 4
    reference = stats.ttest_1samp(margins, 0.0, alternative="greater")
    assert result["p_value"] == pytest.approx(reference.pvalue, rel=1e-9)
    interval = reference.confidence_interval(0.95)
    assert result["lower_bound"] == pytest.approx(interval.low, rel=1e-9)


def test_a_lucky_seed_does_not_reproduce() -> None:
    """Two seeds fail the bound, one passes it by a lot: the mean margin is positive, its lower bound is not."""
    result = claim_over_seeds([claim(m, 5.0) for m in (5.1, 5.05, 2.0)])
    assert result["mean_margin"] > 0 and result["lower_bound"] < 0
    assert result["verdict"] == "not reproduced"
    assert "holds in 1 of 3 seeds" in result["detail"]


def test_single_seed_is_labelled_and_keeps_its_verdict() -> None:
    result = claim_over_seeds([claim(4.0, 5.0)])
    assert result["verdict"] == "reproduced" and result["single_seed"] and "single seed" in result["detail"]


def test_not_measured_in_any_seed_is_not_measured() -> None:
    result = claim_over_seeds([claim(4.0, 5.0), jsonable(check_below("loss under the bound", "p", "loss", None, 5.0, 1.0, "-", "bound"))])
    assert result["verdict"] == "not measured"


def test_aggregate_summarises_metrics() -> None:
    records = [{"technique": "t", "env": {"seed": s}, "claims": [claim(m, 5.0)], "metrics": {"val/loss": m, "hash": "x"}}
               for s, m in enumerate((4.0, 4.2))]
    summary = aggregate(records)
    assert summary["seeds"] == [0, 1]
    assert summary["metrics"]["val/loss"]["mean"] == pytest.approx(4.1) and "hash" not in summary["metrics"]


def test_run_with_seeds_writes_per_seed_reports_and_a_verdict_over_them(tiny_overrides, tmp_path, capsys) -> None:
    sets = [arg for item in tiny_overrides for arg in ("--set", item)]
    assert main(["--technique", "pretrain", *sets, "--seeds", "2", "--seed", "5", "--out", str(tmp_path)]) == 0
    report = capsys.readouterr().out.strip().splitlines()[-1].removeprefix("report: ")
    summary = json.loads(Path(report).with_name("seeds.json").read_text())
    assert summary["seeds"] == [5, 6] and len(summary["runs"]) == 2
    loss_claim = summary["claims"][0]
    assert len(loss_claim["measured"]) == 2 and loss_claim["verdict"] in ("reproduced", "not reproduced")
    assert (loss_claim["verdict"] == "reproduced") == (loss_claim["lower_bound"] > 0)
    runs = sorted((tmp_path / "pretrain").glob("tiny-s[0-9]*"))
    assert [json.loads((r / "metrics.json").read_text())["seeds"] for r in runs] == [1, 1]
    assert "single seed" in (runs[0] / "report.md").read_text()
    table = Path(report).read_text()
    assert "| claim | source | metric | measured, mean | paper | test (each seed) |" in table
    assert main(["--technique", "pretrain", "--seeds", "0"]) == 2
