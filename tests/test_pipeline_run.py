"""The pipeline technique: stages run once and are reused, the report links them, the served model answers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from repro import golden, registry
from repro.run import main


def shrunk(name: str, corpus: Path, cache: Path) -> list[str]:
    """The technique's golden overrides (a few steps of a 2-layer model), its prerequisites' prefixes removed."""
    technique = registry.get(name)
    prefixes = tuple(f"{r}." for r in technique.requires)
    return [o.format(corpus=corpus, cache=cache) for o in technique.golden_overrides if not o.startswith(prefixes)]


def test_the_pipeline_runs_each_stage_once_links_its_reports_and_serves(tmp_path: Path) -> None:
    corpus, cache = golden.write_corpus(tmp_path / "corpus"), tmp_path / "cache"
    stages = ["pretrain", "sft", "inference"]
    overrides = {name: shrunk(name, corpus, cache) for name in stages}
    args = ["--technique", "pipeline", "--accelerator", "cpu", "--out", str(tmp_path / "runs"),
            "--set", f"pipeline.stages={json.dumps(stages)}", "--set", f"pipeline.overrides={json.dumps(overrides)}",
            "--set", "pipeline.serve.stage=sft", "--set", "pipeline.serve.max_tokens=4"]
    assert main(args) == 0
    first = sorted((tmp_path / "runs" / "pipeline").iterdir())[-1]
    metrics = json.loads((first / "metrics.json").read_text())["metrics"]
    assert [metrics[f"{s}/reused"] for s in stages] == [0.0, 0.0, 0.0]
    assert metrics["serve/status"] == 200 and metrics["serve/malformed_status"] == 400
    served = json.loads((first / "serving.json").read_text())
    assert served["status_after_malformed"] == 200 and served["usage"]["completion_tokens"] <= 4
    report = (first / "report.md").read_text()
    for stage in stages:
        assert f"| {stage} |" in report
    # one pretrain run in all: SFT and inference started from the pipeline's own pretrain stage
    assert len(list((tmp_path / "runs" / "pretrain").iterdir())) == 1
    assert main(args) == 0  # again: everything reused
    second = sorted((tmp_path / "runs" / "pipeline").iterdir())[-1]
    assert second != first
    metrics = json.loads((second / "metrics.json").read_text())["metrics"]
    assert [metrics[f"{s}/reused"] for s in stages] == [1.0, 1.0, 1.0]


@pytest.mark.parametrize("override, fragment", [
    ("pipeline.stages=[pretrain, sftt]", "'sftt' is not a technique"),
    ("pipeline.serve.stage=tokenizers", "serve the model of a training stage"),
    ("pipeline.stages=[]", "pipeline.stages is empty"),
])
def test_bad_pipelines_stop_before_any_run_folder(capsys, tmp_path: Path, override: str, fragment: str) -> None:
    assert main(["--technique", "pipeline", "--set", override, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert fragment in err, err
    assert not any(tmp_path.iterdir())
