"""The inference technique: its config errors stop before any work (the golden run covers it end to end), and
`benchmarks/inference.py` measures a finished run again with the schemes, draft lengths and repeats it is given."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from repro.run import main


@pytest.mark.parametrize("override, fragment", [
    ("quant.schemes=[int3]", "quant.schemes: unknown ['int3']"),
    ("decode.gammas=[0,2]", "draft lengths of at least 1"),
    ("drafters.draft={vocab_size: 10}", "shares the target's vocabulary"),
    ("drafters.draft={n_layers: 1}", "unknown model fields ['n_layers']"),
    ("train.grad_clip=1.0", "each drafter clips its own gradients"),
])
def test_bad_presets_stop_before_any_run_folder(capsys, tmp_path, override: str, fragment: str) -> None:
    assert main(["--technique", "inference", "--set", override, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and fragment in err, err
    assert not any(tmp_path.iterdir())


def test_a_finished_run_is_measured_again_with_other_settings_and_full_float32(tmp_path: Path) -> None:
    from benchmarks import inference as bench
    from measurement.inference import full_float32_matmuls
    from repro import golden, registry

    corpus = golden.write_corpus(tmp_path / "corpus")
    overrides = [o.format(corpus=corpus, cache=tmp_path / "cache") for o in registry.get("inference").golden_overrides]
    assert main(["--technique", "inference", "--accelerator", "cpu", "--out", str(tmp_path / "runs"),
                 *(a for o in overrides for a in ("--set", o))]) == 0
    run_dir = next((tmp_path / "runs" / "inference").iterdir())
    out = tmp_path / "again.json"
    torch.set_float32_matmul_precision("high")  # as the trainer leaves it on a GPU
    try:
        with full_float32_matmuls():
            assert torch.get_float32_matmul_precision() == "highest"
        assert bench.main(["--checkpoint", str(run_dir), "--schemes", "int8", "--gammas", "3", "--repeats", "1",
                           "--out", str(out)]) == 0
        assert torch.get_float32_matmul_precision() == "high"  # measured in full float32, then restored
    finally:
        torch.set_float32_matmul_precision("highest")
    result = json.loads(out.read_text())
    assert [r["scheme"] for r in result["quantization"]] == ["none", "int8"]
    records = result["speculation"]["records"]
    assert {r["gamma"] for r in records} == {3} and {r["method"] for r in records} == {"draft model", "EAGLE"}
    assert all(r["greedy_mismatches"] == 0 for r in records if r["temperature"] == 0.0)
    assert out.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("args, fragment", [
    (["--checkpoint", "/nonexistent"], "/nonexistent: not a run folder"),
    (["--schemes", "int3"], "invalid choice: 'int3'"),
    (["--gammas", "0"], "must be at least 1"),
    (["--repeats", "0"], "must be at least 1"),
])
def test_the_re_measure_refuses_bad_arguments_before_loading_anything(capsys, tmp_path: Path, args: list[str],
                                                                      fragment: str) -> None:
    from benchmarks import inference as bench

    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "final.ckpt").write_bytes(b"")  # a run folder by its shape; nothing loads it
    with pytest.raises(SystemExit) as exit_:
        bench.main(["--checkpoint", str(tmp_path), *args] if args[0] != "--checkpoint" else args)
    assert exit_.value.code == 2 and fragment in capsys.readouterr().err
