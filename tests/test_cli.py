"""The entry point: bad input fails fast with one line naming the valid choices."""

from __future__ import annotations

import pytest

from repro.config import ConfigError, apply_overrides, build_config
from repro.run import main
from repro.runner import RunSpec, resolve
from repro.techniques.pretrain import PretrainConfig


def error_of(capsys: pytest.CaptureFixture, *argv: str) -> str:
    assert main(list(argv)) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err
    return err


def test_unknown_technique_names_the_valid_ones(capsys) -> None:
    err = error_of(capsys, "--technique", "pretrian")
    assert "'pretrian'" in err and "Did you mean 'pretrain'" in err and "Valid: " in err


def test_unknown_preset_names_the_valid_ones(capsys) -> None:
    err = error_of(capsys, "--technique", "pretrain", "--preset", "huge")
    assert "'huge'" in err and "gpt2-124m" in err and "tiny" in err


def test_typo_in_a_key_is_caught_before_any_work(capsys, tmp_path) -> None:
    err = error_of(capsys, "--technique", "pretrain", "--set", "model.n_layr=2", "--out", str(tmp_path))
    assert "'model.n_layr'" in err and "Did you mean 'n_layer'" in err
    assert not any(tmp_path.iterdir())  # nothing written


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("model.n_layer=two", "n_layer"),
        ("model.norm=batchnorm", "norm"),
        ("optim.lr=[1]", "lr"),
        ("model.n_head=5", "divisible"),
        ("model=3", "section"),
        ("nonsense", "KEY=VALUE"),
    ],
)
def test_wrong_values_give_one_line_errors(capsys, override: str, fragment: str) -> None:
    assert fragment in error_of(capsys, "--technique", "pretrain", "--set", override)


def test_missing_technique(capsys) -> None:
    assert "pretrain" in error_of(capsys)


def test_resume_of_a_folder_without_checkpoint(capsys, tmp_path) -> None:
    assert "no checkpoints/last.ckpt" in error_of(capsys, "--resume", str(tmp_path))


def test_list_shows_techniques_presets_and_settings(capsys) -> None:
    assert main(["--list"]) == 0
    out = capsys.readouterr().out
    assert "pretrain:" in out and "--preset gpt2-124m" in out and "n_layer: 12" in out


def test_overrides_are_typed_and_nested() -> None:
    technique, config = resolve(RunSpec("pretrain", "tiny", ["model.n_layer=3", "optim.lr=1e-3", "data.max_bytes=1000"]))
    assert config.model.n_layer == 3 and config.optim.lr == 1e-3 and config.data.max_bytes == 1000
    assert config.model.vocab_size == config.data.vocab_size  # the model follows the tokenizer


def test_build_config_rejects_unknown_section() -> None:
    with pytest.raises(ConfigError, match="Valid: data, eval, model, optim, train"):
        build_config(PretrainConfig, apply_overrides({}, ["modle.n_layer=1"]))


def test_recorded_command_reproduces_the_run() -> None:
    from repro.trainer import TrainerArgs

    spec = RunSpec("pretrain", "tiny", ["model.n_layer=3", "data.source=my docs"], 7, TrainerArgs(accelerator="gpu", num_nodes=2))
    assert spec.command() == (
        "python repro/run.py --technique pretrain --preset tiny --seed 7 --set model.n_layer=3 "
        "--set 'data.source=my docs' --accelerator gpu --num-nodes 2"
    )
