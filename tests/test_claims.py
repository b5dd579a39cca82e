"""Claims are pure functions of a run's config and metrics (`Technique.claims`): checked here on dicts, without training.

Each committed report under reports/ holds its config and its metrics; the verdicts a technique's claims compute from
them now must be the verdicts the report records, claim by claim.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from repro.config import build_config, load_preset
from repro.registry import techniques

REPORTS = Path(__file__).resolve().parent.parent / "reports"
DECLARED = {name: t for name, t in sorted(techniques().items()) if t.claims is not None}


def committed(name: str) -> list[Path]:
    """The committed report folders of a technique's runs."""
    return sorted(p.parent for p in REPORTS.rglob("metrics.json") if json.loads(p.read_text())["technique"] == name)


def recorded_metrics(record: dict) -> dict:
    """A report's metrics as its run's claims read them: lm-eval's scores as `eval/<task>/<metric>` beside the rest
    (reports written before the scores were kept among the metrics hold them only in their evaluation section)."""
    scores = {f"eval/{r['task']}/{r['metric']}": r["value"] for r in (record.get("evaluation") or {}).get("rows", [])}
    return {**scores, **record["metrics"]}


@pytest.mark.parametrize("name", list(DECLARED))
def test_claims_of_a_run_that_measured_nothing_are_not_measured(name: str) -> None:
    technique = DECLARED[name]
    config = build_config(technique.config, load_preset(name, technique.default_preset))
    results = technique.claims(config, {})  # empty for a chain of other techniques (pipeline): each stage's report holds its own
    assert {r.verdict for r in results} <= {"not measured"}, [(r.claim, r.verdict) for r in results]


@pytest.mark.parametrize("folder", [p for name in DECLARED for p in committed(name)], ids=lambda p: str(p.relative_to(REPORTS)))
def test_claims_recomputed_from_a_committed_report_keep_its_verdicts(folder: Path) -> None:
    record = json.loads((folder / "metrics.json").read_text())
    technique = DECLARED[record["technique"]]
    config = build_config(technique.config, record["config"])  # the resolved config the run wrote beside its metrics
    now = [(c.claim, c.verdict) for c in technique.claims(config, recorded_metrics(record))]
    assert now == [(c["claim"], c["verdict"]) for c in record["claims"]]
