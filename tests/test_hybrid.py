"""The hybrid technique: arms at equal size, its config errors, its name `jamba`, its long-context measurement."""

from __future__ import annotations

import pytest
import torch

from measurement.hybrid import measure_arms
from modules.nn import DecoderConfig
from repro import registry
from repro.run import main


def test_jamba_is_another_name_for_the_hybrid_technique(capsys) -> None:
    assert registry.get("jamba") is registry.get("hybrid")
    assert "jamba" not in registry.techniques()  # listed once, under its own name
    assert main(["--list"]) == 0
    assert "hybrid: " in capsys.readouterr().out


@pytest.mark.parametrize("override, fragment", [
    ("hybrid.arms=[{name: a, model: {layer_pattern: a}}, {name: m, model: {layer_pattern: m, mlp_hidden: 2048}}]",
     "arm 'm' has"),
    ("hybrid.arms=[{name: a, model: {layer_patern: a}}]", "unknown model fields ['layer_patern']"),
    ("model.layer_pattern=ax", "model.layer_pattern='ax'"),
    ("context.lengths=[]", "context.lengths=[]"),
])
def test_bad_presets_stop_before_any_run_folder(capsys, tmp_path, override: str, fragment: str) -> None:
    assert main(["--technique", "jamba", "--set", override, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and fragment in err, err
    assert not any(tmp_path.iterdir())


def test_context_sweep_measures_what_the_config_computes() -> None:
    base = dict(vocab_size=64, block_size=16, n_layer=4, n_head=2, n_embd=16, mamba_d_state=4, position="none")
    configs = {"transformer": DecoderConfig(**base, layer_pattern="a"), "hybrid": DecoderConfig(**base, layer_pattern="mmam")}
    records = measure_arms(configs, [8, 40], [1, 2], torch.device("cpu"), torch.float32, new_tokens=4, prefill_chunk=16)
    assert len(records) == 2 * 2 * 2
    for r in records:
        assert r["measured_bytes"] == r["computed_bytes"] == r["buffer_bytes"]
        assert r["decode_tokens_per_s"] > 0 and r["decode"] == "eager"
    by = {(r["arm"], r["batch"], r["context"]): r["computed_bytes"] for r in records}
    # attention's keys and values grow with the context; the hybrid has 1 attention block of 4
    grow_t = by["transformer", 1, 40] - by["transformer", 1, 8]
    grow_h = by["hybrid", 1, 40] - by["hybrid", 1, 8]
    assert grow_t == 4 * grow_h == 4 * 2 * 16 * 32 * 4  # layers x (k, v) x width x 32 tokens x float32
    assert by["hybrid", 2, 40] == 2 * by["hybrid", 1, 40]


def test_the_jamba_preset_runs_end_to_end_with_its_moe_arm(tmp_path) -> None:
    """The `jamba` preset, shrunk as the golden run shrinks the default one: four arms, the MoE hybrid
    balanced by its aux loss, a report whose claims come from the run."""
    import json

    from repro import golden
    from repro.runner import RunSpec, run

    technique = registry.get("jamba")
    corpus = golden.write_corpus(tmp_path / "corpus")
    overrides = [o.format(corpus=corpus, cache=tmp_path / "cache") for o in technique.golden_overrides]
    run_dir = run(RunSpec("hybrid", "jamba", [*overrides, "train.max_steps=4", "train.val_every=4"], seed=0), out=tmp_path / "runs")
    metrics = json.loads((run_dir / "metrics.json").read_text())["metrics"]
    assert {f"{a}/val_loss" for a in ("transformer", "mamba", "hybrid", "jamba")} <= set(metrics)
    assert metrics["jamba/params"] > metrics["hybrid/params"] and "val/jamba/maxvio_global" in metrics
    report = (run_dir / "report.md").read_text()
    assert "| jamba | mmmmammm | 8 experts, top-2, every 2 |" in report and report.count("**reproduced**") + report.count(
        "**not reproduced**") == 3
