"""The technique registry: a name maps to everything a run needs, so nothing branches on names.

A technique lives in one file under `repro/techniques/` that calls `register(...)`; its presets
live in `repro/configs/<name>/<preset>.yaml`. Adding a technique touches no other technique.
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping

import repro.techniques as package
from repro.config import ConfigError, _suggest, presets

if TYPE_CHECKING:
    import lightning as L

    from reports.claims import ClaimResult
    from repro.trainer import TrainConfig


@dataclass
class Findings:
    """What a run concludes (`repro.runner.conclude`): its metrics, claim verdicts, notes and sections for the report."""

    metrics: dict[str, Any]
    claims: list["ClaimResult"]
    notes: list[str] = field(default_factory=list)
    sections: dict[str, list[str]] = field(default_factory=dict)  # extra report sections: title -> Markdown lines


@dataclass
class Measured:
    """What one measurement step adds to a run: metrics (into metrics.json, beside the validation metrics and lm-eval
    scores, where `claims` reads them), and for the report notes and sections (title -> Markdown lines). A step may also
    write files (plots, raw records) into the run folder."""

    metrics: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    sections: dict[str, list[str]] = field(default_factory=dict)


@dataclass
class Finished:
    """The finished run a measurement step reads. `metrics` holds the last validation's metrics, the lm-eval scores as
    `eval/<task>/<metric>` and what the earlier steps measured; `module` and `datamodule` are None for a technique that
    trains nothing, `fits` maps each declared further model to its trained module."""

    config: Any
    run_dir: Path
    seed: int
    metrics: dict[str, Any]
    module: "L.LightningModule | None" = None
    datamodule: "L.LightningDataModule | None" = None
    speed: list[dict[str, float]] = field(default_factory=list)  # SpeedMonitor's records
    fits: dict[str, "L.LightningModule"] = field(default_factory=dict)
    stages: dict[str, Path] = field(default_factory=dict)  # each prerequisite's final checkpoint
    device: str = "cpu"  # where the run trained, or for one that trains nothing where --accelerator puts its work
    # what a step hands to later steps of the same run (a model it trained, its generations): kept in memory only,
    # never read by claims
    state: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Step:
    """A measurement the runner makes once training is done (decode timing, sampling, lm-eval per arm, a simulation):
    `run(finished) -> Measured`, on rank 0, in the order the technique declares its steps, each with its time kept in
    metrics.json as `steps/<name>/seconds`."""

    name: str
    run: Callable[[Finished], Measured]


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
        trained (every rank trains each, in order); the steps read them as `Finished.fits`, name -> trained module
    steps: the measurements the runner makes on the finished run (`Step`), in order; their metrics go to metrics.json
    claims(config, metrics) -> [ClaimResult]: the verdicts, a pure function of the run's config and its metrics
        (validation, lm-eval scores, the steps'), so a test can check them on a dict without training
    """

    name: str
    summary: str
    config: type
    # module and build: None for a technique that trains nothing (a simulator, a calculator, a decoding algorithm over
    # its stages' models): its steps measure, and golden trajectories and train-step benchmarks are for those that train
    module: type["L.LightningModule"] | None = None  # its checkpoints load with module.load_from_checkpoint; `.model` is the Decoder
    build: Callable[[Any, int, dict[str, Path]], tuple["L.LightningModule", "L.LightningDataModule"]] | None = None
    fits: Callable[[Any, "L.LightningModule", "L.LightningDataModule", int], list[Fit]] | None = None
    steps: tuple[Step, ...] = ()
    claims: Callable[[Any, Mapping[str, Any]], list["ClaimResult"]] | None = None
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
        if self.claims is None:
            raise ValueError(f"technique {self.name!r}: give claims(config, metrics) (with the steps that measure them)")
        if (self.build is None) != (self.module is None):
            raise ValueError(f"technique {self.name!r}: give module and build (it trains), or neither (it only measures)")

    @property
    def trains(self) -> bool:
        return self.build is not None

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
