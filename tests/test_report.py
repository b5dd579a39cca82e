"""The run report: claim verdicts from numbers, the files a run folder holds, atomic writes."""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from reports import plots
from reports.claims import ClaimResult, check_above, check_below, not_measured
from reports.env import PACKAGES, collect_env
from reports.writer import format_value, jsonable, write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
FILES = ("metrics.json", "config.yaml", "env.json", "loss_curve.png", "report.md")
COMMAND = "python -m repro.run pretrain --preset tiny --seed 7 --set 'train.max_steps=120'"


def _below(measured: float | None, bound: float | None = 10.0, factor: float = 0.8) -> ClaimResult:
    return check_below(
        claim="loss falls under the entropy", source="GPT-2", metric="val loss", measured=measured,
        bound=bound, factor=factor, paper="3.3", bound_name="unigram entropy",
    )


def _claims() -> list[ClaimResult]:
    return [
        _below(3.21),
        _below(9.5),
        check_above(claim="accuracy above chance", source="Stiennon et al. 2020", metric="pairwise accuracy",
                    measured=np.float32(0.75), bound=0.5, factor=1.2, paper="~72%", bound_name="chance"),
        not_measured(claim="scaling", source="Kaplan et al. 2020", metric="loss across presets",
                     paper="power law", why="a single run"),
    ]


def _history(n: int = 120) -> dict[str, list[tuple[int, float]]]:
    train = [(s, 8 * math.exp(-s / 40) + 3 + 0.1 * math.sin(s)) for s in range(1, n + 1)]
    val = [(s, 8 * math.exp(-s / 40) + 3.2) for s in range(0, n + 1, 20)]
    val[2] = (val[2][0], float("nan"))
    return {"train/loss": train, "val/loss": val, "perf/tokens_per_s": [(60, 12345.0)]}


def _write(run_dir: Path, **overrides) -> Path:
    kwargs = dict(
        technique="pretrain",
        title="pretrain: tiny GPT (seed 7)",
        command=COMMAND,
        config={"model": {"n_layer": 2, "d_model": 64}, "train": {"lr": 3e-4, "out": Path("runs")}},
        env={"python": "3.11", "seed": 7, "git_commit": "abc123", "corpus_hash": "deadbeef"},
        history=_history(),
        metrics={"val/loss": 3.2109876, "params": 1234567, "nan_metric": float("nan"),
                 "np_int": np.int64(42), "torch_loss": torch.tensor(2.5), "corpus": "tiny-shakespeare"},
        claims=_claims(),
        notes=["a note | with a pipe"],
    )
    return write_report(run_dir, **{**kwargs, **overrides})


# --- claims -----------------------------------------------------------------------------------

def test_check_below_verdicts_and_boundary() -> None:
    assert _below(7.99).verdict == "reproduced"
    assert _below(8.0).verdict == "not reproduced"  # equal is not below: 0.8 x 10 = 8
    assert _below(8.01).verdict == "not reproduced"
    assert _below(None).verdict == "not measured"
    assert _below(float("nan")).verdict == "not measured"
    assert _below(3.0, bound=None).verdict == "not measured"
    assert _below(3.0, bound=float("nan")).verdict == "not measured"


def test_check_below_records_numbers() -> None:
    result = _below(torch.tensor(4.0))
    assert result.measured == 4.0 and isinstance(result.measured, float)
    assert "8" in result.threshold and "unigram entropy" in result.threshold
    assert _below(float("nan")).measured is None


def test_check_above_boundary() -> None:
    kw = dict(claim="c", source="s", metric="m", bound=0.5, factor=1.0, paper="p", bound_name="chance")
    assert check_above(measured=0.51, **kw).verdict == "reproduced"
    assert check_above(measured=0.5, **kw).verdict == "not reproduced"
    assert check_above(measured=None, **kw).verdict == "not measured"


def test_not_measured_and_validation() -> None:
    result = not_measured("c", "s", "m", "p", why="needs a GPU")
    assert result.verdict == "not measured" and result.measured is None and result.detail == "needs a GPU"
    with pytest.raises(ValueError):
        ClaimResult("c", "s", "m", 1.0, "p", "t", "sort of")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        ClaimResult("c", "s", "m", None, "p", "t", "reproduced")


# --- writer -----------------------------------------------------------------------------------

def test_write_report_writes_every_file(tmp_path: Path) -> None:
    run_dir = tmp_path / "runs" / "pretrain" / "run-1"
    report = _write(run_dir)
    assert report == run_dir / "report.md"
    assert sorted(p.name for p in run_dir.iterdir()) == sorted(FILES)  # no temporary files left


def test_metrics_json_round_trips(tmp_path: Path) -> None:
    _write(tmp_path)
    record = json.loads((tmp_path / "metrics.json").read_text())
    claims = _claims()
    assert [c["verdict"] for c in record["claims"]] == [c.verdict for c in claims]
    assert [c["verdict"] for c in record["claims"]] == ["reproduced", "not reproduced", "reproduced", "not measured"]
    assert [ClaimResult(**c) for c in record["claims"]] == [ClaimResult(**jsonable(c)) for c in claims]
    assert record["technique"] == "pretrain" and record["command"] == COMMAND
    assert record["metrics"]["params"] == 1234567 and record["metrics"]["np_int"] == 42
    assert record["metrics"]["torch_loss"] == 2.5
    assert record["metrics"]["nan_metric"] is None  # NaN -> null
    assert record["history"]["val/loss"][2] == [40, None]
    assert record["history"]["train/loss"][0] == [1, pytest.approx(_history()["train/loss"][0][1])]
    assert record["config"]["train"]["out"] == "runs"
    assert json.loads((tmp_path / "env.json").read_text())["corpus_hash"] == "deadbeef"
    assert yaml.safe_load((tmp_path / "config.yaml").read_text()) == record["config"]


def test_jsonable_converts_odd_types() -> None:
    data = {1: np.float32(0.5), "p": Path("/a/b"), "inf": float("inf"), "arr": np.arange(3), "t": torch.ones(2)}
    assert jsonable(data) == {"1": 0.5, "p": "/a/b", "inf": None, "arr": [0, 1, 2], "t": [1.0, 1.0]}
    json.dumps(jsonable(data), allow_nan=False)


def test_report_md_content(tmp_path: Path) -> None:
    text = _write(tmp_path).read_text()
    assert text.startswith("# pretrain: tiny GPT (seed 7)")
    assert f"```bash\n{COMMAND}\n```" in text
    for claim in _claims():
        assert claim.claim in text
        assert f"**{claim.verdict}**" in text
        if claim.measured is not None:
            assert format_value(claim.measured) in text
    assert "| 3.21 |" in text and "| 0.75 |" in text  # measured numbers in the claims table
    assert "| params | 1,234,567 |" in text and "| val/loss | 3.211 |" in text
    assert "![loss curve](loss_curve.png)" in text
    assert "| git_commit | abc123 |" in text
    assert "- a note \\| with a pipe" not in text and "- a note | with a pipe" in text
    assert "<details>" in text and "n_layer: 2" in text
    assert "2 of 4 claims reproduced (1 not measured in this run)" in text


@pytest.mark.parametrize(
    ("value", "text"),
    [(1234567, "1,234,567"), (3.2109876, "3.211"), (123456.789, "123,500"), (0.000123, "0.000123"),
     (2.0, "2"), (None, "—"), ("abc", "abc"), (True, "True"), (np.int64(5000), "5,000")],
)
def test_format_value(value, text: str) -> None:
    assert format_value(value) == text


def test_loss_curve_is_a_png(tmp_path: Path) -> None:
    _write(tmp_path)
    data = (tmp_path / "loss_curve.png").read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 20_000


@pytest.mark.parametrize(
    "history",
    [{}, {"train/loss": []}, {"train/loss": [(5, 2.0)]}, {"val/loss": [(0, float("nan"))]},
     {"train/loss": [(1, 0.0), (2, -1.0)], "val/loss": [(2, 1.0)]}],
)
def test_loss_curve_degenerate_histories(history) -> None:
    for log_y in (False, True):
        assert plots.loss_curve(history, "t", log_y=log_y).startswith(PNG_MAGIC)


def test_failure_mid_write_leaves_no_partial_report(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args, **kwargs):
        raise RuntimeError("plot failed")

    monkeypatch.setattr(plots, "loss_curve", broken)
    with pytest.raises(RuntimeError, match="plot failed"):
        _write(tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_failed_rewrite_keeps_previous_report(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _write(tmp_path)
    before = {name: (tmp_path / name).read_bytes() for name in FILES}

    def failing_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr("reports.writer.os.replace", failing_replace)
    with pytest.raises(OSError):
        _write(tmp_path, title="second run")
    assert {name: (tmp_path / name).read_bytes() for name in FILES} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(FILES)


# --- env --------------------------------------------------------------------------------------

def test_collect_env() -> None:
    env = collect_env(seed=123, extra={"corpus_hash": "cafe", "seed_note": 1})
    for key in ("python", "platform", "device", "git_commit", "seed", *PACKAGES):
        assert key in env and env[key] not in (None, "")
    assert env["seed"] == 123 and env["corpus_hash"] == "cafe"
    assert env["torch"] == torch.__version__
    assert re.fullmatch(r"[0-9a-f]{40}(-dirty)?|unknown", env["git_commit"]) or "LLM_REPRO_GIT_COMMIT" in os.environ
    json.dumps(env)


def test_git_commit_named_by_the_environment_wins(monkeypatch) -> None:
    """A tree copied to a batch machine may carry a stale .git: LLM_REPRO_GIT_COMMIT, where set, is the commit."""
    monkeypatch.delenv("LLM_REPRO_GIT_COMMIT", raising=False)
    assert re.fullmatch(r"[0-9a-f]{40}(-dirty)?|unknown", collect_env(seed=0)["git_commit"])
    monkeypatch.setenv("LLM_REPRO_GIT_COMMIT", "4369a59")
    assert collect_env(seed=0)["git_commit"] == "4369a59"


def test_evaluation_table_is_rendered_and_recorded(tmp_path) -> None:
    from reports.writer import write_report

    evaluation = {"rows": [{"task": "repro_cloze", "metric": "acc", "value": 0.25, "stderr": 0.05}], "batch_size": 16}
    write_report(
        tmp_path, technique="t", title="T", command="c", config={}, env={}, history={}, metrics={},
        claims=[], evaluation=evaluation,
    )
    text = (tmp_path / "report.md").read_text()
    assert "## Evaluation (lm-evaluation-harness)" in text and "| repro_cloze | acc | 0.25 | 0.05 |" in text
    assert "batch_size 16" in text
    assert json.loads((tmp_path / "metrics.json").read_text())["evaluation"] == evaluation


def test_extra_sections_follow_the_results(tmp_path: Path) -> None:
    text = _write(tmp_path, sections={"Samples": ["| prompt | sample |", "|---|---|", "| a | b |"]}).read_text()
    assert text.index("## Results") < text.index("## Samples\n\n| prompt | sample |\n|---|---|\n| a | b |") < text.index("## Loss curve")


def test_reward_kl_figure_is_a_png() -> None:
    history = {"ppo/true_reward": [(s, 0.01 * s) for s in range(1, 80)], "ppo/score": [(s, 0.05 * s) for s in range(1, 80)],
               "ppo/kl": [(s, min(4.0, 0.2 * s)) for s in range(1, 80)], "val/true_reward": [(40, 0.3), (79, 0.6)],
               "val/kl": [(40, 3.9), (79, 4.1)]}
    assert plots.reward_kl(history, "t", kl_target=4.0).startswith(PNG_MAGIC)
    assert plots.reward_kl({}, "t").startswith(PNG_MAGIC)
