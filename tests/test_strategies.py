"""Strategies and activation checkpointing: the same numbers, whatever runs them.

One device, DDP on two processes and FSDP2 on two processes (gloo) give the same validation losses
and final weights for the same seed and global batch; every activation-checkpointing policy gives
the same gradients as none; what a machine cannot run is refused before any work.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from modules.nn import Decoder, DecoderConfig
from modules.parallel.plan import POLICIES, ParallelPlan, checkpoint_activations, shard
from repro import golden, registry
from repro.run import main

ROOT = Path(__file__).resolve().parent.parent
# What Lightning's launchers leave in the environment of the process that ran them (ddp_spawn sets MASTER_PORT in
# the parent; the script launcher also LOCAL_RANK, WORLD_SIZE, ...): a run started with them would reuse a port
# another process may hold by now, or, seeing LOCAL_RANK, take itself for a launched rank and wait for the others.
LAUNCHER_VARIABLES = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "GROUP_RANK", "LOCAL_RANK", "RANK", "WORLD_SIZE")


def run_environment() -> dict[str, str]:
    """This process's environment without launcher state or run folders of other runs, and one thread per process:
    each run picks its own free port, and every process (one, or two per rank) runs the same kernels whatever the
    machine's core count or what else runs beside it (Lightning's DDP would give each rank cores // 2 threads)."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARIABLES and not k.startswith("LLM_REPRO_RUN_DIR_")}
    return {**env, "OMP_NUM_THREADS": "1"}


def pretrain(tmp: Path, corpus: Path, name: str, *args: str, batch: int, val_batches: int, technique: str = "pretrain") -> Path:
    overrides = [f"data.source={corpus}", f"data.cache_dir={tmp / 'cache'}", "data.vocab_size=300", "model.block_size=32",
                 "model.n_layer=2", "model.n_head=2", "model.n_embd=32", "optim.warmup_steps=2", "optim.lr=1e-2",
                 "train.max_steps=8", "train.val_every=4", "train.checkpoint_every=8", "train.speed_window=4",
                 "eval.enabled=false", f"data.batch_size={batch}", f"train.val_batches={val_batches}"]
    return run_technique(tmp, name, technique, overrides, *args)


def run_technique(tmp: Path, name: str, technique: str, overrides: list[str], *args: str) -> Path:
    """`repro/run.py --technique <technique>` on the CPU in a process of its own; its run folder."""
    out = tmp / name
    command = [sys.executable, "repro/run.py", "--technique", technique, "--accelerator", "cpu", "--out", str(out), *args]
    command += [item for o in overrides for item in ("--set", o)]
    done = subprocess.run(command, cwd=ROOT, env=run_environment(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    folders = list((out / technique).iterdir())
    assert len(folders) == 1, folders  # every rank wrote into the one folder rank 0 made
    return folders[0]


def test_one_device_ddp_and_fsdp2_train_the_same_model(tmp_path: Path) -> None:
    """Global batch 8: one process of 8, or two of 4 (rank r takes rows r, r + 2, ... of the same shuffle,
    in training and in validation: two validation batches of 4 per rank read what two of 8 read on one)."""
    corpus = golden.write_corpus(tmp_path / "corpus")
    runs = {
        "single": pretrain(tmp_path, corpus, "single", "--devices", "1", batch=8, val_batches=2),
        "ddp": pretrain(tmp_path, corpus, "ddp", "--strategy", "ddp", "--devices", "2", batch=4, val_batches=2),
        "fsdp2": pretrain(tmp_path, corpus, "fsdp2", "--strategy", "fsdp2", "--devices", "2", batch=4, val_batches=2),
    }
    losses = {n: [v for _, v in json.loads((d / "metrics.json").read_text())["history"]["val/loss"]] for n, d in runs.items()}
    weights = {n: torch.load(d / "checkpoints" / "final.ckpt", weights_only=True)["state_dict"] for n, d in runs.items()}
    assert len(losses["single"]) == 2
    for name in ("ddp", "fsdp2"):
        torch.testing.assert_close(losses[name], losses["single"], rtol=1e-5, atol=0)
        assert weights[name].keys() == weights["single"].keys()
        for key, value in weights["single"].items():
            got = weights[name][key]
            if key.endswith("attn.qkv.bias"):
                # the key bias adds the same score to every key of a query: softmax ignores it, its true gradient
                # is 0, and Adam turns float noise there into steps of +-lr. Compare the query and value biases.
                got, value = torch.cat([got[:32], got[64:]]), torch.cat([value[:32], value[64:]])
            # Each tensor as a whole (a wrong gradient average, a missed all-reduce or a wrong data shard moves it by
            # 1e-2 and more; rounding apart, 5e-6 here), and no element by 1% of one lr=1e-2 step: an element whose
            # gradient sits near Adam's eps in some step turns rounding into a visible but small step (1.7e-5 seen),
            # while a step taken the wrong way moves it by 1e-2.
            assert ((got - value).norm() / value.norm()).item() < 1e-4, f"{name}: {key}"
            torch.testing.assert_close(got, value, rtol=0, atol=1e-4, msg=f"{name}: {key}")


def test_dpo_trains_its_dpo_and_ppo_arms_under_ddp(tmp_path: Path) -> None:
    """`--technique dpo --strategy ddp --devices 2`: the DPO arms (the main fit) and the PPO arm the technique declares
    (a `registry.Fit`) both train in two processes, with their checkpoints, and the PPO arm makes its frontier point."""
    corpus = golden.write_corpus(tmp_path / "corpus")
    overrides = [o.format(corpus=corpus, cache=tmp_path / "cache") for o in registry.get("dpo").golden_overrides]
    overrides += ["frontier.kl_targets=[2]", "frontier.ppo_steps=2", "frontier.ppo_batch_size=4", "frontier.ppo.response_tokens=8",
                  "frontier.ppo.minibatch_size=4"]
    run_dir = run_technique(tmp_path, "ddp", "dpo", overrides, "--strategy", "ddp", "--devices", "2")
    assert json.loads((run_dir / "env.json").read_text())["world_size"] == 2  # the DPO arms
    arm = json.loads((run_dir / "fits" / "ppo-kl2" / "history.json").read_text())
    assert (arm["strategy"], arm["world_size"]) == ("DDPStrategy", 2)  # the PPO arm
    assert [step for step, _ in arm["history"]["train/loss"]] == [1, 2]
    assert (run_dir / "fits" / "ppo-kl2" / "checkpoints" / "final.ckpt").is_file()
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert "frontier/ppo-kl2/true_reward" in metrics["metrics"] and "ppo-kl2/train/loss" in metrics["history"]


@pytest.mark.parametrize("strategy", [pytest.param("ddp", marks=pytest.mark.slow), "fsdp2"])
def test_moe_arms_over_two_processes_see_the_global_expert_load(tmp_path: Path, strategy: str) -> None:
    """The MoE technique (dense, no balancing, aux loss, loss-free, loss-free + sequence loss) on two
    processes: DDP (five backward passes a step, one per arm) or FSDP2 (each process holds half of every
    expert stack). Each step's expert loads (and so MaxVio and the loss-free biases) and the aux loss's f
    are the global batch's, so every arm matches one process."""
    corpus = golden.write_corpus(tmp_path / "corpus")
    args = ("model.moe_experts=4",)
    one = pretrain(tmp_path, corpus, "single", "--devices", "1", *[x for a in args for x in ("--set", a)], batch=8,
                   val_batches=2, technique="moe")
    two = pretrain(tmp_path, corpus, strategy, "--strategy", strategy, "--devices", "2", *[x for a in args for x in ("--set", a)],
                   batch=4, val_batches=2, technique="moe")
    metrics = [json.loads((d / "metrics.json").read_text())["metrics"] for d in (one, two)]
    loads = [torch.load(d / "checkpoints" / "final.ckpt", weights_only=True)["moe_loads"] for d in (one, two)]
    assert loads[0] == loads[1]  # every arm, every step, every layer: the same slots per expert
    assert sum(loads[1]["loss-free"][0][0]) == 8 * 32 * 2  # the first step counted both processes' tokens, top-2
    for arm in ("dense", "no-balancing", "aux-loss", "loss-free", "loss-free+seq"):
        assert metrics[1][f"{arm}/val_loss"] == pytest.approx(metrics[0][f"{arm}/val_loss"], rel=1e-5), arm
        assert metrics[1][f"{arm}/maxvio_global"] == metrics[0][f"{arm}/maxvio_global"], arm


def gradients(model: Decoder, idx: torch.Tensor) -> dict[str, torch.Tensor]:
    model.zero_grad()
    model.loss(idx[:, :-1], idx[:, 1:]).backward()
    return {n.replace("._checkpoint_wrapped_module", ""): p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("pattern", ["a", "mam"], ids=["transformer", "hybrid"])
@pytest.mark.parametrize("policy", [p for p in POLICIES if p != "none"])
def test_checkpointing_leaves_gradients_and_state_dict_keys_unchanged(policy: str, pattern: str) -> None:
    config = DecoderConfig(vocab_size=64, block_size=16, n_layer=3, n_head=2, n_embd=16, layer_pattern=pattern, mamba_d_state=4)
    torch.manual_seed(0)
    plain = Decoder(config)
    torch.manual_seed(0)
    recomputed = Decoder(config)
    wrapped = checkpoint_activations(recomputed, ParallelPlan(policy, every=2))
    assert wrapped == {"full": 3, "every_k": 2, "attention": 3, "mlp": 3}[policy]
    assert recomputed.state_dict().keys() == plain.state_dict().keys()
    idx = torch.randint(0, 64, (2, 17), generator=torch.Generator().manual_seed(1))
    expected, got = gradients(plain, idx), gradients(recomputed, idx)
    for name, grad in expected.items():
        assert torch.equal(got[name], grad), name


def test_checkpointing_refuses_to_recompute_a_router() -> None:
    config = DecoderConfig(vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=16, mlp="swiglu", moe_experts=4)
    with pytest.raises(ValueError, match="count its expert loads twice"):
        checkpoint_activations(Decoder(config), ParallelPlan("full"))
    assert checkpoint_activations(Decoder(config), ParallelPlan("attention")) == 2
    with pytest.raises(ValueError, match="train.activation_checkpointing='some'"):
        ParallelPlan("some")


def test_fsdp2_refuses_modules_that_train_more_than_decoders() -> None:
    from modules.training.mtp import MTPModule

    module = MTPModule(dict(vocab_size=64, block_size=16, n_layer=1, n_head=2, n_embd=16), {}, {}, 4)
    with pytest.raises(ValueError, match="fsdp2 shards decoders only; this technique also trains extras"):
        shard(module, mesh=None)


@pytest.mark.parametrize("strategy, fragment", [
    ("deepspeed_stage_2", "DeepSpeed runs on CUDA GPUs only"),
    ("deepspeed_stage_3_offload", "DeepSpeed runs on CUDA GPUs only"),
    ("fsdp", "use --strategy fsdp2"),
])
def test_strategies_a_cpu_cannot_run_stop_before_any_work(capsys, tmp_path: Path, strategy: str, fragment: str) -> None:
    assert main(["--technique", "pretrain", "--accelerator", "cpu", "--strategy", strategy, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and fragment in err, err
    assert not any(tmp_path.iterdir())


def test_the_memory_technique_sweeps_policies_in_processes_of_their_own(tmp_path: Path) -> None:
    """`--technique memory`, shrunk, on the CPU whatever the machine has: the run, then two cases (none, full) each in
    its own process, in the report with their theory; on a CPU the activation claims say why they are not measured."""
    from repro.registry import get
    from repro.runner import RunSpec, run
    from repro.trainer import TrainerArgs

    corpus = golden.write_corpus(tmp_path / "corpus")
    overrides = [o.format(corpus=corpus, cache=tmp_path / "cache") for o in get("memory").golden_overrides]
    overrides = [o for o in overrides if not o.startswith("sweep.")]
    overrides += ["sweep.policies=[none,full]", "sweep.strategies=[auto]", "sweep.steps=2", "sweep.warmup=1"]
    run_dir = run(RunSpec("memory", "tiny", overrides, seed=0, trainer=TrainerArgs(accelerator="cpu")), out=tmp_path / "runs")
    records = json.loads((run_dir / "memory.json").read_text())
    assert [(r["strategy"], r["checkpointing"]) for r in records] == [("auto", "none"), ("auto", "full")]
    assert all("error" not in r and r["ms_per_step"] > 0 and r["train_loss"] == records[0]["train_loss"] for r in records)
    report = (run_dir / "report.md").read_text()
    assert "| auto | full |" in report and "activation memory is measured on CUDA" in report
