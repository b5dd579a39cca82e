"""Hogwild! inference (Rodionov et al. 2025): W workers of one model generate at once over one shared KV cache.

Trains nothing of its own: the SFT stage's chat model (its `arm`) answers `rows` sums of `terms` numbers
(`evaluation/parallel_sum.py`) with 1, 2, 4, ... workers sharing one cache (`modules/decoding/hogwild.py`), greedy; the run
ends when a worker closes its line. The claim is the paper's: several workers reach a valid joint answer in fewer
sequential forward passes than one. Whether the answer is valid is only testable on a model that can do the task:
where one worker answers too few rows right, the report says so instead of a verdict.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch

from evaluation.parallel_sum import compare, sum_rows
from reports.claims import ClaimResult, check_above, check_below, not_measured
from repro.checkpoints import load_model
from repro.registry import Finished, Measured, Step, Technique, register

SOURCE = "Hogwild! Inference (Rodionov et al. 2025), arXiv:2504.06261"
# Below this share of rows one worker answers right, the model cannot do the task and accuracy cannot compare.
MIN_ACCURACY = 0.2
# "A valid joint output": the workers answer at least nine in ten of the rows one worker answers right.
ACCURACY_FACTOR = 0.9


@dataclass
class SumsConfig:
    """The `sums.` section: the verifiable task and how the workers run on it."""

    rows: int = 40
    terms: int = 8
    workers: list[int] = field(default_factory=lambda: [1, 2, 4])
    max_new_tokens: int = 16  # per worker: the prompt plus workers x this must fit the model's context

    def __post_init__(self) -> None:
        if self.rows < 1 or self.terms < 2 or self.max_new_tokens < 1:
            raise ValueError(f"sums: need rows >= 1, terms >= 2, max_new_tokens >= 1; got {self.rows}, {self.terms}, "
                             f"{self.max_new_tokens}")
        if sorted(set(self.workers)) != self.workers or self.workers[0] != 1 or len(self.workers) < 2:
            raise ValueError(f"sums.workers={self.workers}: give increasing worker counts starting at 1 (the sequential "
                             "baseline), e.g. [1, 2, 4]")


@dataclass
class HogwildConfig:
    """A hogwild preset: which of the SFT stage's models runs (`arm`) and the task."""

    arm: str = "full"  # SFT's full fine-tune; "lora" is its adapter arm
    sums: SumsConfig = field(default_factory=SumsConfig)


def _sums(finished: Finished) -> Measured:
    config = finished.config
    model, tokenizer = load_model(finished.stages["sft"], finished.device, config.arm)
    rows = sum_rows(config.sums.rows, seed=finished.seed, terms=config.sums.terms)
    with torch.inference_mode():
        result = compare(model, tokenizer, rows, config.sums.workers, config.sums.max_new_tokens)
    (finished.run_dir / "hogwild.json").write_text(json.dumps({str(w): r for w, r in result.items()}, indent=2))
    metrics = {f"workers/{w}/{key}": value for w, r in result.items() for key, value in r.items()}
    table = ["| workers | forward passes to finish | tokens written | finished | accuracy | seconds |",
             "|---:|---:|---:|---:|---:|---:|",
             *(f"| {w} | {r['steps']:.2f} | {r['tokens']:.1f} | {r['finished']:.2f} | {r['accuracy']:.2f} | {r['seconds']:.4f} |"
               for w, r in result.items())]
    notes = [f"Model: the SFT stage's `{config.arm}` arm ({finished.stages['sft']}); {config.sums.rows} sums of "
             f"{config.sums.terms} numbers, greedy, at most {config.sums.max_new_tokens} new tokens per worker, on "
             f"{finished.device}; the first worker to close its line ends the run and gives the answer.",
             "The paper runs large pretrained reasoning models without fine-tuning, each worker's text contiguous; here "
             "the workers' tokens interleave one per round (modules/decoding/hogwild.py), which a model reads well only if "
             "trained on such transcripts."]
    return Measured(metrics, notes=notes, sections={"Workers": table})


def claims(config: HogwildConfig, metrics: Mapping[str, Any]) -> list[ClaimResult]:
    most = config.sums.workers[-1]
    one_steps, many_steps = metrics.get("workers/1/steps"), metrics.get(f"workers/{most}/steps")
    one_accuracy, many_accuracy = metrics.get("workers/1/accuracy"), metrics.get(f"workers/{most}/accuracy")
    results = [check_below(
        claim="Workers sharing one cache finish in fewer sequential steps than one worker", source=SOURCE,
        metric=f"forward passes until a worker finishes, {most} workers / 1 worker",
        measured=None if one_steps is None or many_steps is None else many_steps / one_steps, bound=1.0, factor=1.0,
        paper="fewer sequential steps to a joint answer", bound_name="one worker's")]
    claim, metric = "Their joint answer is as valid as one worker's", f"share of rows answered right, {most} workers"
    paper = "accuracy kept while finishing sooner"
    if one_accuracy is not None and one_accuracy < MIN_ACCURACY:
        results.append(not_measured(claim, SOURCE, metric, paper, f"one worker answers {one_accuracy:.0%} of the rows right "
                                    f"(under {MIN_ACCURACY:.0%}): this model cannot do the task, so accuracy cannot compare"))
    else:
        results.append(check_above(claim=claim, source=SOURCE, metric=metric, measured=many_accuracy, bound=one_accuracy,
                                   factor=ACCURACY_FACTOR, paper=paper, bound_name="one worker's accuracy"))
    return results


register(
    Technique(
        name="hogwild",
        summary="Hogwild! inference: workers sharing one KV cache against one worker on a verifiable task",
        config=HogwildConfig,
        requires=("sft",),
        steps=(Step("parallel sums", _sums),),
        claims=claims,
        aliases=("hogwild-inference",),
    )
)
