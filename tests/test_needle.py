"""The needle-retrieval task: every lookup's answer is the value hidden with its key; bad settings are refused;
the diff-attn and nsa techniques train each arm's shape on it and check their claims from the result."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from modules.training.needle import NeedleConfig, make_batch
from repro import golden
from repro.run import main


def test_each_lookup_asks_a_hidden_key_and_answers_its_value() -> None:
    config = NeedleConfig(context=64, pairs=5, queries=3, keys=10, values=7, filler=6)
    tokens, answers = make_batch(config, 16, torch.Generator().manual_seed(0))
    K0, V0, F0 = 1, 11, 18
    assert tokens.shape == (16, 64) and tokens.max() < config.vocab_size
    for row, at in zip(tokens, answers):
        body = row[: 64 - 9]
        hidden = {int(body[i]): int(body[i + 1]) for i in range(0, len(body) - 1, 2) if K0 <= body[i] < V0}
        assert len(hidden) == 5 and all(V0 <= v < F0 for v in hidden.values())
        assert ((body >= K0) & (body < V0)).sum() == 5  # keys appear only in their pairs
        for p in at.tolist():
            assert row[p - 2] == 0 and hidden[int(row[p - 1])] == row[p]
        assert len({int(row[p - 1]) for p in at}) == 3  # distinct keys asked


@pytest.mark.parametrize("settings, fragment", [
    (dict(pairs=2, queries=3), "must not exceed needle.pairs"),
    (dict(pairs=20, keys=10), "needle.keys >= 20"),
    (dict(context=20, pairs=8, queries=2), "cannot hold"),
])
def test_bad_needle_settings_are_refused(settings: dict, fragment: str) -> None:
    with pytest.raises(ValueError, match=fragment):
        NeedleConfig(**settings)


def test_the_nsa_technique_reports_needle_accuracy_and_its_claims(tmp_path: Path) -> None:
    corpus = golden.write_corpus(tmp_path / "corpus")
    overrides = [o.format(corpus=corpus, cache=tmp_path / "cache") for o in (*golden.CORPUS, *golden.SHRINK)]
    overrides += ["train.max_steps=2", "model.nsa_block=4", "model.nsa_stride=2", "model.nsa_select_block=4",
                  "model.nsa_window=8", "needle.enabled=true", "needle.steps=2", "needle.context=32", "needle.pairs=2",
                  "needle.queries=1", "needle.keys=4", "needle.values=4", "needle.filler=4", "needle.batch_size=4",
                  "needle.eval_batches=1"]
    assert main(["--technique", "nsa", "--accelerator", "cpu", "--out", str(tmp_path / "out"),
                 *[x for o in overrides for x in ("--set", o)]]) == 0
    run = next((tmp_path / "out" / "nsa").iterdir())
    record = json.loads((run / "metrics.json").read_text())
    metrics = record["metrics"]
    for arm in ("full", "nsa"):
        assert 0.0 <= metrics[f"{arm}/needle_accuracy"] <= 1.0
        # each arm's needle model is trained by the runner, as a declared fit: its checkpoint and history are the run's
        assert (run / "fits" / f"needle-{arm}" / "checkpoints" / "final.ckpt").is_file()
        assert len(record["history"][f"needle-{arm}/train/loss"]) == 2
    report = (run / "report.md").read_text()
    assert "Needle retrieval" in report and "NSA trains to a lower loss than full attention" in report
