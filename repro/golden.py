"""Golden trajectories: each technique's first training steps on a fixed corpus, stored and re-checked.

    python -m repro.golden                    # re-run every technique, print what moved, exit 1 if anything did
    python -m repro.golden --update           # the same, then rewrite tests/golden/<technique>.json
    python -m repro.golden --technique dpo    # one technique (repeatable)

A trajectory is a short run of the technique's default preset shrunk to seconds by its
`golden_overrides` (pretraining's are `SHRINK`; a technique that starts from a pretrained stage
shrinks that stage with `pretrain.`-prefixed ones), seed 0, on a corpus this module writes from a seeded
grammar (`write_corpus`), so it depends on neither the network nor the interpreter's standard
library. It always trains on the CPU in float32 (`HARDWARE`), wherever it is run: on a GPU the trainer's
defaults would pick CUDA and bf16-mixed, whose numbers no CPU golden holds. It records every step of the technique's `golden_metrics` (the training loss, and for
later techniques their reward, KL, MaxVio, acceptance rate, ...) with the versions that made it.
`tests/test_golden.py` re-runs each and names the technique, the first step and the metric that
moved, with both values. On one machine the CPU run is bit-for-bit repeatable; across CPU
generations and vendors float32 kernels may differ in the last bits (1.9e-5 relative on rlhf's ppo/score
from the recording machine to an AMD EPYC), hence the tolerance, far below any
change a code edit makes (a factor of 1.01 on a loss is a relative change of 1e-2).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import random
import re
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

if __package__ in (None, ""):  # run as a script: make the project's packages importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import lightning
import tokenizers
import torch

from repro import registry
from repro.runner import RunSpec, run
from repro.trainer import TrainerArgs

GOLDEN_DIR = Path(__file__).resolve().parent.parent / "tests" / "golden"
RTOL, ATOL = 1e-4, 1e-6  # rlhf's ppo/score moved 1.9e-5 from the recording CPU to an AMD EPYC
SEED = 0
HARDWARE = {"accelerator": "cpu", "devices": 1, "precision": "32-true"}  # TrainerArgs of every trajectory
CORPUS = ["data.source={corpus}", "data.cache_dir={cache}"]  # filled in by `record`
SHRINK = [  # a 2-layer, 32-wide model; 12 steps of 8 x 32 tokens; no lm-eval, checkpoints only at the end
    "data.vocab_size=300",
    "data.batch_size=8",
    "model.block_size=32",
    "model.n_layer=2",
    "model.n_head=2",
    "model.n_embd=32",
    "optim.warmup_steps=2",
    "optim.lr=1e-2",
    "train.max_steps=12",
    "train.val_every=6",
    "train.val_batches=2",
    "train.checkpoint_every=12",
    "train.speed_window=4",
    "eval.enabled=false",
]

_NOUNS = "model layer token batch cache tensor kernel gradient loss optimizer step corpus word sentence".split()
_VERBS = "reads writes updates computes returns stores samples scales shifts masks caches counts".split()
_ADJS = "small large fast slow sparse dense first last random fixed causal shared".split()


def write_corpus(folder: Path, documents: int = 60, sentences: int = 40) -> Path:
    """`documents` .txt files of sentences from a small seeded grammar (about 150 KB): text with
    structure a 2-layer model learns within a dozen steps, identical on every machine."""
    rng = random.Random(1234)
    folder.mkdir(parents=True, exist_ok=True)
    for d in range(documents):
        lines = []
        for _ in range(sentences):
            subject = f"the {rng.choice(_ADJS)} {rng.choice(_NOUNS)}"
            obj = f"{rng.choice(['a', 'the', 'every'])} {rng.choice(_NOUNS)}"
            number = rng.randrange(100)
            lines.append(f"{subject.capitalize()} {rng.choice(_VERBS)} {obj} {number} times.")
        paragraphs = [" ".join(lines[i : i + 5]) for i in range(0, len(lines), 5)]  # ~250-character paragraphs
        (folder / f"doc{d:03d}.txt").write_text("\n\n".join(paragraphs) + "\n")
    return folder


def versions() -> dict[str, str]:
    return {"python": platform.python_version(), "torch": torch.__version__, "lightning": lightning.__version__,
            "tokenizers": tokenizers.__version__, "machine": platform.machine()}


def record(name: str, workdir: Path | None = None, extra: Sequence[str] = ()) -> dict[str, Any]:
    """Run technique `name`'s golden trajectory; its metrics per step, the command that made it, the versions.
    `extra` overrides go after the golden ones: a setting that must not move the trajectory (a faster kernel)."""
    technique = registry.get(name)
    with tempfile.TemporaryDirectory(prefix=f"golden-{name}-") as tmp:
        root = Path(workdir or tmp)
        corpus = write_corpus(root / "corpus")
        overrides = [o.format(corpus=corpus, cache=root / "cache") for o in technique.golden_overrides] + list(extra)
        spec = RunSpec(name, technique.default_preset, overrides, seed=SEED, trainer=TrainerArgs(**HARDWARE))
        run_dir = run(spec, out=root / "runs")
        history = json.loads((run_dir / "metrics.json").read_text())["history"]
    missing = [k for k in technique.golden_metrics if not history.get(k)]
    if missing:
        raise ValueError(f"{name}: the run logged no {', '.join(missing)} (Technique.golden_metrics)")
    return {
        "technique": name,
        "preset": technique.default_preset,
        "overrides": list(technique.golden_overrides),
        "seed": SEED,
        "tolerance": {"rtol": RTOL, "atol": ATOL},
        "versions": versions(),
        "metrics": {k: [[int(step), float(value)] for step, value in history[k]] for k in technique.golden_metrics},
    }


@dataclass(frozen=True)
class Drift:
    technique: str
    metric: str
    step: int | None
    golden: float | None
    now: float | None

    def __str__(self) -> str:
        if self.step is None:
            return f"{self.technique}: {self.metric} is in one trajectory and not the other"
        if self.golden is None or self.now is None:
            return f"{self.technique}: {self.metric} at step {self.step}: golden {self.golden}, now {self.now} (steps differ)"
        rel = abs(self.now - self.golden) / max(abs(self.golden), 1e-12)
        return (f"{self.technique}: {self.metric} moved first at step {self.step}: golden {self.golden:.6g}, "
                f"now {self.now:.6g} (relative change {rel:.2e})")


def compare(golden: dict[str, Any], now: dict[str, Any]) -> list[Drift]:
    """The first step at which each metric left the golden values (beyond rtol/atol), one Drift per metric."""
    tol = golden.get("tolerance", {"rtol": RTOL, "atol": ATOL})
    name, drifts = golden["technique"], []
    for metric in sorted(set(golden["metrics"]) | set(now["metrics"])):
        if metric not in golden["metrics"] or metric not in now["metrics"]:
            drifts.append(Drift(name, metric, None, None, None))
            continue
        old, new = dict(golden["metrics"][metric]), dict(now["metrics"][metric])
        for step in sorted(set(old) | set(new)):
            a, b = old.get(step), new.get(step)
            if a is None or b is None or not math.isclose(b, a, rel_tol=tol["rtol"], abs_tol=tol["atol"]):
                drifts.append(Drift(name, metric, int(step), a, b))
                break
    return drifts


def dumps(trajectory: dict[str, Any]) -> str:
    """JSON with one line per (step, value) pair, so a diff of the file reads step by step."""
    text = json.dumps(trajectory, indent=1)
    return re.sub(r"\[\s+(-?\d+),\s+(\S+?)\s+\]", r"[\1, \2]", text) + "\n"


def path_for(name: str) -> Path:
    return GOLDEN_DIR / f"{name}.json"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--technique", action="append", help="only this technique (repeatable; default: all registered)")
    parser.add_argument("--update", action="store_true", help="write the new trajectories to tests/golden/")
    args = parser.parse_args(argv)
    names = args.technique or sorted(name for name, t in registry.techniques().items() if t.trains)
    unknown = [n for n in names if n not in registry.techniques()]
    if unknown:
        print(f"error: unknown technique {', '.join(unknown)}; registered: {', '.join(sorted(registry.techniques()))}", file=sys.stderr)
        return 2
    moved = False
    for name in names:
        now = record(name)
        path = path_for(name)
        if path.is_file():
            golden = json.loads(path.read_text())
            drifts = compare(golden, now)
            moved |= bool(drifts)
            print(f"{name}: " + ("unchanged" if not drifts else "MOVED"))
            for drift in drifts:
                print(f"  {drift}")
            if golden["versions"] != now["versions"]:
                print(f"  versions then {golden['versions']}, now {now['versions']}")
        else:
            moved = True
            print(f"{name}: no golden trajectory yet ({path})")
        if args.update:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(dumps(now))
            print(f"  wrote {path}")
    return 0 if args.update or not moved else 1


if __name__ == "__main__":
    sys.exit(main())
