"""Pretraining end to end on a CPU: loss falls, runs repeat exactly, a killed run resumes exactly."""

from __future__ import annotations

import json
import math
from pathlib import Path

import lightning as L
import pytest
import torch

from modules.training.pretrain import warmup_cosine
from repro.run import main
from repro.runner import RunSpec, run

KILL_AT = 6


class Kill(L.Callback):
    """Stands in for a crash: the process dies after step KILL_AT."""

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.global_step == KILL_AT:
            raise RuntimeError("killed")


def metrics(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())


def losses(run_dir: Path) -> list[float]:
    return [value for _, value in metrics(run_dir)["history"]["train/loss"]]


@pytest.fixture
def first_run(tiny_overrides, tmp_path) -> Path:
    return run(RunSpec("pretrain", "tiny", tiny_overrides, seed=1), out=tmp_path / "a")


def test_loss_falls_and_report_is_written(first_run: Path) -> None:
    curve = losses(first_run)
    assert len(curve) == 12
    assert curve[0] == pytest.approx(math.log(320), abs=0.3)  # uniform over the vocabulary at init
    assert sum(curve[-3:]) / 3 < curve[0] - 0.75  # observed: about 1.0 nat lower after 12 steps
    for name in ["report.md", "metrics.json", "loss_curve.png", "config.yaml", "env.json", "run.json", "checkpoints/final.ckpt"]:
        assert (first_run / name).is_file(), name
    m = metrics(first_run)
    claim = m["claims"][0]
    assert claim["measured"] == pytest.approx(m["metrics"]["val/loss"])
    expected = "reproduced" if m["metrics"]["val/loss"] < 0.8 * m["metrics"]["unigram_entropy"] else "not reproduced"
    assert claim["verdict"] == expected
    assert m["env"]["corpus_hash"] == m["metrics"]["corpus_hash"]


def test_same_seed_gives_the_same_losses(first_run: Path, tiny_overrides, tmp_path) -> None:
    again = run(RunSpec("pretrain", "tiny", tiny_overrides, seed=1), out=tmp_path / "b")
    assert losses(again) == losses(first_run)
    other = run(RunSpec("pretrain", "tiny", tiny_overrides, seed=2), out=tmp_path / "c")
    assert losses(other) != losses(first_run)


def test_killed_run_resumed_ends_like_an_uninterrupted_one(first_run: Path, tiny_overrides, tmp_path, capsys) -> None:
    with pytest.raises(RuntimeError, match="killed"):
        run(RunSpec("pretrain", "tiny", tiny_overrides, seed=1), out=tmp_path / "k", callbacks=[Kill()])
    (killed,) = (tmp_path / "k" / "pretrain").iterdir()
    assert not (killed / "report.md").exists()
    assert main(["--resume", str(killed)]) == 0
    assert losses(killed) == losses(first_run)
    assert metrics(killed)["metrics"]["val/loss"] == metrics(first_run)["metrics"]["val/loss"]


def test_warmup_cosine_schedule() -> None:
    assert warmup_cosine(0, 10, 100, 0.1) == pytest.approx(0.1)
    assert warmup_cosine(9, 10, 100, 0.1) == pytest.approx(1.0)
    assert warmup_cosine(55, 10, 100, 0.1) == pytest.approx(0.55)
    assert warmup_cosine(100, 10, 100, 0.1) == pytest.approx(0.1)
    assert warmup_cosine(500, 10, 100, 0.1) == pytest.approx(0.1)


def test_checkpoint_rebuilds_its_module(first_run: Path) -> None:
    from modules.training.pretrain import PretrainModule

    module = PretrainModule.load_from_checkpoint(first_run / "checkpoints" / "final.ckpt", map_location="cpu")
    assert module.model.config.n_layer == 2
    assert module(torch.zeros(1, 4, dtype=torch.long)).shape == (1, 4, 320)


def test_broken_data_file_fails_in_one_line_and_leaves_nothing(tiny_overrides, tmp_path, capsys) -> None:
    broken = tmp_path / "corpus.jsonl"
    broken.write_text('{"text": "a fine first document, long enough to be kept by the cleaner ......"}\n{"text": oops}\n')
    overrides = [o for o in tiny_overrides if not o.startswith("data.source=")] + [f"data.source={broken}"]
    argv = ["--technique", "pretrain", "--out", str(tmp_path / "runs")]
    assert main(argv + [arg for o in overrides for arg in ("--set", o)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "corpus.jsonl:2" in err
    assert not any((tmp_path / "runs").rglob("*.json")), "no half-written run folder"
    assert not any(p.name.endswith(".partial") for p in (tmp_path / "cache").rglob("*"))


def test_prerequisite_stage_runs_once_and_is_reused(tiny_overrides, tmp_path, monkeypatch) -> None:
    from repro import registry
    from repro.techniques import pretrain

    seen: list[Path] = []

    def build(config, seed, stages):
        seen.append(stages["pretrain"])
        return pretrain.build(config, seed, {})

    dependent = registry.Technique(
        "after-pretrain", "a stage that needs a base", pretrain.PretrainConfig, pretrain.PretrainModule, build,
        requires=("pretrain",), claims=pretrain.claims,
    )
    monkeypatch.setitem(registry._REGISTRY, "after-pretrain", dependent)
    monkeypatch.setattr(registry.Technique, "presets", property(lambda self: ["tiny"]))
    monkeypatch.setattr("repro.runner.load_preset", lambda name, preset: {"train": {"max_steps": 4}})
    monkeypatch.setattr("repro.runner.stage_spec", lambda name, spec: RunSpec(name, "tiny", tiny_overrides, spec.seed))
    spec = RunSpec("after-pretrain", "tiny", [o for o in tiny_overrides if not o.startswith("train.")], seed=1)
    run(spec, out=tmp_path / "runs")
    run(spec, out=tmp_path / "runs")
    stages = [p for p in (tmp_path / "runs" / "pretrain").iterdir()]
    assert len(stages) == 1 and stages[0].name.startswith("stage-tiny-s1-")
    assert seen == [stages[0] / "checkpoints" / "final.ckpt"] * 2 and seen[0].is_file()


def test_run_folder_loads_for_generation(first_run: Path, capsys) -> None:
    from modules.decoding.generation import generate_text, truncate_at_stop
    from repro.checkpoints import load_model
    from repro.generate import main as generate_main

    model, tokenizer = load_model(first_run)
    texts = generate_text(model, tokenizer, ["def f(x):", "import "], 8)
    assert len(texts) == 2 and all(isinstance(t, str) and t for t in texts)
    assert generate_main(["--checkpoint", str(first_run), "--prompt", "def f(x):", "--max-new-tokens", "8"]) == 0
    assert capsys.readouterr().out.startswith("def f(x):" + texts[0])
    assert truncate_at_stop("a = 1\n\nb = 2", ["\n\n", "b"]) == "a = 1"
    assert generate_main(["--checkpoint", str(first_run / "nowhere"), "--prompt", "x"]) == 2


def test_run_scores_its_final_checkpoint_with_lm_eval(tiny_overrides, tmp_path) -> None:
    tasks = "[repro_cloze,repro_verifiable_arithmetic_mc]"
    overrides = [*tiny_overrides, "eval.enabled=true", "eval.limit=4", "eval.batch_size=2", f"eval.tasks={tasks}"]
    run_dir = run(RunSpec("pretrain", "tiny", overrides, seed=1), out=tmp_path)
    results = json.loads((run_dir / "eval.json").read_text())["results"]
    section = metrics(run_dir)["evaluation"]
    assert section["batch size"] == 2 and section["limit"] == 4
    shown = {(r["task"], r["metric"]): r["value"] for r in section["rows"]}
    assert shown[("repro_cloze", "acc")] == results["repro_cloze"]["acc,none"]
    assert shown[("repro_verifiable_arithmetic_mc", "acc_norm")] == results["repro_verifiable_arithmetic_mc"]["acc_norm,none"]
    assert 0 <= shown[("repro_cloze", "acc")] <= 1 and results["repro_cloze"]["perplexity,none"] > 1
    report = (run_dir / "report.md").read_text()
    assert "## Evaluation (lm-evaluation-harness)" in report and "| repro_verifiable_arithmetic_mc | acc_norm |" in report
