"""`--technique pipeline`: the whole path in one command, each stage cached and resumable, one report.

tokenizers -> pretrain -> SFT -> alignment (DPO, on its reward model) -> quantization and speculative
decoding (`inference`) -> serving. Every stage is the suite's own technique run, at the pipeline's preset
where the technique has it (else its default), with `pipeline.overrides.<technique>` added. Each stage's
folder is named by a hash of its resolved config and seed (as the runner names prerequisite stages), so
running the pipeline again reuses every finished stage, resumes a training stage from its last checkpoint,
and retrains only what changed; the stages the techniques themselves require (pretrain under SFT, say) are
the same folders. The last stage serves the chosen stage's model with `repro/serve.py` on loopback, sends
it a completion request and a malformed one, and stops it. The report links every stage's report.
"""

from __future__ import annotations

import json
import shutil
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from reports.claims import ClaimResult
from repro import registry
from repro.registry import Finished, Measured, Step, Technique, register
from repro.runner import RunSpec, _load_spec, run, stage_checkpoint, stage_dir
from repro.serve import Server

STAGES = ["tokenizers", "pretrain", "sft", "dpo", "inference"]


@dataclass
class ServeSettings:
    """The `pipeline.serve.` section: which stage's model is served at the end, and the request sent to it."""

    stage: str | None = "dpo"  # None: no serving
    prompt: str = "def "
    max_tokens: int = 16


@dataclass
class PipelineSettings:
    stages: list[str] = field(default_factory=lambda: list(STAGES))
    overrides: dict[str, list[str]] = field(default_factory=dict)  # per technique: its `--set` items
    serve: ServeSettings = field(default_factory=ServeSettings)

    def __post_init__(self) -> None:
        if isinstance(self.serve, dict):
            self.serve = ServeSettings(**self.serve)
        known = registry.techniques()
        for name in [*self.stages, *self.overrides]:
            if name not in known or name == "pipeline":
                raise ValueError(f"pipeline: {name!r} is not a technique it can run; choose from "
                                 f"{', '.join(sorted(set(known) - {'pipeline'}))}")
        if not self.stages:
            raise ValueError("pipeline.stages is empty: name the techniques to run, in order")
        stage = self.serve.stage
        if stage is not None and (stage not in self.stages or not registry.get(stage).trains):
            raise ValueError(f"pipeline.serve.stage={stage!r}: serve the model of a training stage in pipeline.stages "
                             f"({', '.join(s for s in self.stages if registry.get(s).trains)}), or null for none")


@dataclass
class PipelineConfig:
    pipeline: PipelineSettings = field(default_factory=PipelineSettings)


def stage_overrides(name: str, settings: PipelineSettings) -> list[str]:
    """A stage's own overrides, and its prerequisites' prefixed with their names (`pretrain.train.max_steps=...`),
    so that the stage it requires is the very run the pipeline ran for that technique."""
    own = list(settings.overrides.get(name, []))
    return own + [f"{req}.{o}" for req in registry.get(name).requires for o in stage_overrides(req, settings)]


def run_stage(spec: Any, out: Path) -> tuple[Path, bool]:
    """(the stage's run folder, whether it was reused): a training technique through the runner's own stage
    cache; a measuring one in the same `stage_dir`, rerun unless its report exists."""
    folder = stage_dir(spec, out)
    if registry.get(spec.technique).trains:
        reused = (folder / "checkpoints" / "final.ckpt").is_file()
        return stage_checkpoint(spec, out).parent.parent, reused
    if (folder / "report.md").is_file():
        return folder, True
    shutil.rmtree(folder, ignore_errors=True)
    return run(spec, out=out, run_dir=folder), False


def serve_and_ask(run_dir: Path, settings: ServeSettings) -> dict[str, Any]:
    """Start `repro/serve.py`'s server on the run's model on loopback, send a completion and a malformed request."""
    def post(url: str, body: bytes) -> tuple[int, dict[str, Any], float]:
        request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
        start = time.perf_counter()
        try:
            with urllib.request.urlopen(request, timeout=120) as response:
                return response.status, json.loads(response.read()), time.perf_counter() - start
        except urllib.error.HTTPError as error:
            return error.code, json.loads(error.read()), time.perf_counter() - start

    with Server.from_checkpoint(run_dir, port=0) as server:  # serving from here until the block ends
        url = f"{server.url}/v1/completions"
        body = {"prompt": settings.prompt, "max_tokens": settings.max_tokens, "temperature": 0}
        status, answer, seconds = post(url, json.dumps(body).encode())
        bad_status, bad, _ = post(url, b"{not json")
        after, _, _ = post(url, json.dumps(body).encode())  # still up after the bad one
    return {"url": url, "status": status, "text": answer["choices"][0]["text"] if status == 200 else None,
            "usage": answer.get("usage"), "seconds": seconds, "malformed_status": bad_status,
            "malformed_error": bad.get("error", {}).get("message"), "status_after_malformed": after}


def _stage_spec(name: str, finished: Finished) -> RunSpec:
    """The run of stage `name`: at the pipeline's preset where the technique has it, with the stage's overrides and
    the pipeline's seed and trainer flags."""
    parent, technique = _load_spec(finished.run_dir), registry.get(name)
    preset = parent.preset if parent.preset in technique.presets else technique.default_preset
    return RunSpec(name, preset, stage_overrides(name, finished.config.pipeline), finished.seed, parent.trainer)


def _stages(finished: Finished) -> Measured:
    """Every stage run (or reused) in order: its seconds and whether it was reused, and a table linking its report."""
    out = finished.run_dir.parent.parent
    rows, metrics = [], {}
    for name in finished.config.pipeline.stages:
        spec = _stage_spec(name, finished)
        start = time.perf_counter()
        folder, reused = run_stage(spec, out)
        seconds = time.perf_counter() - start
        rows.append(f"| {name} | {spec.preset} | [{folder.relative_to(out)}](../../{folder.relative_to(out)}/report.md) | "
                    f"{'reused' if reused else 'ran'} | {seconds:.1f} | {_verdicts(folder)} |")
        metrics.update({f"{name}/seconds": seconds, f"{name}/reused": float(reused)})
    notes = ["Each stage is a run of its own technique, with its own report, claims and command; this report links them. "
             "Run the same command again and every finished stage is reused (`this time: reused`)."]
    return Measured(metrics, notes, {"Stages": ["| stage | preset | run (its report) | this time | seconds | claims |",
                                                "|---|---|---|---|---:|---|", *rows]})


def _serve(finished: Finished) -> Measured:
    """The chosen stage's model served and asked (serving.json), when `pipeline.serve.stage` names one."""
    settings = finished.config.pipeline.serve
    if settings.stage is None:
        return Measured()
    # the stage ran in the step before: its folder is the runner's stage folder for its spec
    served = serve_and_ask(stage_dir(_stage_spec(settings.stage, finished), finished.run_dir.parent.parent), settings)
    (finished.run_dir / "serving.json").write_text(json.dumps(served, indent=2))
    request = json.dumps({"prompt": settings.prompt, "max_tokens": settings.max_tokens, "temperature": 0})
    section = [
        f"`repro/serve.py` served the {settings.stage} stage's model at {served['url']}: `{request}` "
        f"answered {served['status']} in {served['seconds']:.2f} s with {json.dumps(served['text'])} ({served['usage']}); "
        f"a malformed body got {served['malformed_status']} (\"{served['malformed_error']}\"), and the next request "
        f"{served['status_after_malformed']}."]
    return Measured({"serve/status": served["status"], "serve/seconds": served["seconds"],
                     "serve/malformed_status": served["malformed_status"]}, sections={"Serving": section})


def claims(config: PipelineConfig, metrics: Mapping[str, Any]) -> list[ClaimResult]:
    """None of its own: each stage's report holds its technique's claims, and the Stages table counts their verdicts."""
    return []


def _verdicts(folder: Path) -> str:
    """The stage report's claim verdicts, counted (from its metrics.json)."""
    path = folder / "metrics.json"
    if not path.is_file():
        return ""
    counts: dict[str, int] = {}
    for claim in json.loads(path.read_text()).get("claims", []):
        counts[claim.get("verdict", "?")] = counts.get(claim.get("verdict", "?"), 0) + 1
    return ", ".join(f"{n} {v}" for v, n in counts.items())


register(
    Technique(
        name="pipeline",
        summary="tokenizer -> pretrain -> SFT -> DPO -> quantization and speculative decoding -> serving, cached per stage",
        config=PipelineConfig,
        steps=(Step("stages", _stages), Step("serve", _serve)),
        claims=claims,
    )
)
