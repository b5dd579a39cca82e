"""A checkpoint is data: every path that loads one refuses a pickle that would run code, in one line, before it runs.

Each test plants a `.ckpt` whose pickle calls `open(marker, "w")` on load (what any code-running pickle does:
name a callable and its arguments) in a run folder, loads it through one entry point, and asserts the refusal
and that the marker was never written.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer
from tokenizers.models import BPE

from repro.config import ConfigError
from repro.runner import RunSpec

REFUSAL = "refused to load: it holds objects other than tensors and plain data (weights-only loading"


class OpensAFile:
    """Pickles as a call of `open(path, "w")`: the unpickler runs it on load, unless it loads weights only."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple:
        return open, (str(self.path), "w")


def planted_run(folder: Path, technique: str, marker: Path) -> Path:
    """A run folder of `technique` whose final and last checkpoints hold an `OpensAFile`, beside what the
    loaders read before the checkpoint (run.json, tokenizer.json, the saved prompts)."""
    (folder / "checkpoints").mkdir(parents=True)
    (folder / "run.json").write_text(json.dumps(asdict(RunSpec(technique, "tiny"))))
    Tokenizer(BPE()).save(str(folder / "tokenizer.json"))
    (folder / "decode_prompts.json").write_text(json.dumps({"prompts": [[1, 2]], "new_tokens": 1}))
    (folder / "preference.json").write_text("{}")
    checkpoint = {"state_dict": {"model.weight": torch.zeros(2)}, "hyper_parameters": {"model": OpensAFile(marker)}}
    for name in ("final.ckpt", "last.ckpt"):
        torch.save(checkpoint, folder / "checkpoints" / name)
    return folder


def cli_error(capsys: pytest.CaptureFixture, code: int) -> str:
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err
    return err


def load_model(run: Path, capsys: pytest.CaptureFixture) -> str:
    from repro.checkpoints import load_model

    with pytest.raises(ConfigError) as err:
        load_model(run)
    return str(err.value)


def load_model_of_a_ckpt(run: Path, capsys: pytest.CaptureFixture) -> str:
    return load_model(run / "checkpoints" / "last.ckpt", capsys)


def generate(run: Path, capsys: pytest.CaptureFixture) -> str:
    from repro.generate import main

    return cli_error(capsys, main(["--checkpoint", str(run), "--prompt", "x", "--device", "cpu"]))


def evaluate(run: Path, capsys: pytest.CaptureFixture) -> str:
    from repro.evaluate import main

    return cli_error(capsys, main(["--checkpoint", str(run), "--tasks", "repro_cloze", "--limit", "1", "--device", "cpu"]))


def lm_eval_adapter(run: Path, capsys: pytest.CaptureFixture) -> str:
    """`python -m evaluation --model llm-repro --model_args checkpoint=RUN` builds this adapter."""
    from evaluation.lm import ReproLM

    with pytest.raises(ConfigError) as err:
        ReproLM(checkpoint=str(run), device="cpu")
    return str(err.value)


def lm_eval_command_line(run: Path, capsys: pytest.CaptureFixture) -> str:
    """`python -m evaluation` itself: lm-eval's argument parsing, then the adapter's refusal as one line."""
    from evaluation.__main__ import main

    argv = sys.argv
    sys.argv = ["evaluation", "--model", "llm-repro", "--model_args", f"checkpoint={run}", "--device", "cpu",
                "--tasks", "repro_cloze", "--include_path", "evaluation/tasks", "--limit", "1"]
    try:
        code = main()
    finally:
        sys.argv = argv
    assert code == 2
    err = capsys.readouterr().err  # lm-eval logs its own INFO lines to stderr before the model loads
    assert "Traceback" not in err
    return err.strip().splitlines()[-1]


def hogwild_benchmark(run: Path, capsys: pytest.CaptureFixture) -> str:
    from benchmarks.hogwild import main

    return cli_error(capsys, main(["--checkpoint", str(run), "--rows", "1"]))


def serve(run: Path, capsys: pytest.CaptureFixture) -> str:
    from repro.serve import main

    return cli_error(capsys, main(["--checkpoint", str(run), "--device", "cpu", "--port", "0"]))


def init(run: Path, capsys: pytest.CaptureFixture) -> str:
    from repro.run import main

    return cli_error(capsys, main(["--technique", "sft", "--init", str(run), "--out", str(run.parent / "runs")]))


def resume(run: Path, capsys: pytest.CaptureFixture) -> str:
    from repro.run import main

    return cli_error(capsys, main(["--resume", str(run)]))


def resume_a_ckpt(run: Path, capsys: pytest.CaptureFixture) -> str:
    from repro.run import main

    return cli_error(capsys, main(["--resume", str(run / "checkpoints" / "final.ckpt")]))


def speculative_benchmark(run: Path, capsys: pytest.CaptureFixture) -> str:
    from benchmarks.speculative import main

    return cli_error(capsys, main(["--checkpoint", str(run)]))


def inference_benchmark(run: Path, capsys: pytest.CaptureFixture) -> str:
    from benchmarks.inference import main

    return cli_error(capsys, main(["--checkpoint", str(run)]))


def rlhf_reward_stage(run: Path, capsys: pytest.CaptureFixture) -> str:
    from repro.runner import resolve
    from repro.techniques.rlhf import build

    _, config = resolve(RunSpec("rlhf", "tiny"))
    with pytest.raises(ConfigError) as err:
        build(config, 0, {"reward": run / "checkpoints" / "final.ckpt"})
    return str(err.value)


LOADERS: dict[str, tuple[str, Callable[[Path, pytest.CaptureFixture], str]]] = {
    # name: (the technique whose run the loader expects, the loader)
    "load_model": ("pretrain", load_model),
    "load_model a .ckpt": ("pretrain", load_model_of_a_ckpt),
    "repro/generate.py": ("pretrain", generate),
    "repro/evaluate.py": ("pretrain", evaluate),
    "python -m evaluation": ("pretrain", lm_eval_adapter),
    "python -m evaluation (command line)": ("pretrain", lm_eval_command_line),
    "repro/serve.py": ("pretrain", serve),
    "--init": ("pretrain", init),
    "--resume": ("pretrain", resume),
    "--resume a .ckpt": ("pretrain", resume_a_ckpt),
    "benchmarks.speculative": ("mtp", speculative_benchmark),
    "benchmarks.inference": ("inference", inference_benchmark),
    "benchmarks.hogwild": ("pretrain", hogwild_benchmark),
    "rlhf's reward stage": ("reward", rlhf_reward_stage),
}


@pytest.mark.parametrize("loader", LOADERS)
def test_a_checkpoint_that_would_run_code_is_refused_in_one_line(loader: str, tmp_path: Path, capsys) -> None:
    marker = tmp_path / "ran"
    technique, load = LOADERS[loader]
    run = planted_run(tmp_path / "run", technique, marker)
    message = load(run, capsys)
    assert REFUSAL in message and "\n" not in message
    assert str(run) in message and ".ckpt" in message  # names the file it refused
    assert not marker.exists()  # the pickle's call never ran
    assert not (tmp_path / "runs").exists()  # --init refused before making a run folder


def test_the_refusal_names_what_the_pickle_would_call(tmp_path: Path) -> None:
    from repro.checkpoints import check_weights_only

    run = planted_run(tmp_path / "run", "pretrain", tmp_path / "ran")
    with pytest.raises(ConfigError, match=r"it names (_?io|builtins)\.open"):  # _io.open on Python 3.12
        check_weights_only(run / "checkpoints" / "final.ckpt")


def test_tensors_and_plain_data_pass(tmp_path: Path) -> None:
    from repro.checkpoints import check_weights_only

    path = tmp_path / "plain.ckpt"
    torch.save({"state_dict": {"w": torch.ones(2)}, "hyper_parameters": {"model": {"n_layer": 2}}, "curves": [(1, 0.5)]}, path)
    assert check_weights_only(path) == path


def test_run_context_given_to_a_constructor_stays_out_of_the_hyperparameters(tmp_path: Path) -> None:
    """Where a base run lives and the true reward (a function) are constructor arguments, not hyperparameters:
    a Path or a callable among the saved hyperparameters would make every checkpoint refuse weights-only loading."""
    from modules.training.dpo import DPOModule, DPOSettings
    from modules.training.inference import InferenceModule
    from modules.training.ppo import PPOConfig, PPOModule
    from modules.training.sft import LoraSettings, SFTModule, SFTOptimConfig

    config = {"vocab_size": 32, "block_size": 12, "n_layer": 1, "n_head": 2, "n_embd": 16}
    runs = {"base_dir": tmp_path / "base", "reward_dir": tmp_path / "reward"}
    modules = {
        "dpo": DPOModule(config, DPOSettings(), 1, **runs),
        "ppo": PPOModule(config, PPOConfig(reward="true"), 1, true_reward=lambda rows: [0.0] * len(rows), **runs),
        "sft": SFTModule(config, SFTOptimConfig(), 1, LoraSettings(enabled=False), base_dir=runs["base_dir"]),
        "inference": InferenceModule(config, {}, {}, 1, base_dir=runs["base_dir"]),
    }
    for name, module in modules.items():
        assert module.base_dir == runs["base_dir"], name
        assert not {"base_dir", "reward_dir", "true_reward"} & set(module.hparams), name
        torch.save({"hyper_parameters": dict(module.hparams)}, tmp_path / f"{name}.ckpt")
        assert torch.load(tmp_path / f"{name}.ckpt", weights_only=True)["hyper_parameters"] == dict(module.hparams), name
    assert modules["ppo"].true_reward([[1], [2]]) == [0.0, 0.0] and modules["ppo"].reward_dir == runs["reward_dir"]
def test_a_checkpoint_names_the_module_class_that_loads_it(tmp_path: Path, tiny_overrides: list[str]) -> None:
    """A run's checkpoints name their LightningModule class, so loading needs no technique registry; a run folder
    that names it where it lived before modules/ was split loads by the old name, and one from before checkpoints
    named their class loads by its technique."""
    from modules.training.pretrain import PretrainModule
    from repro.checkpoints import MODULE_CLASS, load_model, module_class
    from repro.runner import run
    from repro.trainer import TrainerArgs

    run_dir = run(RunSpec("pretrain", "tiny", tiny_overrides + ["train.max_steps=4"], trainer=TrainerArgs(accelerator="cpu")),
                  out=tmp_path / "runs")
    for name in ("final.ckpt", "last.ckpt"):
        checkpoint = torch.load(run_dir / "checkpoints" / name, weights_only=True)
        assert checkpoint[MODULE_CLASS] == "modules.training.pretrain.PretrainModule"
    final = run_dir / "checkpoints" / "final.ckpt"
    assert module_class(final, technique="another name") is PretrainModule  # the checkpoint's word, not the run's
    model, _ = load_model(run_dir)
    checkpoint[MODULE_CLASS] = "modules.pretrain.PretrainModule"  # a run folder written before modules/ was split
    torch.save(checkpoint, final)
    assert module_class(final, technique="another name") is PretrainModule
    assert torch.equal(load_model(run_dir)[0].wte.weight, model.wte.weight)
    del checkpoint[MODULE_CLASS]  # a run folder written before checkpoints named their class
    torch.save(checkpoint, final)
    assert module_class(final, "pretrain") is PretrainModule
    assert torch.equal(load_model(run_dir)[0].wte.weight, model.wte.weight)
    with pytest.raises(ConfigError, match="names no module class"):
        module_class(final, "cai")


def test_a_checkpoint_naming_its_class_where_it_lived_before_the_split_loads_it(tmp_path: Path) -> None:
    """A checkpoint written before modules/ was split into nn, parallel, decoding and training names its class at the
    old path (`modules.dpo.DPOModule`): each old path loads the class of the same name at its new path, no module is
    left at an old path, and every technique's class of before checkpoints named theirs is in the table."""
    import importlib

    from repro.checkpoints import BEFORE_NAMING, MODULE_CLASS, MOVED, module_class

    for old, new in MOVED.items():
        (old_module, _, old_name), (new_module, _, name) = old.rpartition("."), new.rpartition(".")
        torch.save({"state_dict": {}, MODULE_CLASS: old}, tmp_path / "old.ckpt")
        assert old_name == name and module_class(tmp_path / "old.ckpt") is getattr(importlib.import_module(new_module), name)
        with pytest.raises(ModuleNotFoundError):
            importlib.import_module(old_module)  # the old paths live on in MOVED only, not as modules
    assert set(BEFORE_NAMING.values()) <= set(MOVED.values())


@pytest.mark.parametrize("named, fragment", [
    ("os.system", "outside the suite's modules package"),
    ("modules.nn.decoder.Decoder", "no LightningModule of this suite"),
    ("modules.training.pretrain.NoSuchModule", "no LightningModule of this suite"),
    ("modules.no_such_file.Module", "which does not import here: No module named 'modules.no_such_file'"),
])
def test_a_checkpoint_naming_another_class_is_refused(tmp_path: Path, named: str, fragment: str) -> None:
    from repro.checkpoints import MODULE_CLASS, load_model

    run = planted_run(tmp_path / "run", "pretrain", tmp_path / "ran")
    torch.save({"state_dict": {}, MODULE_CLASS: named}, run / "checkpoints" / "final.ckpt")
    with pytest.raises(ConfigError, match=fragment):
        load_model(run)
