"""The inference technique: its config errors stop before any work (the golden run covers it end to end)."""

from __future__ import annotations

import pytest

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
