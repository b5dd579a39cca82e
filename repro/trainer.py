"""Trainer assembly: strategy, precision, callbacks and checkpointing, the same for every technique."""

from __future__ import annotations

import fnmatch
import importlib.util
import re
import warnings
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import get_args

import lightning as L
import torch
from lightning.fabric.connector import _PRECISION_INPUT_STR, _PRECISION_INPUT_STR_ALIAS
from lightning.pytorch.accelerators import AcceleratorRegistry
from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy, ModelParallelStrategy, Strategy, StrategyRegistry

from evaluation import TASKS_DIR
from modules.nn import Block

from modules.parallel.plan import ParallelPlan, Plan
from repro.config import ConfigError, _suggest
from repro.callbacks import History, LossProgressBar, RandomState, SpeedMonitor, StepCheckpoint


@dataclass
class TrainConfig:
    """Loop settings shared by every technique (the `train.` section of a preset)."""

    max_steps: int = field(default=1000, metadata={"min": 1})
    accumulate: int = field(default=1, metadata={"min": 1})  # micro-batches per optimizer step
    grad_clip: float = field(default=1.0, metadata={"min": 0})  # 0: no clipping
    val_every: int = field(default=100, metadata={"min": 1})  # optimizer steps between validations
    val_batches: int | None = field(default=None, metadata={"min": 1})  # None: the whole validation split
    checkpoint_every: int = field(default=100, metadata={"min": 1})  # optimizer steps between `last.ckpt` saves
    speed_window: int = field(default=10, metadata={"min": 1})  # optimizer steps per tokens/s measurement
    compile: bool = False  # torch.compile the training step
    peak_tflops: float | None = field(default=None, metadata={"gt": 0})  # None: measure the bf16 matmul rate on GPU
    # recompute activations in backward (modules/parallel/plan.py): none, full (every block), every_k (blocks
    # 0, k, 2k, ...), attention (each block's token mixer) or mlp (each block's MLP)
    activation_checkpointing: str = "none"
    activation_checkpointing_every: int = field(default=2, metadata={"min": 1})  # k of every_k

    def __post_init__(self) -> None:
        ParallelPlan(self.activation_checkpointing, self.activation_checkpointing_every)  # raises on a bad policy

    @property
    def plan(self) -> ParallelPlan:
        return ParallelPlan(self.activation_checkpointing, self.activation_checkpointing_every)


@dataclass
class EvalConfig:
    """How a run scores its final checkpoint through lm-eval (the `eval.` section of a preset)."""

    enabled: bool = True
    # None: the technique's own tasks (`Technique.eval_tasks`)
    tasks: list[str] | None = field(default=None, metadata={"check": lambda names: unknown_task(names)})
    limit: int | None = field(default=None, metadata={"min": 1})  # documents per task; None: all of them
    batch_size: int = field(default=16, metadata={"min": 1})  # scores move slightly with it (padding), so the report states it


# a task's, group's or tag's name in lm-eval task YAML: on the key's line, or as the list under it
_TASK_NAME = re.compile(r"^(?:task|group|tag):[ \t]*([^\s#][^\n#]*)?\n((?:[ \t]+-[^\n]*\n|-[ \t][^\n]*\n)*)", re.M)


@cache
def _task_names(root: Path) -> frozenset[str]:
    """The task, group and tag names that the YAML under `root` declares, read as text: lm-eval's TaskManager
    takes 10-15 s to index its 14,000 builtin files, reading their names about 2."""
    names = set()
    for path in root.rglob("*.yaml"):
        for match in _TASK_NAME.finditer(path.read_text(errors="ignore")):
            line, items = match.group(1), re.findall(r"-[ \t]*([^\n#]+)", match.group(2))
            items = line.strip().strip("[]").split(",") if line else items
            names.update(item.strip().strip("'\"") for item in items)
    return frozenset(names)


def unknown_task(names: list[str]) -> str | None:
    """Why `eval.tasks` names something that is no task, group or tag of the suite (`evaluation/tasks/`) or of
    lm-eval, or a task file that is not there; None when every name is known. lm-eval's builtin names are read
    only for a name outside the suite (`repro_*` names are the suite's own)."""
    if not names:
        return "give at least one task, or leave eval.tasks unset for the technique's own"
    ours = _task_names(TASKS_DIR)
    for name in names:
        if name.endswith(".yaml"):
            if not Path(name).is_file():
                return f"no task file {name}"
            continue
        known = ours
        if not name.startswith("repro_") and not fnmatch.filter(ours, name):
            known = ours | _task_names(Path(importlib.util.find_spec("lm_eval").origin).parent / "tasks")
        if not fnmatch.filter(known, name):  # lm-eval takes glob patterns too
            return f"unknown task {name!r}.{_suggest(name, sorted(ours))[:-1]}, or any lm-eval task."
    return None


@dataclass
class TrainerArgs:
    """Lightning's own knobs, straight from the command line."""

    accelerator: str = "auto"
    devices: str | int = "auto"
    strategy: str = "auto"
    precision: str = "auto"  # auto: bf16-mixed on GPU, 32-true on CPU
    num_nodes: int = 1


STRATEGIES = "auto, ddp, ddp_spawn, fsdp (GPU), fsdp2, deepspeed_stage_1/2/3 and deepspeed_stage_2/3_offload (GPU)"


class FSDP2Strategy(ModelParallelStrategy):
    """FSDP2 (`fully_shard`, applied per block by `modules.parallel.plan.shard`) over every process as one
    data-parallel group: Lightning's ModelParallelStrategy with tensor parallelism off, saving the
    full state to one file (what resuming, lm-eval and the report read). Runs on CPUs too (gloo)."""

    def __init__(self) -> None:
        super().__init__(data_parallel_size="auto", tensor_parallel_size=1, save_distributed_checkpoint=False)

    def setup_environment(self) -> None:
        self._data_parallel_size = self.num_nodes * self.num_processes
        super().setup_environment()


class BlockFSDPStrategy(FSDPStrategy):
    """Lightning's FSDP (FSDP1) with one unit per decoder block, that keeps its root wrapper between stages.

    Lightning wraps the module again for each `validate` or `test` after `fit`, but skips the wrap when it
    finds FSDP units inside (the blocks of the first wrap): the root's own parameters (embeddings, final
    norm) then stay sharded views and the first forward fails. The wrapper of the first stage still owns
    them, so a later stage reuses it."""

    def __init__(self) -> None:
        super().__init__(auto_wrap_policy={Block})
        self._root: torch.nn.Module | None = None

    def _setup_model(self, model: torch.nn.Module) -> torch.nn.Module:
        if self._root is not None and getattr(self._root, "module", None) is model:
            return self._root
        self._root = super()._setup_model(model)
        return self._root


def _accelerator_error(name: str) -> str | None:
    """Why `--accelerator name` cannot run here, or None."""
    known = ["auto", "gpu", *sorted(AcceleratorRegistry.available_accelerators())]
    if name not in known:
        return f"unknown accelerator.{_suggest(name, known)}"
    if name == "gpu" and not (torch.cuda.is_available() or torch.backends.mps.is_available()):
        return "no GPU is visible here; use --accelerator cpu (or auto)"
    if name not in ("auto", "gpu") and not AcceleratorRegistry[name]["accelerator"].is_available():
        return f"no {name} device is visible here; use --accelerator cpu (or auto)"
    return None


def _devices_error(args: TrainerArgs) -> str | None:
    """Why `--devices` is not a count, -1 (all), auto or (on GPUs) a list of indices that exist, or None."""
    text = str(args.devices).strip()
    if text == "auto":
        return None
    parts = [part.strip() for part in text.strip("[]").split(",")]
    if not all(re.fullmatch(r"-?\d+", part) for part in parts):
        return "give a number of devices, -1 for all, auto, or GPU indices such as 0,1"
    numbers = [int(part) for part in parts]
    visible = torch.cuda.device_count() if on_gpu(args) else None
    if len(parts) == 1 and "," not in text and "[" not in text:  # a count
        if numbers[0] == 0 or numbers[0] < -1:
            return "give at least 1 device, -1 for all of them, or auto"
        if visible is not None and numbers[0] > visible:
            return f"only {visible} GPU(s) visible here"
        return None
    if visible is None:
        return "a list of device indices is for GPUs; on a CPU give a number of processes"
    if any(n < 0 or n >= visible for n in numbers):
        return f"GPU indices run from 0 to {visible - 1} here"
    return None


def check_trainer_args(args: TrainerArgs) -> None:
    """Refuse, before any folder is made, the flags Lightning refuses only once the Trainer is built (with a
    MisconfigurationException) or once training starts, and a strategy this machine cannot run."""
    if problem := _accelerator_error(args.accelerator):
        raise ConfigError(f"--accelerator {args.accelerator}: {problem}")
    if problem := _devices_error(args):
        raise ConfigError(f"--devices {args.devices}: {problem}")
    precisions = ["auto", *get_args(_PRECISION_INPUT_STR), *get_args(_PRECISION_INPUT_STR_ALIAS)]
    if str(args.precision) not in precisions:
        raise ConfigError(f"--precision {args.precision}: unknown precision.{_suggest(str(args.precision), precisions)}")
    strategies = ["auto", "fsdp2", *StrategyRegistry.available_strategies()]
    if args.strategy not in strategies:
        raise ConfigError(f"--strategy {args.strategy}: unknown strategy.{_suggest(args.strategy, strategies)}")
    if int(args.num_nodes) < 1:
        raise ConfigError(f"--num-nodes {args.num_nodes}: must be >= 1")
    if args.strategy.startswith("deepspeed") and not on_gpu(args):
        raise ConfigError(f"--strategy {args.strategy}: DeepSpeed runs on CUDA GPUs only (Lightning refuses it on a CPU); "
                          "on a CPU use --strategy ddp or fsdp2")
    if args.strategy == "fsdp" and not on_gpu(args):
        raise ConfigError("--strategy fsdp: Lightning's FSDP (FSDPStrategy) needs CUDA GPUs here; on a CPU use --strategy fsdp2 "
                          "(FSDP2 through ModelParallelStrategy, gloo)")


def build_strategy(args: TrainerArgs, manual: bool = False) -> str | Strategy:
    """`--strategy` as Lightning takes it, with the suite's sharding policy for the FSDP ones: one unit per
    decoder block (FSDP1 by auto-wrap, FSDP2 by `fully_shard` in `configure_model`). A module that steps its
    own optimizers (`manual`) may run several backward passes per step, each reaching only some parameters
    (one arm's): DDP then looks for the parameters each pass reached."""
    if args.strategy == "ddp" and manual:
        return DDPStrategy(find_unused_parameters=True)
    if args.strategy == "fsdp2":
        return FSDP2Strategy()
    if args.strategy == "fsdp":
        return BlockFSDPStrategy()
    if args.strategy.startswith("deepspeed") and args.strategy.endswith("offload"):
        # ZeRO-Offload: optimizer state and step on the host. DeepSpeed would insist on its own CPU Adam (a C++
        # extension built on first use); the suite's torch AdamW runs there instead, unfused, as DeepSpeed allows.
        strategy = StrategyRegistry.get(args.strategy)
        strategy.config["zero_force_ds_cpu_optimizer"] = False
        return strategy
    return args.strategy


def on_gpu(args: TrainerArgs) -> bool:
    return args.accelerator in ("gpu", "cuda") or (args.accelerator == "auto" and torch.cuda.is_available())


def resolve_precision(args: TrainerArgs) -> str:
    if args.precision != "auto":
        return args.precision
    return "bf16-mixed" if on_gpu(args) else "32-true"


# Manual optimisation (SFT's two arms) saves checkpoints after the step, as automatic optimisation does;
# Lightning warns that it cannot save the state before it, which no run here wants.
warnings.filterwarnings("ignore", message="Using ModelCheckpoint with manual optimization")


def check_manual_optimization(train: TrainConfig, clipping: str, accumulation: str) -> None:
    """A technique that steps its own optimizers clips and accumulates itself: `train.grad_clip` must be 0
    and `train.accumulate` 1; the errors say, after the setting's name, `clipping` and `accumulation`."""
    if train.grad_clip:
        raise ConfigError(f"train.grad_clip: {clipping}")
    if train.accumulate != 1:
        raise ConfigError(f"train.accumulate: {accumulation}")


def build_trainer(
    train: TrainConfig, args: TrainerArgs, run_dir: Path, callbacks: list[L.Callback] = (), step_metrics: tuple[str, ...] = ("train/loss",),
    val_metrics: tuple[str, ...] = ("val/loss", "val/ppl"), manual: bool = False,
) -> L.Trainer:
    """A Trainer whose one epoch is the whole run: `max_steps` optimizer steps; `step_metrics` (each step) and
    `val_metrics` (each validation) go in the history."""
    batches = train.max_steps * train.accumulate
    torch.set_float32_matmul_precision("high")  # TF32 for any fp32 matmul left on a GPU
    # saved after a validation of the same step, so a resumed run keeps that validation's point
    checkpoint = StepCheckpoint(run_dir / "checkpoints", train.checkpoint_every, min(train.val_every, train.max_steps))
    return L.Trainer(
        accelerator=args.accelerator,
        devices=args.devices,
        strategy=build_strategy(args, manual),
        precision=resolve_precision(args),
        num_nodes=args.num_nodes,
        max_steps=train.max_steps,
        max_epochs=1,
        limit_train_batches=batches,
        accumulate_grad_batches=train.accumulate,
        gradient_clip_val=train.grad_clip or None,
        val_check_interval=min(train.val_every, train.max_steps) * train.accumulate,
        check_val_every_n_epoch=None,
        limit_val_batches=train.val_batches if train.val_batches is not None else 1.0,
        num_sanity_val_steps=0,
        callbacks=[
            SpeedMonitor(train.speed_window, train.peak_tflops),
            History(step_keys=tuple(step_metrics), val_keys=tuple(val_metrics)),
            LossProgressBar(refresh_rate=10 if on_gpu(args) else 1),  # each refresh waits for the GPU
            RandomState(),
            checkpoint,
            Plan(train.plan),  # activation checkpointing (and FSDP2's sharding), applied in the module's configure_model
            *callbacks,
        ],
        logger=False,
        default_root_dir=run_dir,
        use_distributed_sampler=False,  # the datamodules shard their own resumable samplers
        enable_model_summary=False,
    )
