"""The data technique: its settings are checked before any work, and its corpora pair up per step."""

from __future__ import annotations

import pytest

from repro.run import main


@pytest.mark.parametrize("override, fragment", [
    ("pipeline.plants={spam_rate: 0.1}", "pipeline.plants"),
    ("pipeline.filters={quality: {min_wordz: 3}}", "pipeline.filters"),
    ("ablation.arms=[{name: a, corpus: cleaned}]", "corpus 'cleaned'"),
])
def test_bad_settings_stop_before_any_run_folder(capsys, tmp_path, override: str, fragment: str) -> None:
    assert main(["--technique", "data", "--set", override, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and fragment in err, err
    assert not any(tmp_path.iterdir())


def test_a_prefix_no_document_has_is_a_clear_error(capsys, tmp_path) -> None:
    from repro import golden

    corpus = golden.write_corpus(tmp_path / "corpus")
    args = ["--technique", "data", "--out", str(tmp_path / "runs"), "--set", f"data.source={corpus}",
            "--set", f"data.cache_dir={tmp_path / 'cache'}", "--set", "pipeline.only=nothing/"]
    assert main(args) == 2
    assert "pipeline.only='nothing/'" in capsys.readouterr().err
    assert not any((tmp_path / "runs").rglob("report.md"))
