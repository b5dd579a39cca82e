"""The cai technique end to end at the smallest scale (a 2-layer chat model, a few steps of SL-CAI and RL-CAI):
the report has the three models' violation rates and both claims, computed from the run; bad settings stop
before any run folder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from repro import golden, registry
from repro.run import main

CAI = ["cai.n_train=24", "cai.n_held_out=8", "cai.max_new_tokens=8", "cai.sl.steps=3", "cai.sl.batch_size=4",
       "cai.rl.steps=3", "cai.rl.batch_size=4"]


def sft_stage(corpus: Path, cache: Path) -> list[str]:
    """The sft technique's golden overrides (its pretrain stage's included, `pretrain.`-prefixed), with room in the
    context for a prompt and its response, and the full arm only (the one cai reads)."""
    return [o.format(corpus=corpus, cache=cache) for o in registry.get("sft").golden_overrides] + ["pretrain.model.block_size=64", "lora.enabled=false"]


def test_cai_reports_violation_rates_of_base_sl_and_rl_cai(tmp_path: Path) -> None:
    corpus, cache = golden.write_corpus(tmp_path / "corpus"), tmp_path / "cache"
    args = ["--technique", "cai", "--accelerator", "cpu", "--out", str(tmp_path / "runs"),
            "--set", f"sft_overrides={json.dumps(sft_stage(corpus, cache))}", *(a for o in CAI for a in ("--set", o))]
    assert main(args) == 0
    run_dir = next((tmp_path / "runs" / "cai").iterdir())
    result = json.loads((run_dir / "cai.json").read_text())
    assert set(result["rates"]) == {"base", "sl-cai", "rl-cai"}
    for rates in result["rates"].values():
        assert "any" in rates["all"] and 0 <= rates["all"]["any"] <= 1
    rows = [json.loads(line) for line in (run_dir / "sl_cai.jsonl").read_text().splitlines()]
    assert rows and all([m["role"] for m in r["messages"]] == ["user", "assistant"] for r in rows)
    red = {name: rates["red_team"]["any"] for name, rates in result["rates"].items()}
    verdicts = [c["verdict"] for c in result["claims"]]
    assert verdicts[0] == ("reproduced" if red["sl-cai"] < red["base"] else "not reproduced")
    assert verdicts[1] == ("reproduced" if red["rl-cai"] <= red["sl-cai"] else "not reproduced")
    helpful = {name: {k: result["metrics"][f"helpfulness/{name}/{k}"] for k in ("task_accuracy", "mean_words", "one_word_share")}
               for name in ("base", "sl-cai", "rl-cai")}
    base_accuracy, rl_accuracy = helpful["base"]["task_accuracy"], helpful["rl-cai"]["task_accuracy"]
    if base_accuracy:  # else not measured: no ordinary prompt, or none answered by the chat model
        n_ordinary = sum(p["kind"] == "ordinary" for p in result["held_out"])
        kept = rl_accuracy > 0.8 * (base_accuracy - 0.5 / n_ordinary)
        assert verdicts[2] == ("reproduced" if kept else "not reproduced")
    else:
        assert verdicts[2] == "not measured"
    report = (run_dir / "report.md").read_text()
    assert "Helpfulness on held-out prompts" in report
    for name in ("base", "sl-cai", "rl-cai"):
        assert f"| {name} |" in report
    assert "Critique and revision samples" in report and "SL-CAI (critique-revise)" in report
    assert len(list((tmp_path / "runs" / "sft").iterdir())) == 1  # the chat model: one sft stage

    # a suite checkpoint as the critic and the judge: here the chat model's own run folder, so the same answers
    from repro.checkpoints import load_model
    from repro.techniques import cai

    sft_dir = next((tmp_path / "runs" / "sft").iterdir())
    chat, tokenizer = load_model(sft_dir, "cpu", arm="full")
    texts = ["Q: Repeat the words: apple river\nA:", "Q: What is 2 + 3?\nA:"]
    own = cai._critic(None, chat, tokenizer, 6, 0.0, seed=0)(texts)
    assert cai._critic(str(sft_dir), chat, tokenizer, 6, 0.0, seed=0)(texts) == own
    assert cai._judge(str(sft_dir), chat, tokenizer)(texts[0], " (A)") == pytest.approx(cai._judge(None, chat, tokenizer)(texts[0], " (A)"))
    assert cai._suite_model(str(tmp_path / "no-such-model"), chat) is None  # a name for Hugging Face


@pytest.mark.parametrize("override, fragment", [
    ("cai.n_held_out=0", "cai.n_held_out at least 1"),
    ("cai.rl.beta=0", "cai.rl.beta"),
    ("cai.constitution=/nonexistent.yaml", "no such constitution file"),
    ("cai.critic=''", "cai.critic and cai.judge"),
    ("cai.sl.stepz=3", "stepz"),
])
def test_bad_cai_settings_stop_before_any_run_folder(capsys, tmp_path: Path, override: str, fragment: str) -> None:
    assert main(["--technique", "cai", "--set", override, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and fragment in err, err
    assert not any(tmp_path.iterdir())
