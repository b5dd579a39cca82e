"""The architectures technique: its config errors stop before any work; its claims follow the arms it has."""

from __future__ import annotations

import pytest

from repro.run import main


@pytest.mark.parametrize("override, fragment", [
    ("architectures.arms=[{name: a, model: {n_kv_heads: 2}}]", "unknown model fields ['n_kv_heads']"),
    ("architectures.arms=[{name: a, model: {n_kv_head: 3}}]", "n_kv_head"),
    ("architectures.arms=[{name: a}, {name: a}]", "arm names must differ"),
    ("architectures.arms=[{name: a, model: {position: alibi}}]", "model.position='alibi'"),
])
def test_bad_presets_stop_before_any_run_folder(capsys, tmp_path, override: str, fragment: str) -> None:
    assert main(["--technique", "architectures", "--set", override, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and fragment in err, err
    assert not any(tmp_path.iterdir())
