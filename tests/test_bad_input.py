"""Bad input, one table: every case ends with exit code 2 and one line naming the key or flag, before any
run folder or cache entry exists (data-file cases: tests/test_bad_data.py)."""

from __future__ import annotations

import time

import pytest
import torch

from repro.run import main

NO_GPU = pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is visible")

CASES = [
    # (technique, arguments, what the line must name)
    ("pretrain", ["--set", "optim.lr=-1"], "optim.lr=-1: must be > 0"),
    ("pretrain", ["--set", "optim.beta2=1"], "optim.beta2=1: must be < 1"),
    ("pretrain", ["--set", "train.val_every=0"], "train.val_every=0: must be >= 1"),
    ("pretrain", ["--set", "train.max_steps=-5"], "train.max_steps=-5"),
    ("pretrain", ["--set", "train.max_steps=0"], "train.max_steps=0"),
    ("pretrain", ["--set", "train.checkpoint_every=0"], "train.checkpoint_every=0"),
    ("pretrain", ["--set", "train.accumulate=0"], "train.accumulate=0"),
    ("pretrain", ["--set", "train.grad_clip=-1"], "train.grad_clip=-1"),
    ("pretrain", ["--set", "model.n_layer=0"], "model.n_layer=0"),
    ("pretrain", ["--set", "model.n_head=0"], "model.n_head=0"),  # was a ZeroDivisionError in __post_init__
    ("pretrain", ["--set", "model.block_size=0"], "model.block_size=0"),
    ("pretrain", ["--set", "model.dropout=1.5"], "model.dropout=1.5"),
    ("pretrain", ["--set", "data.batch_size=0"], "data.batch_size"),
    ("pretrain", ["--set", "eval.tasks=[repro_corpus_pl]"], "Did you mean 'repro_corpus_ppl'"),
    ("pretrain", ["--set", "eval.tasks=[]"], "eval.tasks=[]"),
    ("pretrain", ["--set", "eval.tasks=[missing.yaml]"], "no task file missing.yaml"),
    ("pretrain", ["--set", "eval.batch_size=0"], "eval.batch_size=0"),
    ("pretrain", ["--set", "eval.limit=0"], "eval.limit=0"),
    # a prerequisite stage's settings, spelt with its name, are checked before the dependent run starts
    ("sft", ["--set", "pretrain.train.max_steps=-5"], "pretrain.train.max_steps=-5"),
    ("dpo", ["--set", "reward.pretrain.optim.lr=-1"], "reward.pretrain.optim.lr=-1"),
    ("dpo", ["--set", "reward.train.val_every=0"], "reward.train.val_every=0"),
    # Lightning's flags, refused before the Trainer exists
    ("pretrain", ["--devices", "0"], "--devices 0"),
    ("pretrain", ["--devices", "-3"], "--devices -3"),
    ("pretrain", ["--devices", "two"], "--devices two"),
    ("pretrain", ["--precision", "bogus"], "--precision bogus"),
    ("pretrain", ["--accelerator", "quantum"], "--accelerator quantum"),
    pytest.param("pretrain", ["--accelerator", "gpu"], "--accelerator gpu: no GPU", marks=NO_GPU),
    pytest.param("pretrain", ["--devices", "0,1"], "--devices 0,1", marks=NO_GPU),
    ("pretrain", ["--strategy", "ddpp"], "Did you mean 'ddp'"),
    pytest.param("pretrain", ["--strategy", "deepspeed_stage_2"], "--strategy deepspeed_stage_2", marks=NO_GPU),
    ("pretrain", ["--num-nodes", "0"], "--num-nodes 0"),
    # a technique that trains in one process (Technique.distributed=False) refuses more
    pytest.param("cai", ["--accelerator", "cpu", "--devices", "2"], "cai runs in one process", marks=NO_GPU),
    ("cai", ["--accelerator", "cpu", "--num-nodes", "2"], "cai runs in one process"),
    ("pretrain", ["--seeds", "0"], "--seeds 0"),
]


@pytest.mark.parametrize("technique, args, names", CASES)
def test_bad_input_is_one_line_and_leaves_nothing(technique, args, names, capsys, tmp_path, monkeypatch) -> None:
    cache, out = tmp_path / "cache", tmp_path / "runs"
    monkeypatch.setenv("LLM_REPRO_CACHE", str(cache))
    start = time.perf_counter()
    assert main(["--technique", technique, "--out", str(out), *args]) == 2
    assert time.perf_counter() - start < 5  # refused before any data or model is built
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err
    assert names in err
    assert not out.exists() and not cache.exists()


def test_a_failure_in_setup_leaves_no_run_folder(capsys, tmp_path, monkeypatch) -> None:
    """What only Lightning finds (a MisconfigurationException while the Trainer is built) is one line too, and the
    folder made for the run goes with it: it holds no checkpoint to resume."""
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    import repro.runner

    def refuse(*args, **kwargs):
        raise MisconfigurationException("refused\nby Lightning")

    monkeypatch.setattr(repro.runner, "build_trainer", refuse)
    out = tmp_path / "runs"
    assert main(["--technique", "pretrain", "--out", str(out), "--set", "model.n_layer=1"]) == 2
    assert capsys.readouterr().err.strip() == "error: refused by Lightning"
    assert not any(out.rglob("run.json"))
