"""One run of one technique: config -> train -> validate -> lm-eval -> claim checks -> report."""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import yaml
from lightning.pytorch.utilities import rank_zero_info

from reports.env import collect_env
from reports.writer import write_report
from repro import registry
from repro.callbacks import History, SpeedMonitor
from repro.checkpoints import check_weights_only, locate
from repro.config import ConfigError, apply_overrides, build_config, load_preset
from repro.evaluate import evaluate, result_rows, write_results
from repro.trainer import TrainerArgs, build_trainer, check_trainer_args, on_gpu


@dataclass
class RunSpec:
    """What identifies a run; written to `run.json` so `--resume` can rebuild it."""

    technique: str
    preset: str
    overrides: list[str] = field(default_factory=list)
    seed: int = 0
    trainer: TrainerArgs = field(default_factory=TrainerArgs)
    init: str | None = None  # a run folder or checkpoint of the first prerequisite, used instead of training it

    def command(self) -> str:
        """The command line that reproduces this run."""
        args = ["python", "repro/run.py", "--technique", self.technique, "--preset", self.preset, "--seed", str(self.seed)]
        args += [arg for item in self.overrides for arg in ("--set", item)]
        args += ["--init", self.init] if self.init else []
        defaults = TrainerArgs()
        for name, value in asdict(self.trainer).items():
            if value != getattr(defaults, name):
                args += [f"--{name.replace('_', '-')}", str(value)]
        return " ".join(shlex.quote(a) for a in args)


def resolve(spec: RunSpec, prefix: str = "") -> tuple[registry.Technique, Any]:
    """Look the technique up and build its validated config, and those of the prerequisite stages it would
    train (their keys spelt with the stage's name, `sft.train.max_steps`); raises ConfigError before any work."""
    technique = registry.get(spec.technique)
    own = [o for o in spec.overrides if not o.startswith(tuple(f"{name}." for name in technique.requires))]
    values = apply_overrides(load_preset(technique.name, spec.preset), own)
    check_trainer_args(spec.trainer)
    if not technique.distributed and (str(spec.trainer.devices) not in ("1", "auto") or int(spec.trainer.num_nodes) != 1):
        raise ConfigError(f"--devices {spec.trainer.devices} --num-nodes {spec.trainer.num_nodes}: {technique.name} runs in "
                          "one process (its generation steps between fits are not shared over ranks); drop them")
    config = build_config(technique.config, values, prefix)
    for name in technique.requires[1 if spec.init else 0 :]:
        resolve(stage_spec(name, spec), f"{prefix}{name}.")
    return technique, config


def _shared_key(spec: RunSpec) -> str:
    """The environment variable through which the processes Lightning launches for the other ranks of a
    run (each re-runs the command) find the folder rank 0 made for it, instead of making their own."""
    digest = hashlib.sha256(json.dumps(asdict(spec), sort_keys=True, default=str).encode()).hexdigest()
    return f"LLM_REPRO_RUN_DIR_{digest[:16]}"


def _run_dir(out: Path, spec: RunSpec) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    run_dir = out / spec.technique / f"{spec.preset}-s{spec.seed}-{stamp}"
    suffix = 1
    while run_dir.exists():
        run_dir = run_dir.with_name(f"{run_dir.name.rsplit('.', 1)[0]}.{suffix}")
        suffix += 1
    return run_dir


def _load_spec(run_dir: Path) -> RunSpec:
    path = run_dir / "run.json"
    if not path.is_file():
        raise ConfigError(f"--resume {run_dir}: no run.json there; pass a run folder written by run.py")
    raw = json.loads(path.read_text())
    return RunSpec(**{**raw, "trainer": TrainerArgs(**raw["trainer"])})


def resume_point(path: Path) -> tuple[Path, Path]:
    """(run folder, checkpoint) for `--resume`, given a run folder or a checkpoint inside one; a checkpoint that
    holds more than tensors and plain data is refused (ConfigError) before anything runs."""
    path = Path(path)
    if path.suffix == ".ckpt":
        if not path.is_file():
            raise ConfigError(f"--resume {path}: no such checkpoint")
        return path.parent.parent, check_weights_only(path)
    checkpoint = path / "checkpoints" / "last.ckpt"
    if not checkpoint.is_file():
        raise ConfigError(f"--resume {path}: no checkpoints/last.ckpt there (the run saved none yet); start it afresh")
    return path, check_weights_only(checkpoint)


def stage_spec(name: str, dependent: RunSpec) -> RunSpec:
    """The prerequisite run a dependent run needs: same preset name where one exists, same seed and
    hardware, and the dependent's overrides that start with the stage's name (that prefix removed)."""
    technique = registry.get(name)
    preset = dependent.preset if dependent.preset in technique.presets else technique.default_preset
    # `--set <stage>.<section>.<key>=<value>` on the dependent run sets the stage's own config
    overrides = [o.removeprefix(f"{name}.") for o in dependent.overrides if o.startswith(f"{name}.")]
    return RunSpec(name, preset, overrides, dependent.seed, dependent.trainer)


def init_checkpoint(technique: registry.Technique, init: str) -> Path:
    """The checkpoint `--init` names for the technique's first prerequisite, checked to be one of its runs and to
    hold only tensors and plain data (else ConfigError, before anything runs)."""
    if not technique.requires:
        raise ConfigError(f"--init: {technique.name} starts from no checkpoint; drop --init")

    checkpoint, run_dir = locate(init)
    made_by = json.loads((run_dir / "run.json").read_text())["technique"] if (run_dir / "run.json").is_file() else None
    if made_by != technique.requires[0]:
        raise ConfigError(f"--init {init}: a {technique.name} run starts from a {technique.requires[0]} run; "
                          f"this one is {made_by or 'not a run folder'}")
    return check_weights_only(checkpoint)


def stage_dir(spec: RunSpec, out: Path) -> Path:
    """The folder of a stage run: named by a hash of its resolved config and seed, so a changed preset
    makes a new stage and an unchanged one is found again."""
    _, config = resolve(spec)
    digest = hashlib.sha256(json.dumps([asdict(config), spec.seed], sort_keys=True, default=str).encode()).hexdigest()
    return Path(out) / spec.technique / f"stage-{spec.preset}-s{spec.seed}-{digest[:12]}"


def stage_checkpoint(spec: RunSpec, out: Path) -> Path:
    """Final checkpoint of a prerequisite stage (`stage_dir`), trained only if no run of the same config and
    seed exists."""
    run_dir = stage_dir(spec, out)
    final = run_dir / "checkpoints" / "final.ckpt"
    if not final.is_file():
        # every rank sees the same: the processes a fit launches reach here before rank 0 can train a step with them
        if (run_dir / "checkpoints" / "last.ckpt").is_file():
            run(resume=run_dir, out=out)
        elif _shared_key(spec) in os.environ:  # another rank of that stage's run, launched by its rank 0
            run(spec, out=out, run_dir=run_dir)
        else:
            shutil.rmtree(run_dir, ignore_errors=True)
            run(spec, out=out, run_dir=run_dir)
    return final


def run(
    spec: RunSpec | None = None,
    out: Path = Path("runs"),
    resume: Path | None = None,
    callbacks: list[L.Callback] = (),
    run_dir: Path | None = None,
) -> Path:
    """Train (after any prerequisite stages), validate and report one technique; returns the run folder."""
    checkpoint = None
    if resume is not None:
        run_dir, checkpoint = resume_point(resume)
        spec = _load_spec(run_dir)
    technique, config = resolve(spec)
    init = {technique.requires[0]: init_checkpoint(technique, spec.init)} if spec.init else {}
    shared = os.environ.get(_shared_key(spec))
    if shared is not None:  # a process Lightning launched for another rank of this run: rank 0 made the folder
        run_dir = Path(shared)
    elif resume is None:
        run_dir = run_dir or _run_dir(Path(out), spec)
        run_dir.mkdir(parents=True)
        (run_dir / "run.json").write_text(json.dumps(asdict(spec), indent=2))
        (run_dir / "config.yaml").write_text(yaml.safe_dump(asdict(config), sort_keys=False))
    # Set before any stage trains: the processes a multi-process fit launches (at the command's first fit, a stage's
    # maybe) re-run the command, and find through it the folder of this run and of each stage rank 0 has begun.
    os.environ[_shared_key(spec)] = str(run_dir)
    try:
        stages = {**init, **{name: stage_checkpoint(stage_spec(name, spec), out) for name in technique.requires[len(init):]}}
        if stages and shared is None and resume is None:  # the checkpoints this run started from
            (run_dir / "stages.json").write_text(json.dumps({k: str(v) for k, v in stages.items()}, indent=2))
        L.seed_everything(spec.seed, workers=True, verbose=False)
        if not technique.trains:
            return _measure_and_report(technique, spec, config, run_dir, stages)
        module, datamodule = technique.build(config, spec.seed, stages)
        trained = train(module, datamodule, config.train, spec, run_dir, technique.step_metrics, technique.val_metrics, checkpoint,
                        callbacks)
        return _validate_and_report(technique, spec, config, trained, datamodule, run_dir, stages)
    except BaseException:
        if shared is None and resume is None:  # rank 0 of a fresh run: a folder with no checkpoint holds nothing to resume
            _discard(run_dir)
        raise
    finally:
        if shared is None:
            os.environ.pop(_shared_key(spec), None)


def _discard(run_dir: Path) -> None:
    """Remove the folder of a run that failed before its first checkpoint: it holds nothing to resume. One with
    checkpoints stays, whatever failed."""
    if not (run_dir / "checkpoints").exists():
        shutil.rmtree(run_dir, ignore_errors=True)


@dataclass
class Trained:
    """A model `train` fitted: the module (on the device it trained on), its Trainer, and its history (metric ->
    [(step, value)]; on rank 0)."""

    module: L.LightningModule
    trainer: L.Trainer
    history: dict[str, list]


def train(module: L.LightningModule, datamodule: L.LightningDataModule, settings: Any, spec: RunSpec, folder: Path,
          step_metrics: tuple[str, ...], val_metrics: tuple[str, ...], start: Path | None = None,
          callbacks: list[L.Callback] = ()) -> Trained:
    """The one way a model of a run is trained, the technique's main model and each further one it declares: a Trainer
    from `build_trainer` (the run's --strategy, --devices, --precision; its `train.` settings: checkpoints under
    `folder`, the parallel plan, the history, the progress bar), fitted from `start` (a checkpoint to resume, or
    None), and its final state saved as `folder/checkpoints/final.ckpt`."""
    trainer = build_trainer(settings, spec.trainer, folder, list(callbacks), step_metrics, val_metrics,
                            manual=not module.automatic_optimization)
    trainer.fit(module, datamodule, ckpt_path=start, weights_only=True)  # tensors and plain data only
    final = folder / "checkpoints" / "final.ckpt"
    if start != final:
        trainer.save_checkpoint(final, weights_only=False)  # the full state: --resume and fine-tuning read it
    history = next(c for c in trainer.callbacks if isinstance(c, History)).series
    # Lightning's teardown moved the module to the host (DeepSpeed stage 3's partitioned weights too): back first
    return Trained(module.to(trainer.strategy.root_device), trainer, history)


def _validate_and_report(technique, spec, config, trained: Trained, datamodule, run_dir, stages) -> Path:
    trainer, module = trained.trainer, trained.module
    if trainer.is_global_zero and hasattr(datamodule, "tokenizer"):
        datamodule.tokenizer.save(str(run_dir / "tokenizer.json"))  # the run folder stands alone for inference
    final = {k: float(v) for k, v in trainer.validate(module, datamodule, verbose=False)[0].items()}
    # every rank trains the technique's further models, in the order it declares them
    declared = technique.fits(config, module, datamodule, spec.seed) if technique.fits is not None else []
    fits = {fit.name: train_fit(fit, run_dir, spec) for fit in declared}

    if trainer.is_global_zero:
        evaluation = _evaluate(run_dir, config, trainer)
        _report(run_dir, technique, spec, config, trained, datamodule, final, evaluation, fits, stages)
    return run_dir


def train_fit(fit: registry.Fit, run_dir: Path, spec: RunSpec | None = None) -> Trained:
    """Train a model a technique declares besides its main one (`registry.Fit`) as the main one is trained (`train`),
    after setting the run's seed again, with checkpoints and history under `fits/<name>/`. One that finished in an
    earlier attempt of the run is restored from its final.ckpt (with the history it saved), one cut short resumes
    from its last.ckpt. Every rank of a multi-process run calls it, in the same order."""
    spec = spec or _load_spec(run_dir)
    folder = run_dir / "fits" / fit.name
    saved, record = folder / "checkpoints", folder / "history.json"
    L.seed_everything(spec.seed, workers=True, verbose=False)
    module, datamodule = fit.module(), fit.datamodule()
    final = saved / "final.ckpt"
    start = final if final.is_file() else saved / "last.ckpt" if (saved / "last.ckpt").is_file() else None
    trained = train(module, datamodule, fit.train, spec, folder, fit.step_metrics, fit.val_metrics, start)
    if start == final and record.is_file():  # restored, not trained: its history is the attempt's that trained it
        trained.history = json.loads(record.read_text())["history"]
    elif trained.trainer.is_global_zero:
        record.write_text(json.dumps({"strategy": type(trained.trainer.strategy).__name__, "world_size": trained.trainer.world_size,
                                      "history": trained.history}, indent=1))
    return trained


def _measure_and_report(technique: registry.Technique, spec: RunSpec, config: Any, run_dir: Path, stages: dict[str, Path]) -> Path:
    """A technique that trains nothing: its measurements, then the same report as a training run's."""
    device = "cuda" if on_gpu(spec.trainer) else "cpu"  # where a Trainer with the run's flags would put its work
    findings = conclude(technique, registry.Finished(config, run_dir, spec.seed, {}, stages=stages, device=device))
    write_report(run_dir, technique=technique.name, title=f"{technique.name}: {technique.summary} (preset {spec.preset}, "
                 f"seed {spec.seed})", command=spec.command(), config=asdict(config), env=collect_env(spec.seed, asdict(spec.trainer)),
                 history={}, metrics=findings.metrics, claims=findings.claims, notes=findings.notes, sections=findings.sections)
    return run_dir


def conclude(technique: registry.Technique, finished: registry.Finished) -> registry.Findings:
    """Run the technique's measurement steps on the finished run, in order, then its claims on the metrics they leave:
    the metrics (the run's own and the steps'), the verdicts, and the steps' notes and sections for the report."""
    notes: list[str] = []
    sections: dict[str, list[str]] = {}
    for index, step in enumerate(technique.steps, 1):
        rank_zero_info(f"{technique.name}: measuring {step.name} ({index}/{len(technique.steps)})")
        start = time.perf_counter()
        measured = step.run(finished)
        finished.metrics |= {**measured.metrics, f"steps/{step.name}/seconds": time.perf_counter() - start}
        notes += measured.notes
        sections |= measured.sections
    return registry.Findings(metrics=finished.metrics, claims=technique.claims(finished.config, finished.metrics),
                             notes=notes, sections=sections)


def _evaluate(run_dir: Path, config: Any, trainer: L.Trainer) -> dict | None:
    """Score the final checkpoint with lm-eval on the technique's tasks (or `eval.tasks`); write
    eval.json and eval.md; return the report's evaluation section, or None when `eval.enabled` is off."""
    settings = getattr(config, "eval", None)
    if settings is None or not settings.enabled:
        return None

    # tasks None: `evaluate` takes the run's own, the config's `eval.tasks` or else the technique's
    results = evaluate(run_dir, settings.tasks, settings.limit, settings.batch_size, str(trainer.strategy.root_device))
    write_results(results, run_dir)
    return {
        "rows": result_rows(results),
        "batch size": settings.batch_size,
        "limit": settings.limit,
        "lm-eval": results.get("lm_eval_version"),
    }


def _report(run_dir, technique, spec, config, trained, datamodule, final, evaluation, fits, stages) -> None:
    trainer, module, history = trained.trainer, trained.module, trained.history
    speed = next(c for c in trainer.callbacks if isinstance(c, SpeedMonitor)).records
    # claims may rest on lm-eval scores too: `eval/<task>/<metric>` beside the validation metrics
    scores = {f"eval/{r['task']}/{r['metric']}": r["value"] for r in (evaluation or {}).get("rows", [])}
    # Lightning's teardown after fit and validate leaves the module on the CPU: a technique's own measurements
    # (decoding, sampling, arms' lm-eval) belong on the device the run trained on
    module.to(trainer.strategy.root_device)
    models = {name: fit.module for name, fit in fits.items()}
    findings = conclude(technique, registry.Finished(config, run_dir, spec.seed, {**final, **scores}, module, datamodule, speed,
                                                     fits=models, stages=stages, device=str(trainer.strategy.root_device)))
    env = collect_env(spec.seed, {"corpus_hash": getattr(datamodule, "corpus_hash", None), **asdict(spec.trainer),
                                  "world_size": trainer.world_size})  # the processes that trained it, whatever was asked
    if speed:
        history = {**history, "perf/tokens_per_s": [(r["step"], r["tokens_per_s"]) for r in speed]}
    for name, fit in fits.items():  # each further model's own history, its keys under its name
        history |= {f"{name}/{key}": series for key, series in fit.history.items()}
    write_report(
        run_dir,
        technique=technique.name,
        title=f"{technique.name}: {technique.summary} (preset {spec.preset}, seed {spec.seed})",
        command=spec.command(),
        config=asdict(config),
        env=env,
        history=history,
        metrics=findings.metrics,
        claims=findings.claims,
        notes=findings.notes,
        evaluation=evaluation,
        sections=findings.sections,
    )
