"""Golden trajectories: every registered technique has one, a re-run matches it, and drift is named.

Regenerate after an intended change with `python -m repro.golden --update` (it prints what moved).
"""

from __future__ import annotations

import copy
import json

import pytest

from repro import golden
from repro.registry import techniques


def test_every_registered_technique_has_a_golden_trajectory() -> None:
    missing = [name for name, t in sorted(techniques().items()) if t.trains and not golden.path_for(name).is_file()]
    assert not missing, f"no golden trajectory for {', '.join(missing)}: run `python -m repro.golden --update --technique NAME`"


@pytest.mark.parametrize("name", sorted(name for name, t in techniques().items() if t.trains))
def test_rerun_matches_the_golden_trajectory(name: str, tmp_path) -> None:
    path = golden.path_for(name)
    if not path.is_file():
        pytest.fail(f"{name}: no golden trajectory at {path}")
    stored = json.loads(path.read_text())
    now = golden.record(name, tmp_path)
    drifts = golden.compare(stored, now)
    assert not drifts, "golden trajectory moved (regenerate with `python -m repro.golden --update` if intended):\n" + "\n".join(
        map(str, drifts)
    ) + f"\nversions then {stored['versions']}, now {now['versions']}"


def test_the_loss_fused_with_the_head_keeps_pretraining_on_its_golden_trajectory(tmp_path) -> None:
    """model.loss_chunk is a speed setting: in chunks that do not divide the batch's tokens, the same curve."""
    stored = json.loads(golden.path_for("pretrain").read_text())
    drifts = golden.compare(stored, golden.record("pretrain", tmp_path, extra=["model.loss_chunk=100"]))
    assert not drifts, "\n".join(map(str, drifts))


def trajectory() -> dict:
    return {"technique": "dpo", "tolerance": {"rtol": 1e-5, "atol": 1e-6}, "versions": {},
            "metrics": {"train/loss": [[1, 0.6931], [2, 0.65], [3, 0.61]], "train/reward_margin": [[1, 0.0], [2, 0.1], [3, 0.2]]}}


def test_drift_names_technique_first_step_metric_and_both_values() -> None:
    moved = copy.deepcopy(trajectory())
    moved["metrics"]["train/loss"][1][1] *= 1.01
    moved["metrics"]["train/loss"][2][1] *= 1.01
    drifts = golden.compare(trajectory(), moved)
    assert len(drifts) == 1
    text = str(drifts[0])
    assert (drifts[0].technique, drifts[0].metric, drifts[0].step) == ("dpo", "train/loss", 2)
    assert "dpo" in text and "train/loss" in text and "step 2" in text and "0.65" in text and "0.6565" in text


def test_changes_within_tolerance_pass_and_missing_steps_or_metrics_fail() -> None:
    assert golden.compare(trajectory(), trajectory()) == []
    close = copy.deepcopy(trajectory())
    close["metrics"]["train/loss"][0][1] *= 1 + 1e-7
    assert golden.compare(trajectory(), close) == []
    short = copy.deepcopy(trajectory())
    short["metrics"]["train/loss"].pop()
    assert [(d.metric, d.step, d.now) for d in golden.compare(trajectory(), short)] == [("train/loss", 3, None)]
    fewer = copy.deepcopy(trajectory())
    del fewer["metrics"]["train/reward_margin"]
    assert [(d.metric, d.step) for d in golden.compare(trajectory(), fewer)] == [("train/reward_margin", None)]


def test_corpus_is_the_same_text_every_time(tmp_path) -> None:
    a, b = golden.write_corpus(tmp_path / "a"), golden.write_corpus(tmp_path / "b")
    files = sorted(p.name for p in a.iterdir())
    assert files == sorted(p.name for p in b.iterdir()) and len(files) == 60
    assert all((a / f).read_text() == (b / f).read_text() for f in files)
    assert (a / "doc000.txt").read_text().startswith("The ")
