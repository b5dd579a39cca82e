"""A technique's training step (forward + backward + optimizer), timed inside the Trainer a run uses.

`time_train_step` resolves a preset the way `repro/run.py` does, builds the module and datamodule
with the technique's own `build`, and calls `fit` on the Trainer `repro.trainer.build_trainer`
assembles for every run. The step timed is therefore the one a run takes: Lightning's loop, the
precision plugin, gradient clipping, accumulation, the LR scheduler, logging, the run's callbacks
and data loading. A hand-written loop over `training_step` and `configure_optimizers` would time
a step no run takes, and would need its own code for techniques that optimise manually.

A step's time runs from the end of the previous optimizer step to the end of this one (device
synchronised); tokens per step are counted from the batches the step consumed. On CPU a
calibration block (`benchmarks/calibration.py`) runs after each step, outside its time, so the
regression gate can divide by a machine speed taken at the same moments as the steps.
"""

from __future__ import annotations

import statistics
import sysconfig
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import lightning as L
import torch

from benchmarks.calibration import calibration_block
from measurement.hardware import peak_memory_bytes
from repro.callbacks import batch_tokens
from repro.runner import RunSpec, resolve, stage_checkpoint, stage_spec
from repro.trainer import TrainerArgs, build_trainer, resolve_precision

EMBEDDED_CORPUS = "python-docs"  # `data.source` of presets that read the embedded corpus
SAMPLE_MODULES = ["argparse", "calendar", "colorsys", "csv", "difflib", "fractions", "textwrap", "string", "shlex",
                  "heapq", "bisect", "fnmatch"]
STAGE_STEPS = 2  # a prerequisite stage only has to produce a checkpoint of the right shape


def write_sample_corpus(folder: Path) -> Path:
    """About 200 KB of the embedded corpus's kind of text (12 standard-library modules) as .txt files."""
    folder.mkdir(parents=True, exist_ok=True)
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for name in SAMPLE_MODULES:
        (folder / f"{name}.txt").write_text((stdlib / f"{name}.py").read_text(encoding="utf-8"))
    return folder


def bench_overrides(name: str, preset: str, max_steps: int, corpus: Path | None, cache: Path) -> list[str]:
    """Overrides that make a preset a benchmark run: `max_steps` steps, no validation and no checkpoint
    during them (one validation batch after the last, which no step's time includes), the technique's
    `quick` settings, and, where the preset reads the embedded corpus, `corpus` in its place (built under
    `cache`), so the case times the step rather than a 30-second corpus build."""
    technique, config = resolve(RunSpec(name, preset))
    items = [f"train.max_steps={max_steps}", "train.val_batches=1", f"train.val_every={max_steps}",
             "train.checkpoint_every=1000000000", *technique.quick]
    if corpus is not None and getattr(getattr(config, "data", None), "source", None) == EMBEDDED_CORPUS:
        items += [f"data.source={corpus}", f"data.cache_dir={cache}"]
    return items


def stage_overrides(name: str, preset: str, corpus: Path | None, cache: Path) -> list[str]:
    """Overrides that make technique `name` a quick prerequisite: `STAGE_STEPS` steps at its preset's shapes,
    no lm-eval, and the same for its own prerequisites (prefixed with their names)."""
    technique, config = resolve(RunSpec(name, preset))
    overrides = bench_overrides(name, preset, STAGE_STEPS, corpus, cache)
    overrides += ["eval.enabled=false"] if hasattr(config, "eval") else []
    for required in technique.requires:
        stage = stage_spec(required, RunSpec(name, preset))
        overrides += [f"{required}.{o}" for o in stage_overrides(required, stage.preset, corpus, cache)]
    return overrides


def bench_stage(name: str, dependent: RunSpec, corpus: Path | None, cache: Path, out: Path) -> Path:
    """Final checkpoint of a short run of prerequisite `name`: the dependent's step needs its shapes, not its quality."""
    spec = stage_spec(name, dependent)
    return stage_checkpoint(replace(spec, overrides=stage_overrides(name, spec.preset, corpus, cache)), out)


class PeakMemory:
    """Peak memory over a stretch of work: CUDA max allocated, or on CPU the process's peak resident set.

    On Linux the CPU peak is reset at `reset()` (writing 5 to /proc/self/clear_refs resets VmHWM),
    so it covers the stretch alone; elsewhere it is the process's peak so far (`scope` says which).
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.scope = "timed steps"

    def reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        try:
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            self.scope = "process so far"

    def peak(self) -> int:
        if self.device.type == "cuda" or self.scope != "timed steps":
            return peak_memory_bytes(self.device)
        return _proc_status_kib("VmHWM") * 1024


def resident_bytes() -> int | None:
    """Current resident set of this process (Linux), or None."""
    try:
        return _proc_status_kib("VmRSS") * 1024
    except OSError:
        return None


def _proc_status_kib(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise OSError(f"no {key} in /proc/self/status")


class StepClock(L.Callback):
    """Wall time and tokens of each optimizer step after `warmup` steps; on CPU a calibration block
    between steps, outside their time. Runs after the run's own callbacks, so their work is in the step."""

    def __init__(self, device: torch.device, warmup: int) -> None:
        self.device, self.warmup = device, warmup
        self.memory = PeakMemory(device)
        self.seconds: list[float] = []
        self.tokens: list[int] = []
        self.calibration: list[float] = []
        self._tokens = 0
        self._start = 0.0
        self.static: list[int] = []  # CUDA memory allocated as each timed step starts: weights, optimizer state

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        if self.device.type == "cuda" and trainer.global_step > self.warmup and batch_idx % trainer.accumulate_grad_batches == 0:
            self.static.append(torch.cuda.memory_allocated(self.device))

    def _now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        self._tokens += batch_tokens(pl_module, batch)
        if (batch_idx + 1) % trainer.accumulate_grad_batches:
            return
        end = self._now()
        if trainer.global_step > self.warmup:
            self.seconds.append(end - self._start)
            self.tokens.append(self._tokens)
        self._tokens = 0
        if self.device.type == "cpu" and trainer.global_step >= self.warmup:
            self.calibration.append(calibration_block())
        if trainer.global_step == self.warmup:
            self.memory.reset()
        self._start = self._now()


def time_train_step(
    name: str,
    preset: str,
    device: torch.device,
    workdir: Path,
    corpus: Path | None = None,
    shared: Path | None = None,
    warmup: int = 3,
    steps: int = 16,
    peak_tflops: float | None = None,
    strategy: str = "auto",
    overrides: list[str] = (),
) -> dict[str, Any]:
    """Train `warmup + steps` optimizer steps of technique `name` at `preset`; figures of the last `steps`.

    ms_per_step and tokens_per_s are taken at the median step (one preempted step does not move
    them). `corpus` replaces the embedded corpus where the preset reads it; its data cache and any
    prerequisite stages (short runs of their own presets) go under `shared`, which cases of one
    session may share, else under `workdir`. MFU needs `peak_tflops` (CUDA).
    """
    shared = shared or workdir
    cache = shared / "cache"
    overrides = [*bench_overrides(name, preset, warmup + steps, corpus, cache), *overrides]
    if peak_tflops:
        overrides.append(f"train.peak_tflops={peak_tflops}")
    trainer_args = TrainerArgs(accelerator="gpu" if device.type == "cuda" else "cpu", devices=1, strategy=strategy)
    spec = RunSpec(name, preset, overrides, seed=0, trainer=trainer_args)
    technique, config = resolve(spec)
    stages = {req: bench_stage(req, spec, corpus, cache, shared / "stages") for req in technique.requires}
    resident_before = resident_bytes()
    L.seed_everything(spec.seed, workers=True, verbose=False)
    module, datamodule = technique.build(config, spec.seed, stages)
    clock = StepClock(device, warmup)
    trainer = build_trainer(config.train, spec.trainer, workdir / "run", [clock])
    trainer.fit(module, datamodule)

    seconds = statistics.median(clock.seconds)
    tokens = statistics.median(clock.tokens)
    peak = clock.memory.peak()
    result: dict[str, Any] = {
        "technique": name, "preset": preset, "device": device.type, "precision": resolve_precision(spec.trainer),
        "warmup_steps": warmup, "steps": len(clock.seconds), "tokens_per_step": tokens,
        "tokens_per_s": tokens / seconds, "ms_per_step": 1e3 * seconds,
        "ms_per_step_mean": 1e3 * statistics.mean(clock.seconds), "ms_per_step_min": 1e3 * min(clock.seconds),
        "peak_mem_gib": peak / 2**30, "peak_mem_scope": clock.memory.scope,
    }
    loss = trainer.callback_metrics.get("train/loss")
    if loss is not None:  # the last step's loss: the same seed and batches give the same value under any strategy
        result["train_loss"] = float(loss)
    if clock.static:  # what forward and backward add on top of weights and optimizer state: activations, gradients
        result["static_mem_gib"] = max(clock.static) / 2**30
        result["activation_mem_gib"] = (peak - max(clock.static)) / 2**30
    if device.type == "cpu":
        result["calibration_s"] = statistics.median(clock.calibration)
        result["calibration"] = "between steps"
        if resident_before is not None:
            result["mem_delta_gib"] = (peak - resident_before) / 2**30  # what the run added to the process
    model = getattr(module, "model", None)
    if peak_tflops and hasattr(model, "flops_per_token"):
        result["mfu"] = result["tokens_per_s"] * model.flops_per_token() / (peak_tflops * 1e12)
    return result
