"""The technique registry: a name maps to everything a run needs, so nothing branches on names.

A technique lives in one file under `repro/techniques/` that calls `register(...)`; its presets
live in `repro/configs/<name>/<preset>.yaml`. Adding a technique touches no other technique.
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import repro.techniques as package
from repro.config import ConfigError, _suggest, presets

if TYPE_CHECKING:
    import lightning as L

    from reports.claims import ClaimResult
    from repro.trainer import TrainConfig


@dataclass
class Findings:
    """What a technique concludes from its run: extra metrics, claim verdicts, notes and sections for the report."""

    metrics: dict[str, Any]
    claims: list["ClaimResult"]
    notes: list[str] = field(default_factory=list)
    sections: dict[str, list[str]] = field(default_factory=dict)  # extra report sections: title -> Markdown lines


@dataclass(frozen=True)
class Fit:
    """A model a technique trains besides its main one (a PPO arm beside DPO's, SL-CAI, RL-CAI), declared so that the
    runner trains it as it trains the main model (`repro.runner.train_fit`): through `build_trainer`, so `--strategy`,
    `--devices`, `--precision`, checkpoints (`fits/<name>/checkpoints/`), `--resume`, the history and the progress bar
    reach it. `module` and `datamodule` are built when the fit starts, after the run's seed is set again."""

    name: str
    module: Callable[[], "L.LightningModule"]
    datamodule: Callable[[], "L.LightningDataModule"]
    train: "TrainConfig"
    step_metrics: tuple[str, ...] = ("train/loss",)
    val_metrics: tuple[str, ...] = ()


@dataclass(frozen=True)
class Technique:
    """Everything the runner needs to know about one technique.

    build(config, seed, stages) -> (LightningModule, LightningDataModule), where stages maps each
        technique in `requires` to the final checkpoint of its run (trained first, or reused)
    fits(config, module, datamodule, seed) -> [Fit]: the further models its run trains once the main one is
        trained (every rank trains each, in order); findings then gets them as `fits`, name -> trained module
    findings(config, final_metrics, module, datamodule, speed_records[, fits]) -> Findings: the
        technique's own metrics and its claim checks, computed from the finished run; final_metrics
        holds the last validation's metrics and the lm-eval scores as `eval/<task>/<metric>`
    """

    name: str
    summary: str
    config: type
    module: type["L.LightningModule"] | None = None  # its checkpoints load with module.load_from_checkpoint; `.model` is the Decoder
    build: Callable[[Any, int, dict[str, Path]], tuple["L.LightningModule", "L.LightningDataModule"]] | None = None
    findings: Callable[..., "Findings"] | None = None
    fits: Callable[[Any, "L.LightningModule", "L.LightningDataModule", int], list[Fit]] | None = None
    # a technique that trains nothing (a simulator, a calculator) measures instead: measure(config, seed, run_dir)
    # -> Findings, and the runner writes its report as a training run's; golden trajectories and train-step
    # benchmarks are for the techniques that train
    measure: Callable[[Any, int, Path], "Findings"] | None = None
    default_preset: str = "tiny"
    aliases: tuple[str, ...] = ()  # other names `get` answers to (the paper's or the model's name)
    requires: tuple[str, ...] = field(default=())
    # lm-eval tasks or groups its final checkpoint is scored on (evaluation/tasks/ or lm-eval's own)
    eval_tasks: tuple[str, ...] = ("repro_corpus_ppl", "repro_cloze", "repro_verifiable", "repro_verifiable_arithmetic_mc")
    # metrics logged every optimizer step and kept in the run's history (metrics.json, plots)
    step_metrics: tuple[str, ...] = ("train/loss",)
    # metrics of each validation kept in the history
    val_metrics: tuple[str, ...] = ("val/loss", "val/ppl")
    # what its golden trajectory (repro/golden.py) pins, step by step, and the overrides that shrink
    # its default preset to a few seconds ("{corpus}" and "{cache}" are filled in by repro.golden)
    golden_metrics: tuple[str, ...] = ("train/loss", "val/loss")
    golden_overrides: tuple[str, ...] = ()
    # settings that shorten a run's setup without changing what one training step computes (fewer
    # sampled prompts, say; never a shape): benchmark cases and their prerequisite stages use them
    quick: tuple[str, ...] = ()
    # False: its run trains in one process only, and more (--devices, --num-nodes) is refused before any work
    distributed: bool = True

    def __post_init__(self) -> None:
        if (self.measure is None) == (self.build is None or self.findings is None or self.module is None):
            raise ValueError(f"technique {self.name!r}: give module, build and findings (it trains), or measure (it does not)")

    @property
    def trains(self) -> bool:
        return self.measure is None

    @property
    def presets(self) -> list[str]:
        return presets(self.name)


_REGISTRY: dict[str, Technique] = {}


def register(technique: Technique) -> Technique:
    taken = set(_REGISTRY) | {alias for t in _REGISTRY.values() for alias in t.aliases}
    for name in (technique.name, *technique.aliases):
        if name in taken:
            raise ValueError(f"technique name {name!r} registered twice")
    _REGISTRY[technique.name] = technique
    return technique


_discovered = False


def _discover() -> None:
    """Import every module of `repro.techniques` once (each registers itself); one imported directly
    before this ran must not hide the others."""
    global _discovered

    for info in pkgutil.iter_modules(package.__path__):
        importlib.import_module(f"{package.__name__}.{info.name}")
    _discovered = True


def techniques() -> dict[str, Technique]:
    if not _discovered:
        _discover()
    return dict(_REGISTRY)


def get(name: str) -> Technique:
    table = techniques()
    table |= {alias: t for t in table.values() for alias in t.aliases}
    if name not in table:
        raise ConfigError(f"unknown technique {name!r}.{_suggest(name, list(table))}")
    return table[name]
