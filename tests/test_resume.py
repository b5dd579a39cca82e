"""A run killed after a checkpoint and resumed ends as the uninterrupted run does: the same parameters,
optimizer state and history, the validation at the checkpoint's own step included.

Each technique that trains runs at its golden size (`repro.golden`), checkpointing at its first validation
step `k` and interrupted one step later. Pretraining dies by a real SIGKILL in a child process; the sweep
over every technique (`-m slow`) stops each in-process, which leaves the same checkpoint behind.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch

from repro import golden
from repro.registry import get, techniques
from repro.run import main
from repro.runner import RunSpec, resolve, run
from repro.trainer import TrainerArgs

ROOT = Path(__file__).resolve().parent.parent
CPU = TrainerArgs(accelerator="cpu", devices=1, precision="32-true")


def golden_spec(name: str, root: Path) -> tuple[RunSpec, int]:
    """The golden run of `name`, checkpointing every `k` steps, and `k`: its first validation step."""
    technique = get(name)
    corpus = golden.write_corpus(root / "corpus")
    overrides = [o.format(corpus=corpus, cache=root / "cache") for o in technique.golden_overrides]
    train = resolve(RunSpec(name, technique.default_preset, overrides))[1].train
    k = min(train.val_every, train.max_steps)
    assert k < train.max_steps, f"{name}: the golden run validates only at its last step; nothing is left to resume"
    spec = RunSpec(name, technique.default_preset, [*overrides, f"train.checkpoint_every={k}"], seed=golden.SEED, trainer=CPU)
    return spec, k


class Stop(L.Callback):
    """Raises once step `at` has trained: an interruption between two checkpoints."""

    def __init__(self, at: int) -> None:
        self.at = at

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        if trainer.global_step == self.at:
            raise RuntimeError("stopped")


def checkpoint(path: Path) -> dict[str, Any]:
    return torch.load(path, map_location="cpu", weights_only=True)  # a checkpoint stays plain data


def history_state(ckpt: dict[str, Any]) -> dict[str, list]:
    (state,) = [v for key, v in ckpt["callbacks"].items() if key.startswith("History")]
    return state["series"]


def assert_equal(a: Any, b: Any, where: str) -> None:
    """Exact equality of nested dicts, lists and tensors."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.shape == b.shape and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), f"{where}: keys {sorted(map(str, a))} vs {sorted(map(str, b))}"
        for key in a:
            assert_equal(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), f"{where}: lengths {len(a)} vs {len(b)}"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_equal(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} vs {b!r}"


def assert_checkpoint_holds_its_validation(run_dir: Path, name: str, k: int) -> None:
    """The killed run's last checkpoint is step k's, saved after step k's validation."""
    last = checkpoint(run_dir / "checkpoints" / "last.ckpt")
    assert last["global_step"] == k
    series = history_state(last)
    recorded = [key for key in get(name).val_metrics if series[key]]  # a technique may log fewer than it names
    assert recorded, f"{name}: last.ckpt at step {k} holds no validation point"
    for key in recorded:
        assert k in [step for step, _ in series[key]], f"{name}: last.ckpt at step {k} lacks that step's {key}"


def assert_resumed_like_uninterrupted(resumed: Path, whole: Path, name: str, k: int) -> None:
    a, b = checkpoint(resumed / "checkpoints" / "final.ckpt"), checkpoint(whole / "checkpoints" / "final.ckpt")
    assert a["global_step"] == b["global_step"]
    assert_equal(a["state_dict"], b["state_dict"], f"{name} parameters")
    assert_equal(a["optimizer_states"], b["optimizer_states"], f"{name} optimizer state")
    assert_equal(a.get("lr_schedulers"), b.get("lr_schedulers"), f"{name} lr schedulers")
    assert_equal(history_state(a), history_state(b), f"{name} history")
    reported = [json.loads((d / "metrics.json").read_text())["history"] for d in (resumed, whole)]
    curves = [{key: v for key, v in h.items() if not key.startswith("perf/")} for h in reported]  # timings differ
    assert_equal(curves[0], curves[1], f"{name} metrics.json history")
    for key in get(name).val_metrics:
        if curves[1].get(key):
            assert k in [step for step, _ in curves[0][key]], f"{name}: the resumed history lacks {key} at step {k}"


# The child trains, and once step k + 1 has trained (the step-k checkpoint written) says so and waits
# to be killed, so the SIGKILL lands at a known step.
CHILD = textwrap.dedent("""
    import json, sys, time
    from pathlib import Path
    import lightning as L, torch
    from repro.runner import RunSpec, run
    from repro.trainer import TrainerArgs

    raw, out, at, threads = json.loads(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    torch.set_num_threads(threads)  # the parent's, so the steps before and after the kill compute alike

    class Wait(L.Callback):
        def on_train_batch_end(self, trainer, *args):
            if trainer.global_step == at:
                (out / "ready").write_text("")
                time.sleep(600)

    run(RunSpec(**{**raw, "trainer": TrainerArgs(**raw["trainer"])}), out=out, callbacks=[Wait()])
""")


def test_run_killed_by_sigkill_resumes_like_an_uninterrupted_one(tmp_path: Path) -> None:
    spec, k = golden_spec("pretrain", tmp_path)
    killed_out, whole_out = tmp_path / "killed", tmp_path / "whole"
    killed_out.mkdir()
    log = (tmp_path / "child.log").open("w")
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, json.dumps(asdict(spec)), str(killed_out), str(k + 1), str(torch.get_num_threads())],
        cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))},
    )
    try:
        whole = run(spec, out=whole_out)  # meanwhile, the uninterrupted run
        deadline = time.monotonic() + 300
        while not (killed_out / "ready").exists():
            assert child.poll() is None, f"the child exited ({child.returncode}): {(tmp_path / 'child.log').read_text()[-2000:]}"
            assert time.monotonic() < deadline, "the child never reached the step after its checkpoint"
            time.sleep(0.2)
        os.kill(child.pid, signal.SIGKILL)
        assert child.wait(timeout=60) == -signal.SIGKILL
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        log.close()
    (killed,) = (killed_out / "pretrain").iterdir()
    assert not (killed / "report.md").exists() and not (killed / "checkpoints" / "final.ckpt").exists()
    assert_checkpoint_holds_its_validation(killed, "pretrain", k)
    assert main(["--resume", str(killed)]) == 0
    assert_resumed_like_uninterrupted(killed, whole, "pretrain", k)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(name for name, t in techniques().items() if t.trains))
def test_every_technique_stopped_after_a_checkpoint_resumes_like_an_uninterrupted_one(name: str, tmp_path: Path) -> None:
    spec, k = golden_spec(name, tmp_path)
    out = tmp_path / "runs"  # one for both runs, so the prerequisite stages train once
    whole = run(spec, out=out)
    with pytest.raises(RuntimeError, match="stopped"):
        run(spec, out=out, callbacks=[Stop(k + 1)])
    (stopped,) = [p for p in (out / name).iterdir() if p != whole and not p.name.startswith("stage-")]
    assert_checkpoint_holds_its_validation(stopped, name, k)
    run(resume=stopped, out=out)
    assert_resumed_like_uninterrupted(stopped, whole, name, k)
